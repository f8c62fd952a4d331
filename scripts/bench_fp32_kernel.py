"""The fp32 small-M kernel (nanojax/quant/csrc/fmatmul.cc) against XLA's dot, and against other builds.

    python scripts/bench_fp32_kernel.py                          # docs/performance/decode.md, fp32 kernel
    python scripts/bench_fp32_kernel.py --ms=1,16 --shapes=768x2048 --so=old=/tmp/old/libnjquant.so

Each timed call is a jitted chain of products y_{k+1} = (y_k @ w_k)[:, :I] over distinct weights
w_k totalling about --weights_mb (default 640 MB, beyond this Xeon's 480 MB L3, so the weights come
from DRAM as in a whole model's decode step; the slice/tile between products is a few us). Variants
run interleaved, one after the other inside each repeat, so machine noise hits them alike; the
best and the median of --repeats are printed per product: us, GB/s of weights read, GFLOP/s.
--so NAME=PATH loads another build of the library (e.g. the previous kernel, compiled from a copy
of csrc/) under its own FFI target, for before/after runs in one process.
"""

import ctypes
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
from nanojax.quant import ffi  # noqa: E402

flags.DEFINE_list("shapes", ["768x2048", "2048x768", "768x768", "768x32000"], "Weight shapes IxO.")
flags.DEFINE_list("ms", ["1", "2", "4", "8", "16", "32"], "Rows of x.")
flags.DEFINE_list("so", [], "Extra kernel libraries NAME=PATH (another build of csrc/).")
flags.DEFINE_boolean("xla", True, "Time XLA's dot too.")
flags.DEFINE_integer("weights_mb", 640, "Distinct weights per chain, MB (at least 2 matrices).")
flags.DEFINE_boolean("same", False, "Repeat one weight through the chain (cache-resident: compute only).")
flags.DEFINE_integer("repeats", 7, "Timed calls per variant (after one warm-up).")
FLAGS = flags.FLAGS


def _target(name: str, path: str) -> str:
    lib = ctypes.CDLL(path)
    target = f"bench_fp32_{name}"
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(lib.NjFp32Matmul), platform="cpu")
    _keep.append(lib)
    return target


_keep: list = []


def _chain(product, I: int):
    def f(x, *ws):
        y = x
        for w in ws:
            z = product(y, w)
            reps = -(-I // z.shape[1])
            y = jnp.tile(z, (1, reps))[:, :I] if reps > 1 else z[:, :I]
        return y
    return jax.jit(f)


def main(argv):
    del argv
    assert ffi.kernels_available(), ffi.kernels_info()
    targets = {"kernel": ffi._FP32_TARGET}
    for spec in FLAGS.so:
        name, path = spec.split("=", 1)
        targets[name] = _target(name, path)
    print(f"# {cpu_description()}  jax {jax.__version__}  weights/chain ~{FLAGS.weights_mb} MB")
    print("| shape | M | variant | best us | median us | GB/s (best) | GFLOP/s (best) |")
    print("|---|---:|---|---:|---:|---:|---:|")
    rng = np.random.default_rng(0)
    for shape in FLAGS.shapes:
        I, O = (int(v) for v in shape.split("x"))
        n = max(2, FLAGS.weights_mb * 2**20 // (I * O * 4))
        ws = [jnp.asarray((rng.standard_normal((I, O), np.float32) / np.sqrt(I)).astype(np.float32))
              for _ in range(1 if FLAGS.same else n)]
        ws = ws * (n if FLAGS.same else 1)
        for M in (int(m) for m in FLAGS.ms):
            x = jnp.asarray(rng.standard_normal((M, I)).astype(np.float32))
            fns = {}
            for name, target in targets.items():
                call = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct((M, O), jnp.float32))
                fns[name] = _chain(lambda a, b, call=call: call(a, b), I)
            if FLAGS.xla:
                fns["xla"] = _chain(lambda a, b: a @ b, I)
            times: dict[str, list[float]] = {}
            for name, f in list(fns.items()):
                try:
                    f(x, *ws).block_until_ready()
                except Exception as e:  # e.g. an older build that takes at most 16 rows
                    print(f"| {shape} | {M} | {name} | failed: {str(e).splitlines()[0][:60]} | | | |")
                    del fns[name]
            ref = None
            for _ in range(FLAGS.repeats):
                for name, f in fns.items():
                    t0 = time.perf_counter()
                    out = f(x, *ws).block_until_ready()
                    times.setdefault(name, []).append((time.perf_counter() - t0) / n)
                    if ref is None:
                        ref = np.asarray(out)
                    # every variant computes the same chain: a wrong kernel shows up here
                    np.testing.assert_allclose(np.asarray(out), ref, rtol=2e-3, atol=2e-3)
            for name, ts in times.items():
                best, med = min(ts), statistics.median(ts)
                print(f"| {I}x{O} | {M} | {name} | {best * 1e6:.0f} | {med * 1e6:.0f} | "
                      f"{I * O * 4 / best / 1e9:.1f} | {2 * M * I * O / best / 1e9:.0f} |", flush=True)
        del ws


if __name__ == "__main__":
    app.run(main)
