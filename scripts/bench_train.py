"""Training throughput: nanojax against PyTorch (HF transformers GPT2LMHeadModel + torch AdamW).

    python scripts/bench_train.py                        # both shapes, fp32, eager PyTorch
    python scripts/bench_train.py --shapes=shakespeare --compile   # also torch.compile
    python scripts/bench_train.py --shapes=gpt2-1024 --dtype=bfloat16 --notorch --steps=20   # a GPU
    python scripts/bench_train.py --shapes=shakespeare --nobias --notorch --nanogpt_dir=PATH   # vs nanoGPT

Same shape, batch, dtype and token batches on both sides; the two alternate in rounds of
--steps steps (after two warm-up steps and one untimed round each), and the table reports the
median round of each and the ratio of tokens/s.
Both sides do the full step: forward, backward, global-norm clipping at 1.0 and AdamW.
--nanogpt_dir adds nanoGPT itself (its model.py's GPT and its configure_optimizers, the step of
its train.py on CPU: forward with targets, backward, clip, AdamW, zero_grad) at the same shape;
--nobias gives both sides nanoGPT's shakespeare config (no biases; HF GPT-2 has them: --notorch).
Every shape also prints nanojax's MFU against the device's peak (nanojax.metrics; on CPU the
matmul rate measured in the same process). --dtype=bfloat16 is nanojax's mixed precision (bf16
compute, fp32 params and optimizer state); the PyTorch side is fp32 only, so it needs --notorch.
--train_attn_kernel_ab adds a nanojax side whose attention is XLA's instead of the CPU training
kernel (nanojax.kernels.cpu_attention), alternating with the others in the same process:
    python scripts/bench_train.py --shapes=shakespeare,gpt2 --notorch --train_attn_kernel_ab
--gemm_kernel_ab likewise adds one whose dense products are XLA's dots instead of the MKL gemm kernel
(nanojax.kernels.cpu_gemm), and --bf16_ab one in mixed precision (bf16 compute, fp32 params):
    python scripts/bench_train.py --shapes=shakespeare,gpt2 --notorch --bf16_ab
--bf16_lib_ab=mkl (or onednn) adds a bf16 side whose products run on that library, to set the two
libraries side by side where both run (NANOJAX_GEMM_BF16_LIB picks the library of every side):
    python scripts/bench_train.py --shapes=shakespeare --nobias --notorch --bf16_ab --bf16_lib_ab=mkl
"""

import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from absl import app, flags

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402

import nanojax  # noqa: E402,F401
from nanojax.metrics import (  # noqa: E402
    cpu_description,
    flops_per_token,
    measured_cpu_peak_flops,
    mfu,
    usable_cpus,
)
from nanojax.train import build, default_config, model_config_from  # noqa: E402

# name: (preset, batch, context). GPT-2 124M at a CPU-sized batch (DESIGN.md's measurements).
SHAPES = {
    "shakespeare": ("shakespeare-char-cpu", 12, 64),
    "gpt2": ("gpt2-small", 2, 256),
    "gpt2-1024": ("gpt2-small", 16, 1024),  # nanoGPT's per-device micro-batch: for an accelerator
}

flags.DEFINE_list("shapes", ["shakespeare", "gpt2"], f"Any of {sorted(SHAPES)}.")
flags.DEFINE_integer("steps", 0, "Steps per timed round (0: 40 for small shapes, 3 for gpt2).")
flags.DEFINE_integer("rounds", 5, "Alternating rounds per side.")
flags.DEFINE_bool("compile", False, "Also time torch.compile'd PyTorch.")
flags.DEFINE_bool("torch", True, "Time PyTorch at all (--notorch: nanojax only).")
flags.DEFINE_string("nanogpt_dir", "", "A nanoGPT checkout (github.com/karpathy/nanoGPT): also time "
                    "its GPT + configure_optimizers at the same shape, as its train.py steps on CPU.")
flags.DEFINE_bool("bias", True, "Biases in every layer (HF GPT-2's); --nobias: nanoGPT's shakespeare config.")
flags.DEFINE_integer("threads", 0, "torch threads (0: the machine's cores).")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "nanojax compute dtype.")
flags.DEFINE_integer("vocab_size", 0, "Model vocabulary (0: the preset's; e.g. 50304, GPT-2's padded "
                     "to a multiple of 64 as nanoGPT does).")
