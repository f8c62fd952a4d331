"""LoRA costs, side by side: decode with several adapters in one batch against no adapter, and a
LoRA training step against a full fine-tuning step of the same model.

    python scripts/bench_lora.py                                  # docs/lora.md's table
    python scripts/bench_lora.py --shape=llama-134m --adapters=3 --rank=16 --repeats=5

Decode: `--batch` prompts (random ids), greedy, `--new_tokens` each; "multi" gives rows
adapters 0, 1, ..., adapters-1 and None (a rank-`--rank` adapter on q,k,v,o,gate,up,down each,
random nonzero B) in one `generate` call; "plain" runs the same batch without adapters. Runs
alternate (plain, multi, plain, multi, ...) so machine noise hits both; medians are reported.
Training: the jitted step (forward, backward, AdamW) on a random batch, full model vs LoRA over
the frozen base, alternated the same way; "state" is what the step keeps between calls: params +
optimizer state for full fine-tuning, base + adapter + the adapter's optimizer state for LoRA.
"""

import statistics
import sys
import time
from pathlib import Path

from absl import app, flags

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import nanojax as nj  # noqa: E402
from nanojax.lora import count_params, init_lora  # noqa: E402
from nanojax.metrics import cpu_description, usable_cpus  # noqa: E402
from nanojax.optim import make_optimizer  # noqa: E402
from nanojax.train.step import loss_fn, make_train_step  # noqa: E402

flags.DEFINE_string("shape", "llama-tiny", "ModelConfig preset (a Llama shape: all seven targets).")
flags.DEFINE_integer("batch", 4, "Rows per decode call.")
flags.DEFINE_integer("adapters", 3, "Distinct adapters in the multi-adapter batch (plus one plain row).")
flags.DEFINE_integer("rank", 8, "LoRA rank.")
flags.DEFINE_string("targets", "q,k,v,o,gate,up,down", "LoRA targets.")
flags.DEFINE_integer("new_tokens", 128, "New tokens per prompt.")
flags.DEFINE_integer("prompt_len", 16, "Prompt length.")
flags.DEFINE_integer("train_batch", 8, "Sequences per training step.")
flags.DEFINE_integer("repeats", 5, "Timed runs per side.")
FLAGS = flags.FLAGS


def _nbytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def _random_adapter(cfg, seed):
    a = init_lora(cfg, jax.random.key(seed), rank=FLAGS.rank, targets=FLAGS.targets, alpha=2.0 * FLAGS.rank)
    rng = np.random.default_rng(seed)
    return a.replace(weights=jax.tree.map(lambda x: jnp.asarray(rng.normal(0, 0.02, x.shape), x.dtype),
                                          a.weights))


def _alternate(fns: dict, repeats: int) -> dict:
    times = {k: [] for k in fns}
    for f in fns.values():
        f()  # warm-up: compile
    for _ in range(repeats):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def bench_decode(cfg, params):
    rng = np.random.default_rng(0)
    prompts = [list(rng.integers(0, cfg.vocab_size, FLAGS.prompt_len)) for _ in range(FLAGS.batch)]
    adapters = [_random_adapter(cfg, i + 1) for i in range(FLAGS.adapters)]
    per_row = [adapters[i] if i < FLAGS.adapters else None for i in range(FLAGS.batch)]

    def plain():
        return nj.generate(params, cfg, prompts, max_new_tokens=FLAGS.new_tokens)

    def multi():
        return nj.generate(params, cfg, prompts, max_new_tokens=FLAGS.new_tokens, lora=per_row)

    t = _alternate({"plain": plain, "multi": multi}, FLAGS.repeats)
    n = FLAGS.batch * FLAGS.new_tokens
    print(f"decode, batch {FLAGS.batch}, {FLAGS.new_tokens} new tokens, greedy, rank {FLAGS.rank} on "
          f"{FLAGS.targets}; rows: {FLAGS.adapters} adapters + {FLAGS.batch - FLAGS.adapters} none")
    print("| run | tok/s | vs plain |\n|---|---|---|")
    print(f"| no adapter | {n / t['plain']:,.0f} | 1.00x |")
    ratio = t["plain"] / t["multi"]
    print(f"| {FLAGS.adapters} adapters in one batch | {n / t['multi']:,.0f} | {ratio:.2f}x |")


def bench_train(cfg, params):
    T = min(cfg.max_seq_len, 128)
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.integers(0, cfg.vocab_size, (1, FLAGS.train_batch, T)), jnp.int32)
    y = jnp.roll(x, -1, axis=-1)
    opt = make_optimizer(1e-4)
    full = jax.jit(make_train_step(cfg, opt, 0))
    template = init_lora(cfg, jax.random.key(0), rank=FLAGS.rank, targets=FLAGS.targets)
    opt_l = make_optimizer(1e-4, mask=lambda t: jax.tree.map(lambda _: True, t))

    def lora_loss(w, x, y, cfg, rng, base):
        return loss_fn(base, x, y, cfg, rng, lora=template.replace(weights=w))

    lora = jax.jit(make_train_step(cfg, opt_l, 0, loss=lora_loss))
    state = {"full": (params, opt.init(params)), "lora": (template.weights, opt_l.init(template.weights))}

    def run_full():
        p, o = state["full"]
        jax.block_until_ready(full(p, o, x, y, np.int32(0))[2]["loss"])

    def run_lora():
        w, o = state["lora"]
        jax.block_until_ready(lora(w, o, x, y, np.int32(0), params)[2]["loss"])

    t = _alternate({"full": run_full, "lora": run_lora}, FLAGS.repeats)
    n_full = sum(x.size for x in jax.tree.leaves(params))
    n_lora = count_params(template)
    mb = 1 / 2**20
    full_state = _nbytes(state["full"])
    lora_state = _nbytes(params) + _nbytes(state["lora"])
    print(f"\ntraining step, batch {FLAGS.train_batch} x {T} tokens, AdamW, fp32")
    print("| run | trainable params | state (params + optimizer) | step time |\n|---|---|---|---|")
    print(f"| full fine-tune | {n_full:,} | {full_state * mb:.1f} MiB | {t['full'] * 1e3:.1f} ms |")
    print(f"| LoRA r={FLAGS.rank} ({FLAGS.targets}) | {n_lora:,} ({100 * n_lora / n_full:.2f}%) | "
          f"{lora_state * mb:.1f} MiB | {t['lora'] * 1e3:.1f} ms ({t['full'] / t['lora']:.2f}x) |")


def main(argv):
    del argv
    cfg = nj.ModelConfig.preset(FLAGS.shape)
    cfg = cfg.replace(max_seq_len=max(cfg.max_seq_len, FLAGS.prompt_len + FLAGS.new_tokens))
    params = nj.init_params(cfg, jax.random.key(0))
    print(f"{FLAGS.shape}: {cfg.n_layer} layers, d_model {cfg.d_model}; {jax.devices()[0].platform}; "
          f"{cpu_description(str(usable_cpus()))}")
    bench_decode(cfg, params)
    bench_train(cfg, params)


if __name__ == "__main__":
    app.run(main)
