"""The quantized small-M kernels (nanojax/quant/csrc/qmatmul.cc) per call, weights from DRAM or cache.

    python scripts/bench_quant_kernel.py                                  # docs/quantization.md, third run
    NANOJAX_KERNEL_PREFETCH=0 python scripts/bench_quant_kernel.py        # without the software prefetch
    python scripts/bench_quant_kernel.py --same --shapes=768x2048         # weights in cache: compute only

Each timed call is a jitted fori_loop over a chain of products y_{k+1} = (y_k @ W_k)[:, :I] over
distinct quantized weights totalling about --weights_mb (default 300 MB, beyond a 2-vCPU VM's
share of L3, so the weights stream from DRAM as in a decode step). Prints the best of --repeats per
call: us, and GB/s of q read (the scales not counted). Variants named by NANOJAX_* environment
variables are read once per process, so compare them in alternating runs.
"""

import sys
import time
from pathlib import Path

from absl import app, flags

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from nanojax.metrics import cpu_description  # noqa: E402
from nanojax.quant import ffi  # noqa: E402
from nanojax.quant.quantize import quantize_matrix  # noqa: E402

flags.DEFINE_list("shapes", ["768x2048", "2048x768", "768x32000"], "Weight shapes IxO.")
flags.DEFINE_list("schemes", ["int4", "int8"], "int4 (group --group_size) and/or int8 (per channel).")
flags.DEFINE_integer("group_size", 32, "int4 group size.")
flags.DEFINE_list("activations", ["int8", "fp32"], "x inside the kernels.")
flags.DEFINE_integer("weights_mb", 300, "Distinct weights per chain, MB.")
flags.DEFINE_boolean("same", False, "One weight, repeated (cache-resident: compute only).")
flags.DEFINE_integer("repeats", 5, "Timed chains per variant (after one warm-up).")
FLAGS = flags.FLAGS


def _chain(fn, I: int, O: int, group: int, act: str, reps: int):
    @jax.jit
    def run(x, qs, ss):
        def body(_, x):
            for q, s in zip(qs, ss, strict=True):
                y = fn(x, q, s, group, activations=act)
                x = (jnp.tile(y, (1, -(-I // O))) if O < I else y)[:, :I]
            return x
        return jax.lax.fori_loop(0, reps, body, x)
    return run


def main(argv):
    del argv
    if not ffi.kernels_available():
        raise SystemExit(f"the CPU kernels are unavailable: {ffi.kernels_info()['why']}")
    print(f"# {cpu_description()}  jax {jax.__version__}  kernels {ffi.kernels_info()}")
    print("| shape | weights | x | where | us per call | GB/s of q |")
    print("|---|---|---|---|---:|---:|")
    rng = np.random.default_rng(0)
    for shape in FLAGS.shapes:
        I, O = (int(v) for v in shape.split("x"))
        for scheme in FLAGS.schemes:
            bits = 4 if scheme == "int4" else 8
            group = FLAGS.group_size if bits == 4 else I
            nbytes = I * O * bits // 8
            n = 1 if FLAGS.same else max(2, min(64, FLAGS.weights_mb * 2**20 // nbytes))
            reps = 50 if FLAGS.same else max(1, FLAGS.weights_mb * 2**20 // (n * nbytes))
            recs = [quantize_matrix(rng.standard_normal((I, O)).astype(np.float32) * 0.02, bits,
                                    group if bits == 4 else None) for _ in range(n)]
            qs, ss = [r.q for r in recs], [r.scale for r in recs]
            fn = ffi.int4_matmul if bits == 4 else ffi.int8_matmul
            x = jnp.asarray(rng.standard_normal((1, I)), jnp.float32)
            for act in FLAGS.activations:
                run = _chain(fn, I, O, group, act, reps)
                jax.block_until_ready(run(x, qs, ss))
                best = float("inf")
                for _ in range(FLAGS.repeats):
                    t0 = time.perf_counter()
                    jax.block_until_ready(run(x, qs, ss))
                    best = min(best, time.perf_counter() - t0)
                us = best / (reps * n) * 1e6
                where = "cache" if FLAGS.same else "DRAM"
                label = f"{scheme} g{group}" if bits == 4 else "int8 per channel"
                print(f"| {shape} | {label} | {act} | {where} | {us:.1f} | {nbytes / us / 1e3:.1f} |",
                      flush=True)


if __name__ == "__main__":
    app.run(main)