flags.DEFINE_string("profile_dir", "", "Also trace 3 nanojax steps per shape into this folder and "
                    "print where their time went by XLA op.")
flags.DEFINE_enum("sharding_mode", "auto", ["auto", "manual"], "The jit step or the shard_map step.")
flags.DEFINE_enum("remat", "none", ["none", "full", "dots", "dots_no_batch", "names"],
                  "Gradient checkpointing policy per block.")
flags.DEFINE_bool("train_attn_kernel_ab", False, "Also time nanojax with XLA's attention in place of "
                  "the CPU training attention kernel (`cpu_attention.train_attention_kernel(False)`).")
flags.DEFINE_bool("bf16_ab", False, "Also time nanojax in mixed precision (bf16 compute, fp32 params) next "
                  "to the --dtype side, in the same process (and print the bf16 side's speed-up).")
flags.DEFINE_bool("gemm_kernel_ab", False, "Also time nanojax with XLA's dots in place of the MKL gemm "
                  "kernel for the dense products (`cpu_gemm.gemm_kernel(False)`).")
flags.DEFINE_enum("bf16_lib_ab", None, ["mkl", "onednn"], "Also time nanojax in mixed precision with its "
                  "bf16 products on this library (`cpu_gemm.bf16_library`).")
flags.DEFINE_string("json", "", "Also write each shape's median ms/step per side, and the CPU line, to this "
                    "JSON file (scripts/cpu_bars.py reads it).")
FLAGS = flags.FLAGS


def nanojax_stepper(preset, B, T, dtype, vocab_size=0):
    # HF GPT-2 has biases; params stay fp32 (the master copy) whatever the compute dtype.
    extra = {"vocab_size": vocab_size} if vocab_size else {}
    config = default_config(preset, bias=FLAGS.bias, dropout=0.0, max_seq_len=T, dtype=dtype, **extra)
    config.update(batch_size=B, max_steps=10_000, warmup_steps=10, sharding_mode=FLAGS.sharding_mode,
                  remat=FLAGS.remat)
    cfg = model_config_from(config)
    run = build(config, cfg)
    state = list(run.init_fn(jax.random.key(0)))

    def step(x, y, i):
        state[0], state[1], m = run.step_fn(state[0], state[1], x[None], y[None], i)
        return m

    def sync():
        jax.block_until_ready(state)

    def compiled(x, y, i):  # the executable `step` runs, compiled again (profile(): its HLO)
        return run.step_fn.lower(state[0], state[1], x[None], y[None], i).compile()

    step.compiled = compiled
    return cfg, step, sync


def kernel_off_stepper(switch, preset, B, T):
    """A second nanojax stepper whose step is traced (and cached) with a CPU kernel switched off:
    `switch(False)` is the kernel's context manager (cpu_attention.train_attention_kernel,
    cpu_gemm.gemm_kernel). Returns (step, sync)."""
    _, step, sync = nanojax_stepper(preset, B, T, FLAGS.dtype, FLAGS.vocab_size)

    def off_step(x, y, i):
        with switch(False):
            return step(x, y, i)

    return off_step, sync


def torch_stepper(cfg, compile_model: bool):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    hf = GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.max_seq_len, n_embd=cfg.d_model,
                    n_layer=cfg.n_layer, n_head=cfg.n_head, resid_pdrop=0.0, embd_pdrop=0.0,
                    attn_pdrop=0.0, activation_function="gelu_new")
    model = GPT2LMHeadModel(hf).train()
    # Same decay split as nanojax: matrices decay, biases / norms / embeddings do not.
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "wte" not in n and "wpe" not in n]
    decay_ids = {id(p) for p in decay}
    rest = [p for p in model.parameters() if id(p) not in decay_ids]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                            lr=1e-3, betas=(0.9, 0.99))
    fwd = torch.compile(model) if compile_model else model

    def step(x, y, i):
        logits = fwd(input_ids=x).logits
        loss = torch.nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return loss

    return step


