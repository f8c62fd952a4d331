"""The dense layer's products one by one: XLA:CPU's dot against the MKL gemm kernel (cpu_gemm).

    python scripts/bench_gemm.py                     # the quickstart's and GPT-2 124M's products
    python scripts/bench_gemm.py --shapes=768x128x512:nn,128x768x512:tn

A shape is MxKxN:form, form two letters for op(a) and op(b): n as stored, t transposed (the dense
forward is nn, its input gradient g @ w^T nt, its weight gradient x^T @ g tn). Each side is one
jitted call on the same operands, timed alternately (--rounds rounds of --calls calls, best round
kept); the table gives GFLOP/s (2 M K N per call) and the kernel's speed-up. Prints the CPU line.
"""

import sys
import time
from pathlib import Path

import numpy as np
from absl import app, flags

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from nanojax.kernels import cpu_gemm  # noqa: E402
from nanojax.metrics import cpu_description, usable_cpus  # noqa: E402

# The quickstart (batch 12 x 64 tokens, width 128, MLP 512, q/k/v side by side 384) and GPT-2 124M
# (2 x 256 tokens, width 768, MLP 3072, q/k/v 2304, the tied head over 50257) products.
DEFAULT = ("768x128x384:nn,768x384x128:nt,128x768x384:tn,768x128x512:nn,768x512x128:nn,768x512x128:nt,"
           "768x128x512:nt,128x768x512:tn,512x768x128:tn,512x768x2304:nn,512x3072x768:nn,"
           "768x512x3072:tn,512x768x50257:nt")
flags.DEFINE_list("shapes", DEFAULT.split(","), "MxKxN:form products.")
flags.DEFINE_integer("rounds", 5, "Alternating rounds per side.")
flags.DEFINE_float("seconds", 0.2, "Rough time per round per side (sets the calls per round).")
FLAGS = flags.FLAGS


def parse(spec: str) -> tuple[int, int, int, bool, bool]:
    dims, _, form = spec.partition(":")
    form = form or "nn"
    try:
        M, K, N = (int(d) for d in dims.split("x"))
    except ValueError:
        raise app.UsageError(f"--shapes: {spec!r} is not MxKxN:form (e.g. 768x128x512:nt)") from None
    if len(form) != 2 or set(form) - {"n", "t"}:
        raise app.UsageError(f"--shapes: form {form!r} in {spec!r} must be two letters of n and t")
    return M, K, N, form[0] == "t", form[1] == "t"


def time_calls(fn, calls: int) -> float:
    t0 = time.perf_counter()
    for _ in range(calls):
        out = fn()
    out.block_until_ready()
    return (time.perf_counter() - t0) / calls


def main(argv):
    del argv
    if not cpu_gemm.available():
        raise app.UsageError("the MKL gemm kernel is unavailable here: pip install 'nanojax[mkl]' (x86-64 "
                             "Linux), then `make kernels`")
    rng = np.random.default_rng(0)
    print("| product (M x K x N, form) | XLA dot GFLOP/s | gemm kernel GFLOP/s | speed-up |")
    print("|---|---:|---:|---:|")
    for spec in FLAGS.shapes:
        M, K, N, ta, tb = parse(spec)
        a = jnp.asarray(rng.standard_normal((K, M) if ta else (M, K), dtype=np.float32))
        b = jnp.asarray(rng.standard_normal((N, K) if tb else (K, N), dtype=np.float32))
        dims = (((0 if ta else 1,), (1 if tb else 0,)), ((), ()))
        xla = jax.jit(lambda a, b, dims=dims: jax.lax.dot_general(a, b, dims))
        kern = jax.jit(lambda a, b, ta=ta, tb=tb: cpu_gemm.gemm(a, b, transpose_a=ta, transpose_b=tb))
        ref, got = np.asarray(xla(a, b)), np.asarray(kern(a, b))
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-3 * np.sqrt(K))
        sides = {"xla": lambda f=xla, a=a, b=b: f(a, b), "gemm": lambda f=kern, a=a, b=b: f(a, b)}
        calls = max(1, int(FLAGS.seconds / time_calls(sides["xla"], 1)))
        best = {k: float("inf") for k in sides}
        for _ in range(FLAGS.rounds):
            for k, fn in sides.items():
                best[k] = min(best[k], time_calls(fn, calls))
        flop = 2 * M * K * N
        form = ("t" if ta else "n") + ("t" if tb else "n")
        rates = " | ".join(f"{flop / best[k] / 1e9:.1f}" for k in ("xla", "gemm"))
        print(f"| {M} x {K} x {N} {form} | {rates} | {best['xla'] / best['gemm']:.2f}x |", flush=True)
    print(f"\njax {jax.__version__}; CPU: {cpu_description(f'XLA {usable_cpus()}')}")


if __name__ == "__main__":
    app.run(main)
