"""Which target size makes speculative decoding pay on this CPU? Random weights, no training.

    python scripts/profile_speculative_shapes.py --draft_workdir=/tmp/spec_models/draft \\
        --shapes=6x384,8x512,12x512,12x768 --ts=1,3,5,7 --rounds=5

For each target shape (n_layer x d_model, head_dim 64, char vocabulary, context --ctx) and each
T in --ts, times `speculative._step` of T tokens at batch 1 over a --window-slot cache: one call
= 64 steps inside one jitted fori_loop (as in bench_speculative.py's profile), compiled once. The
calls of all shapes alternate within each round (so a load spike on this shared machine hits
them all alike) and the table gives medians over rounds, in ms per step, with verify(T)/step(1)
and draft step/target step. Speculative decoding needs verify(k+1) close to one step (the
weights read once for k+1 rows) and a draft step that is a small fraction of a target step.
"""

import os
import statistics
import sys
import time
from pathlib import Path

from absl import app, flags

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
from _bench_speculative import step_runner  # noqa: E402

import nanojax as nj  # noqa: E402
from nanojax.metrics import cpu_description  # noqa: E402

flags.DEFINE_string("draft_workdir", None, "The draft's training workdir (its real weights are timed).")
flags.DEFINE_list("shapes", ["6x384", "8x512", "12x512", "12x768"], "Target shapes, n_layer x d_model.")
flags.DEFINE_list("ts", ["1", "3", "5", "7"], "Tokens per target forward (1 = a plain decode step).")
flags.DEFINE_integer("ctx", 256, "Target context (max_seq_len).")
flags.DEFINE_integer("window", 256, "KV cache slots (bench_speculative uses 256 for 200 new tokens).")
flags.DEFINE_integer("rounds", 5, "Timed calls per cell (median).")
flags.DEFINE_integer("calls", 64, "Steps per jitted call.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    ts = [int(t) for t in FLAGS.ts]
    cells = {}  # (name, T) -> (fn, args)
    for shape in FLAGS.shapes:
        L, D = (int(x) for x in shape.split("x"))
        cfg = nj.ModelConfig(vocab_size=65, n_layer=L, n_head=D // 64, d_model=D, max_seq_len=FLAGS.ctx)
        params = nj.init_params(cfg, jax.random.key(0))
        print(f"# target {shape}: {cfg.num_params() / 1e6:.1f}M params", flush=True)
        for T in ts:
            cells[(shape, T)] = step_runner(params, cfg, T, FLAGS.window, FLAGS.calls)
    if FLAGS.draft_workdir:
        dcfg, dparams, _ = nj.load_checkpoint(FLAGS.draft_workdir)
        print(f"# draft: {dcfg.n_layer} layers, d_model {dcfg.d_model}, "
              f"{dcfg.num_params() / 1e6:.2f}M params")
        cells[("draft", 1)] = step_runner(dparams, dcfg, 1, FLAGS.window, FLAGS.calls)
    times = {key: [] for key in cells}
    loads = []
    for _ in range(FLAGS.rounds):
        loads.append(os.getloadavg()[0])
        for key, (fn, args) in cells.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[key].append(1e3 * (time.perf_counter() - t0) / FLAGS.calls)
    ms = {key: statistics.median(v) for key, v in times.items()}
    print(f"\n# CPU: {cpu_description()}; jax {jax.__version__}; 1-min load average "
          f"{min(loads):.1f}-{max(loads):.1f}; batch 1, {FLAGS.window}-slot cache, median of {FLAGS.rounds}")
    head = " | ".join(f"T={t} ms" for t in ts)
    ratios = " | ".join(f"verify({t})/step" for t in ts if t > 1)
    print(f"| target | params | {head} | {ratios} | draft/target step |")
    print("|" + "---|" * (3 + len(ts) + len([t for t in ts if t > 1])))
    for shape in FLAGS.shapes:
        L, D = (int(x) for x in shape.split("x"))
        n = nj.ModelConfig(vocab_size=65, n_layer=L, n_head=D // 64, d_model=D,
                           max_seq_len=FLAGS.ctx).num_params() / 1e6
        step = ms[(shape, 1)]
        cols = " | ".join(f"{ms[(shape, t)]:.2f}" for t in ts)
        rat = " | ".join(f"{ms[(shape, t)] / step:.2f}" for t in ts if t > 1)
        dr = f"{ms[('draft', 1)] / step:.3f}" if ("draft", 1) in ms else "-"
        print(f"| {shape} | {n:.1f}M | {cols} | {rat} | {dr} |")
    if ("draft", 1) in ms:
        print(f"draft step: {ms[('draft', 1)]:.3f} ms")


if __name__ == "__main__":
    app.run(main)