def nanogpt_stepper(cfg, nanogpt_dir: str):
    """nanoGPT's own model and optimizer (its model.py from the checkout), its train.py's CPU step."""
    import importlib.util

    import torch

    path = Path(nanogpt_dir) / "model.py"
    if not path.exists():
        raise app.UsageError(f"--nanogpt_dir={nanogpt_dir}: no model.py there; give a nanoGPT checkout")
    spec = importlib.util.spec_from_file_location("nanogpt_model", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    conf = module.GPTConfig(block_size=cfg.max_seq_len, vocab_size=cfg.vocab_size, n_layer=cfg.n_layer,
                            n_head=cfg.n_head, n_embd=cfg.d_model, dropout=0.0, bias=cfg.bias)
    model = module.GPT(conf).train()
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.99), "cpu")

    def step(x, y, i):
        _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


def time_round(step, batches, sync):
    t0 = time.perf_counter()
    for i, (x, y) in enumerate(batches):
        step(x, y, i)
    sync()
    return (time.perf_counter() - t0) / len(batches)


def profile(name, step, sync, batches):
    """Traces a few nanojax steps and prints the top XLA ops by time a step."""
    from nanojax.metrics import save_hlo_text, trace_op_times

    out = Path(FLAGS.profile_dir) / name
    if hasattr(step, "compiled"):  # names the kernels' custom calls in the summary
        save_hlo_text(out, step.compiled(*batches[0], 0))
    jax.profiler.start_trace(str(out))
    time_round(step, batches, sync)
    jax.profiler.stop_trace()
    ops, _ = trace_op_times(out)
    total = sum(o.seconds for o in ops)
    print(f"[{name}] profile of {len(batches)} steps in {out}: top XLA ops, ms/step (share)")
    for o in ops[:15]:
        print(f"    {o.seconds / len(batches) * 1e3:9.2f} ms  {o.seconds / total:6.1%}  {o.name}")


