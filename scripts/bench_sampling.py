"""The per-row sampler's top-k/top-p mask (`sampling.top_k_top_p_keep`, no vocabulary sort)
against the descending-sort mask it replaced, side by side in one process:

    python scripts/bench_sampling.py                      # vocab 32000, rows 1 and 16
    python scripts/bench_sampling.py --vocab=128256 --rows=1,8

Two kinds of logits: peaked (an LM-like row: the top-p boundary among the best 64 tokens, the
fast path) and flat (the boundary far down the row: the bisection path). Checks the masks are
equal, then reports medians of --repeats calls, and the whole `sample_rows` step for reference.
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

from nanojax.metrics import cpu_description  # noqa: E402
from nanojax.sampling import row_knobs, sample_rows, top_k_top_p_keep  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("vocab", 32000, "Vocabulary size.")
flags.DEFINE_list("rows", ["1", "16"], "Rows (batch) per call.")
flags.DEFINE_integer("repeats", 20, "Timed calls (median).")


def sorted_keep(x: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """The mask by one descending sort per row (the method top_k_top_p_keep replaced)."""
    V = x.shape[-1]
    desc = -jnp.sort(-x, axis=-1)
    rank = jnp.arange(V)[None, :]
    k = jnp.clip(top_k, 1, V)[:, None]
    desc = jnp.where(rank < k, desc, -jnp.inf)
    probs = jax.nn.softmax(desc, axis=-1)
    above = jnp.cumsum(probs, -1) - probs
    keep = (rank < k) & ((above < top_p[:, None]) | (top_p[:, None] >= 1.0))
    n_keep = jnp.maximum(jnp.sum(keep, axis=-1, keepdims=True), 1)
    return x >= jnp.take_along_axis(desc, n_keep - 1, axis=-1)


def _median_ms(fn, *args) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(FLAGS.repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main(_):
    print(f"# vocab {FLAGS.vocab}; jax {jax.__version__}; {cpu_description()}")
    print("| rows | logits | sort mask ms | sort-free mask ms | speed-up | sample_rows ms (top_p 0.9) |")
    print("|---:|---|---:|---:|---:|---:|")
    new, old = jax.jit(top_k_top_p_keep), jax.jit(sorted_keep)
    step = jax.jit(lambda x, keys, knobs: sample_rows(x, keys, knobs, greedy_only=False))
    rng = np.random.default_rng(0)
    for R in map(int, FLAGS.rows):
        for name, scale in (("peaked", 8.0), ("flat", 0.5)):
            x = jnp.asarray((rng.standard_normal((R, FLAGS.vocab)) * scale).astype(np.float32))
            k, p = jnp.full((R,), FLAGS.vocab, jnp.int32), jnp.full((R,), 0.9, jnp.float32)
            if not np.array_equal(np.asarray(new(x, k, p)), np.asarray(old(x, k, p))):
                raise SystemExit(f"the masks differ ({R} rows, {name} logits)")
            t_old, t_new = _median_ms(old, x, k, p), _median_ms(new, x, k, p)
            knobs = {n: jnp.asarray(np.stack([v] * R))
                     for n, v in row_knobs(1.0, None, 0.9, None, FLAGS.vocab).items()}
            keys = jax.random.split(jax.random.key(0), R)
            t_step = _median_ms(step, x, keys, knobs)
            print(f"| {R} | {name} | {t_old:.2f} | {t_new:.2f} | {t_old / t_new:.1f}x | {t_step:.2f} |",
                  flush=True)


if __name__ == "__main__":
    app.run(main)
