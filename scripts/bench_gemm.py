"""The dense layer's products one by one: XLA:CPU's dot against the gemm kernel (cpu_gemm).

    python scripts/bench_gemm.py                     # the quickstart's and GPT-2 124M's products
    python scripts/bench_gemm.py --shapes=768x128x512:nn,128x768x512:tn
    python scripts/bench_gemm.py --dtype=bfloat16    # also XLA's bf16 dot; MKL's and oneDNN's bf16

A shape is MxKxN:form, form two letters for op(a) and op(b): n as stored, t transposed (the dense
forward is nn, its input gradient g @ w^T nt, its weight gradient x^T @ g tn). Each side is one
jitted call on the same operands, timed alternately (--rounds rounds of --calls calls, best round
kept); the table gives GFLOP/s (2 M K N per call) of XLA's fp32 dot, with --dtype=bfloat16 XLA's
bf16 dot (fp32 sums and result), and the kernel on each library built in that runs the dtype, and
the best kernel's speed-up over XLA's fp32 dot. Prints the CPU line.
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
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"],
                  "The kernel's operands (XLA's fp32 dot is the base).")
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
    libs = cpu_gemm._usable(FLAGS.dtype)
    if not libs:
        raise app.UsageError(f"no gemm kernel for {FLAGS.dtype} here (built: {list(cpu_gemm.built())}; bf16 "
                             "needs AVX512_BF16): pip install 'nanojax[mkl,onednn]' (x86-64 Linux), then "
                             "`make kernels`")
    rng = np.random.default_rng(0)
    names = ["XLA fp32", *(["XLA bf16"] if FLAGS.dtype == "bfloat16" else []), *libs]
    heads = " | ".join(f"{n} GFLOP/s" for n in names)
    print(f"| product (M x K x N, form) | {heads} | best kernel vs XLA fp32 |")
    print("|---|" + "---:|" * (len(names) + 1))
    for spec in FLAGS.shapes:
        M, K, N, ta, tb = parse(spec)
        a = jnp.asarray(rng.standard_normal((K, M) if ta else (M, K), dtype=np.float32))
        b = jnp.asarray(rng.standard_normal((N, K) if tb else (K, N), dtype=np.float32))
        a16, b16 = a.astype(FLAGS.dtype), b.astype(FLAGS.dtype)
        dims = (((0 if ta else 1,), (1 if tb else 0,)), ((), ()))
        xla = jax.jit(lambda a, b, dims=dims: jax.lax.dot_general(a, b, dims,
                                                                  preferred_element_type=jnp.float32))
        fns = {"XLA fp32": (xla, a, b), "XLA bf16": (xla, a16, b16)}
        for lib in libs:
            kern = jax.jit(lambda a, b, ta=ta, tb=tb, lib=lib: cpu_gemm.gemm(a, b, ta, tb, lib=lib))
            fns[lib] = (kern, a16, b16)
        ref = np.asarray(xla(a16, b16))
        for lib in libs:  # the same operands: equal to fp32 rounding of K terms
            np.testing.assert_allclose(np.asarray(fns[lib][0](*fns[lib][1:])), ref, rtol=1e-4,
                                       atol=1e-3 * np.sqrt(K))
        sides = {k: (lambda f=f, x=x, y=y: f(x, y)) for k, (f, x, y) in fns.items() if k in names}
        calls = max(1, int(FLAGS.seconds / time_calls(sides["XLA fp32"], 1)))
        best = {k: float("inf") for k in sides}
        for _ in range(FLAGS.rounds):
            for k, fn in sides.items():
                best[k] = min(best[k], time_calls(fn, calls))
        flop = 2 * M * K * N
        form = ("t" if ta else "n") + ("t" if tb else "n")
        rates = " | ".join(f"{flop / best[k] / 1e9:.1f}" for k in names)
        fastest = min(best[lib] for lib in libs)
        print(f"| {M} x {K} x {N} {form} | {rates} | {best['XLA fp32'] / fastest:.2f}x |", flush=True)
    print(f"\njax {jax.__version__}, {FLAGS.dtype}; CPU: {cpu_description(f'XLA {usable_cpus()}')}")


if __name__ == "__main__":
    app.run(main)