def main(argv):
    del argv
    import os

    threads = FLAGS.threads or os.cpu_count()
    if (FLAGS.torch or FLAGS.nanogpt_dir) and FLAGS.dtype != "float32":
        raise app.UsageError("the PyTorch sides run float32 only: pass --notorch (and no --nanogpt_dir) "
                             "with --dtype=bfloat16")
    if FLAGS.torch and not FLAGS.bias:
        raise app.UsageError("HF GPT2LMHeadModel always has biases: pass --notorch with --nobias")
    rows = []
    medians = {}  # shape -> side -> ms/step, for --json
    for name in FLAGS.shapes:
        preset, B, T = SHAPES[name]
        steps = FLAGS.steps or (3 if name == "gpt2" else 40)
        cfg, nj_step, nj_sync = nanojax_stepper(preset, B, T, FLAGS.dtype, FLAGS.vocab_size)
        rng = np.random.default_rng(0)
        data = [(rng.integers(0, cfg.vocab_size, (B, T)).astype(np.int32),) * 1 for _ in range(steps)]
        np_batches = [(x, np.roll(x, -1, axis=1)) for (x,) in data]
        sides = {"nanojax": (nj_step, nj_sync, [(jax.numpy.asarray(x), jax.numpy.asarray(y))
                                               for x, y in np_batches])}
        if FLAGS.train_attn_kernel_ab:
            from nanojax.kernels import cpu_attention

            sides["nanojax XLA attn"] = (*kernel_off_stepper(
                cpu_attention.train_attention_kernel, preset, B, T), sides["nanojax"][2])
        if FLAGS.bf16_ab:
            _, bf_step, bf_sync = nanojax_stepper(preset, B, T, "bfloat16", FLAGS.vocab_size)
            sides["nanojax bf16"] = (bf_step, bf_sync, sides["nanojax"][2])
        if FLAGS.bf16_lib_ab:
            from nanojax.kernels import cpu_gemm

            lib = FLAGS.bf16_lib_ab
            _, lib_step, lib_sync = nanojax_stepper(preset, B, T, "bfloat16", FLAGS.vocab_size)

            def on_lib(x, y, i, step=lib_step, lib=lib):
                with cpu_gemm.bf16_library(lib):
                    return step(x, y, i)

            sides[f"nanojax bf16 {lib}"] = (on_lib, lib_sync, sides["nanojax"][2])
        if FLAGS.gemm_kernel_ab:
            from nanojax.kernels import cpu_gemm

            sides["nanojax XLA dots"] = (*kernel_off_stepper(cpu_gemm.gemm_kernel, preset, B, T),
                                         sides["nanojax"][2])
        if FLAGS.torch or FLAGS.nanogpt_dir:
            import torch

            torch.set_num_threads(threads)
            tb = [(torch.from_numpy(x).long(), torch.from_numpy(y).long()) for x, y in np_batches]
        if FLAGS.nanogpt_dir:
            sides["nanoGPT (torch eager)"] = (nanogpt_stepper(cfg, FLAGS.nanogpt_dir), lambda: None, tb)
        if FLAGS.torch:
            sides["torch eager"] = (torch_stepper(cfg, False), lambda: None, tb)
            if FLAGS.compile:
                sides["torch.compile"] = (torch_stepper(cfg, True), lambda: None, tb)
        for step, sync, batches in sides.values():  # warm up: compile, allocate
            time_round(step, batches[:2], sync)
        # One untimed round of each side more, in the timed order: all sides share the process's
        # heap, and the first round after another side's first big allocation (torch.compile's
        # especially) pays page faults that no later round does.
        for step, sync, batches in sides.values():
            time_round(step, batches, sync)
        times = {k: [] for k in sides}
        for _ in range(FLAGS.rounds):
            for k, (step, sync, batches) in sides.items():
                times[k].append(time_round(step, batches, sync))
        med = {k: statistics.median(v) for k, v in times.items()}
        medians[name] = {k: t * 1e3 for k, t in med.items()}
        tokens = B * T
        for k, t in med.items():
            rows.append((name, f"{B}x{T}", k, t * 1e3, tokens / t, med["nanojax"] and t / med["nanojax"]))
        print(f"[{name}] " + ", ".join(f"{k}: {t * 1e3:.1f} ms/step" for k, t in med.items()), flush=True)
        mflops = flops_per_token(cfg, T) * tokens / med["nanojax"]
        util = mfu(tokens / med["nanojax"], cfg, T)
        device = jax.devices()[0]
        peak = (f", measured fp32 matmul peak {measured_cpu_peak_flops() / 1e9:.1f} GFLOP/s"
                if device.platform == "cpu" else "")
        print(f"[{name}] nanojax {mflops / 1e9:.1f} GFLOP/s (6N + attention){peak}; MFU "
              f"{'unknown for ' + device.device_kind if util is None else f'{util:.1%}'} "
              f"({FLAGS.dtype}, {device.device_kind})", flush=True)
        if FLAGS.profile_dir:
            profile(name, nj_step, nj_sync, sides["nanojax"][2][:3])
    device = jax.devices()[0]
    used = f"XLA {usable_cpus()}" if device.platform == "cpu" else f"XLA on {device.device_kind}"
    used += f", torch {threads}" if FLAGS.torch or FLAGS.nanogpt_dir else ""
    print(f"\n{device.device_kind} ({device.platform}), jax {jax.__version__}, {FLAGS.dtype}")
    print(f"CPU: {cpu_description(used)}")
    if device.platform == "cpu":
        from nanojax.kernels import cpu_gemm

        on = {dt: cpu_gemm.library(dt) or "XLA dots" for dt in ("float32", "bfloat16")}
        print(f"dense products: float32 on {on['float32']}, bfloat16 on {on['bfloat16']} "
              f"(gemm kernel libraries built: {', '.join(cpu_gemm.built()) or 'none'})")
    print("| shape | batch x ctx | impl | ms/step | tokens/s | nanojax speed-up |")
    print("|---|---|---|---:|---:|---:|")
    for name, bt, impl, ms, tps, ratio in rows:
        print(f"| {name} | {bt} | {impl} | {ms:.1f} | {tps:,.0f} | {ratio:.2f}x |")
    if FLAGS.json:
        record = {"cpu": cpu_description(used), "platform": device.platform, "jax": jax.__version__,
                  "dtype": FLAGS.dtype, "rounds": FLAGS.rounds, "ms_per_step": medians}
        Path(FLAGS.json).write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    app.run(main)
