"""Training-sized matrix products on the CPU through Intel MKL (csrc/gemm.cc).

    c = gemm(a, b)                          # a (M, K) @ b (K, N) -> (M, N), float32
    c = gemm(a, b, transpose_b=True)        # a (M, K) @ b^T, b (N, K): the dense backward's g @ w^T
    c = gemm(a, b, transpose_a=True)        # a^T @ b, a (K, M): the weight gradient x^T @ g

a and b both float32 (MKL's sgemm) or both bfloat16 (its bf16 gemm: bf16 products summed in fp32,
on AMX or AVX512_BF16); c is float32 either way.

Why: at the quickstart's shapes (768 x 128 x 512) XLA:CPU's dot runs the dense layer's products at
60-175 GFLOP/s on two Sapphire Rapids cores, MKL's sgemm at 190-280, and XLA's bf16 dot is no
faster than its fp32 one while MKL's bf16 gemm runs 2-4x its sgemm (docs/performance.md, "Training
GEMMs on MKL"). `nanojax.dense.matmul` sends its forward and both backward products here when
`use_gemm_kernel` says so; the kernel splits the output over the caller and XLA's intra-op pool,
one single-threaded MKL call per block, and reads transposed operands in place.

MKL comes from the optional `mkl-static` package (`pip install 'nanojax[mkl]'`; `make install` adds
it on x86-64 Linux), linked statically into the kernel library with its symbols kept local. Without
it the library builds without a BLAS and XLA's dot runs, with the same numbers to rounding.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp

from nanojax.quant import ffi

ENV_SWITCH = "NANOJAX_GEMM_KERNEL"
# CPU families where the kernel was measured to make the train step faster (docs/performance.md);
# elsewhere it runs only when NANOJAX_GEMM_KERNEL=1 or gemm_kernel(True) asks for it.
MEASURED_FAMILIES = ("intel-avx512",)
# Below this many rows of x the decode-sized fp32 kernel (dense.use_fp32_kernel) or XLA's dot runs.
MIN_ROWS = ffi.FP32_KERNEL_MAX_ROWS + 1

# A jit-cache-sensitive switch (a changed value re-traces), so one process can time the kernel
# against XLA's dot: `with gemm_kernel(False): ...`. None: the environment and the CPU decide.
_GEMM_KERNEL = jax.make_user_context(default_value=None)


def gemm_kernel(enabled: bool | None):
    """Context manager: force the gemm kernel on (where it can run: MKL built in) or off inside it.

    Functions jitted earlier are re-traced for the new value (NANOJAX_GEMM_KERNEL is read at trace
    time only, so it cannot A/B two runs in one process)."""
    if enabled is not None and not isinstance(enabled, bool):
        raise TypeError(f"gemm_kernel: enabled must be True, False or None, got {enabled!r}")
    return _GEMM_KERNEL(enabled)


def available() -> bool:
    """True when the kernel can run here: the CPU backend and the kernel library built with MKL."""
    return jax.default_backend() == "cpu" and ffi._load() and ffi._state.get("gemm_blas") == "mkl"


def enabled() -> bool:
    """Whether dense products may route here: `available()`, and either forced on
    (`gemm_kernel(True)`, NANOJAX_GEMM_KERNEL=1) or this CPU's family is in MEASURED_FAMILIES and
    neither `gemm_kernel(False)` nor NANOJAX_GEMM_KERNEL=0 switched it off (read at trace time)."""
    force = _GEMM_KERNEL.value
    if force is None:
        env = os.environ.get(ENV_SWITCH, "")
        force = True if env == "1" else False if ffi._switched_off(ENV_SWITCH) else None
    if force is False:
        return False
    if force is None and _family() not in MEASURED_FAMILIES:
        return False
    return available()


@functools.cache
def _cpu():  # -> xla_env.CpuInfo, read once: the routing asks at every traced product
    from nanojax import xla_env

    return xla_env.read_cpuinfo()


def _family() -> str:
    from nanojax import xla_env

    return xla_env.isa_family(_cpu())


def bf16_available() -> bool:
    """True when bf16 operands have a native path here: `available()` and a CPU with AVX512_BF16
    (MKL then uses AMX where the OS grants it, else AVX512_BF16's dot products)."""
    return "avx512_bf16" in (_cpu().flags or ()) and available()


def _check(a: jax.Array, b: jax.Array, transpose_a: bool, transpose_b: bool) -> tuple[int, int, int]:
    if a.ndim != 2 or b.ndim != 2:
        raise ValueError(f"gemm: a and b must be 2-D, got {a.shape} and {b.shape}")
    if a.dtype != b.dtype or a.dtype not in (jnp.float32, jnp.bfloat16):
        raise ValueError(f"gemm: a and b must be both float32 or both bfloat16, got {a.dtype} and {b.dtype}; "
                         "cast them, or use jnp.dot")
    M, K = a.shape[::-1] if transpose_a else a.shape
    Kb, N = b.shape[::-1] if transpose_b else b.shape
    if K != Kb:
        raise ValueError(f"gemm: op(a) is {(M, K)} and op(b) is {(Kb, N)}: the inner sizes differ "
                         f"(transpose_a={transpose_a}, transpose_b={transpose_b})")
    if max(a.shape + b.shape) >= 2**31:
        raise ValueError(f"gemm: a dimension of {a.shape} or {b.shape} exceeds the BLAS's 32-bit sizes")
    return M, K, N


def gemm(a: jax.Array, b: jax.Array, transpose_a: bool = False, transpose_b: bool = False) -> jax.Array:
    """op(a) @ op(b) on MKL: op(a) (M, K) is a, or a^T for a (K, M) when transpose_a; op(b) (K, N)
    is b, or b^T for b (N, K) when transpose_b; a and b both float32 (sgemm) or both bfloat16 (bf16
    products summed in fp32). Returns (M, N) float32 either way. Not differentiable by itself
    (dense.matmul's custom VJP calls it for each product); needs `available()`. Under vmap the call
    runs once per mapped element."""
    M, _, N = _check(a, b, transpose_a, transpose_b)
    if not available():
        why = ffi._state.get("why") or "the kernel library was built without MKL (pip install mkl-static)"
        raise RuntimeError(f"gemm: the MKL gemm kernel is unavailable ({why}); use jnp.dot")
    target = ffi.GEMM_TARGET if a.dtype == jnp.float32 else ffi.GEMM_BF16_TARGET
    call = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct((M, N), jnp.float32), vmap_method="sequential")
    return call(a, b, transpose_a=bool(transpose_a), transpose_b=bool(transpose_b))
