"""Training-sized matrix products on the CPU through Intel MKL or oneDNN (csrc/gemm.cc).

    c = gemm(a, b)                          # a (M, K) @ b (K, N) -> (M, N), float32
    c = gemm(a, b, transpose_b=True)        # a (M, K) @ b^T, b (N, K): the dense backward's g @ w^T
    c = gemm(a, b, transpose_a=True)        # a^T @ b, a (K, M): the weight gradient x^T @ g

a and b both float32 (MKL's sgemm) or both bfloat16 (MKL's bf16 gemm or oneDNN's bf16 matmul:
bf16 products summed in fp32, on AMX or AVX512_BF16); c is float32, or bfloat16 with
out_dtype=jnp.bfloat16 (rounded once from the fp32 sums).

Why: at the quickstart's shapes (768 x 128 x 512) XLA:CPU's dot runs the dense layer's products at
60-175 GFLOP/s on two Sapphire Rapids cores, MKL's sgemm at 190-280, and XLA's bf16 dot is no
faster than its fp32 one while MKL's bf16 gemm runs 2-4x its sgemm (docs/performance/training.md, "Training
GEMMs on MKL"). On an AMD Zen 5 the picture differs: XLA's fp32 dot beats MKL (which takes slow
paths on AMD) and oneDNN's bf16 matmul runs at ~2x XLA's fp32 dot, while XLA's own bf16 dot is fast
only untransposed ("AMD EPYC, Zen 5"). So the library is chosen per CPU family and dtype
(MEASURED, `library`); for bf16 the user can pick one instead (NANOJAX_GEMM_BF16_LIB=mkl|onednn, or
`bf16_library(name)` around a trace), e.g. to time the two on a CPU where both run.
`nanojax.dense.matmul` sends its forward and both backward products here
when `use_gemm_kernel` says so; the kernel splits the output over the caller and XLA's intra-op
pool, one single-threaded library call per block, and reads transposed operands in place.

MKL comes from the optional `mkl-static` package (`pip install 'nanojax[mkl]'`), linked statically
into the kernel library with its symbols kept local; oneDNN from `onednn-cpu-gomp` and its headers'
`onednn-devel-cpu-gomp` (`pip install 'nanojax[onednn]'`), linked as a shared library. `make
install` adds both on x86-64 Linux. Without them the library builds without a BLAS and XLA's dot
runs, with the same numbers to rounding."""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp

from nanojax.quant import ffi

ENV_SWITCH = "NANOJAX_GEMM_KERNEL"
BF16_LIB_ENV = "NANOJAX_GEMM_BF16_LIB"  # "mkl" or "onednn": bf16 products there, whatever MEASURED says
LIBRARIES = ("mkl", "onednn")
# CPU family -> dtype -> the library the kernel runs that dtype's products on there by default,
# each measured faster than XLA's dot on that family (docs/performance/training.md, "Training GEMMs on MKL"
# and "AMD EPYC, Zen 5"); a dtype or family not listed stays on XLA's dot unless
# NANOJAX_GEMM_KERNEL=1 or gemm_kernel(True) asks for the kernel.
MEASURED = {
    "intel-avx512": {"float32": "mkl", "bfloat16": "mkl"},  # Sapphire Rapids: MKL, AMX for bf16
    # Zen 5: XLA's fp32 dot ran the GPT-2 step at 1.9x MKL's sgemm (MKL takes slow paths on AMD);
    # oneDNN's bf16 matmul runs at ~2x XLA's fp32 dot, MKL's bf16 gemm at ~0.4x.
    "amd-avx512": {"bfloat16": "onednn"},
}
# Below this many rows of x the decode-sized fp32 kernel (dense.use_fp32_kernel) or XLA's dot runs.
MIN_ROWS = ffi.FP32_KERNEL_MAX_ROWS + 1

# A jit-cache-sensitive switch (a changed value re-traces), so one process can time the kernel
# against XLA's dot: `with gemm_kernel(False): ...`. None: the environment and the CPU decide.
_GEMM_KERNEL = jax.make_user_context(default_value=None)
# The same kind of switch for the library of bf16 products (bf16_library).
_BF16_LIBRARY = jax.make_user_context(default_value=None)


def gemm_kernel(enabled: bool | None):
    """Context manager: force the gemm kernel on (where a library for the dtype is built in) or off
    inside it.

    Functions jitted earlier are re-traced for the new value (NANOJAX_GEMM_KERNEL is read at trace
    time only, so it cannot A/B two runs in one process)."""
    if enabled is not None and not isinstance(enabled, bool):
        raise TypeError(f"gemm_kernel: enabled must be True, False or None, got {enabled!r}")
    return _GEMM_KERNEL(enabled)


def bf16_library(name: str | None):
    """Context manager: bf16 products traced inside it run on `name` ("mkl" or "onednn") in place of
    MEASURED's choice for this CPU (even where MEASURED lists none); None: NANOJAX_GEMM_BF16_LIB, then
    MEASURED, decide. `gemm_kernel(False)` / NANOJAX_GEMM_KERNEL=0 still win. Tracing a bf16 product
    raises if `name` has no bf16 handler here (not built in, or no AVX512_BF16). Functions jitted
    earlier are re-traced for the new value."""
    if name is not None and name not in LIBRARIES:
        raise ValueError(f"bf16_library: name must be one of {LIBRARIES} or None, got {name!r}")
    return _BF16_LIBRARY(name)


def _bf16_pick() -> str | None:
    """The library asked for bf16 products (bf16_library, else NANOJAX_GEMM_BF16_LIB), or None."""
    name = _BF16_LIBRARY.value or os.environ.get(BF16_LIB_ENV) or None
    if name is not None and name not in LIBRARIES:
        raise ValueError(f"{BF16_LIB_ENV}={name!r}: expected one of {LIBRARIES} (or unset: the measured "
                         "choice for this CPU)")
    return name


def built() -> tuple[str, ...]:
    """The libraries the kernel can call here, of LIBRARIES: on the CPU backend, "mkl" where the
    kernel library was built with MKL, "onednn" where with oneDNN; () otherwise."""
    if jax.default_backend() != "cpu" or not ffi._load():
        return ()
    return tuple(lib for lib, ok in (("mkl", ffi._state.get("gemm_blas") == "mkl"),
                                     ("onednn", ffi._state.get("gemm_onednn", False))) if ok)


def _forced() -> bool | None:
    force = _GEMM_KERNEL.value
    if force is None:
        env = os.environ.get(ENV_SWITCH, "")
        force = True if env == "1" else False if ffi._switched_off(ENV_SWITCH) else None
    return force


def _runs(lib: str, dtype: str) -> bool:
    """Whether `lib` has a handler for `dtype` products on this CPU (bf16 needs AVX512_BF16)."""
    if dtype == "bfloat16":
        return lib in LIBRARIES and "avx512_bf16" in (_cpu().flags or ())
    return dtype == "float32" and lib == "mkl"


def _usable(dtype: str) -> list[str]:
    """The built libraries with a handler for `dtype` products on this CPU, in LIBRARIES' order."""
    return [lib for lib in built() if _runs(lib, dtype)]


def library(dtype) -> str | None:
    """The library `dtype` (float32 or bfloat16) products run on, read at trace time: MEASURED's
    choice for this CPU's family where it is built in; when forced on (`gemm_kernel(True)`,
    NANOJAX_GEMM_KERNEL=1) that, else any built library with a handler for the dtype; None (XLA's
    dot) when none fits or `gemm_kernel(False)` / NANOJAX_GEMM_KERNEL=0 switched it off. For bf16,
    a library asked for by `bf16_library` or NANOJAX_GEMM_BF16_LIB comes first (an error if it has
    no bf16 handler here)."""
    force = _forced()
    name = jnp.dtype(dtype).name
    if force is False:
        return None
    have = _usable(name)
    pick = _bf16_pick() if name == "bfloat16" else None
    if pick is not None:
        if pick not in have:
            raise RuntimeError(f"{BF16_LIB_ENV} / bf16_library asks for {pick} bf16 products, which do not "
                               f"run here (built: {list(built()) or 'neither'}; bf16 needs AVX512_BF16); "
                               "unset it for the measured choice")
        return pick
    chosen = MEASURED.get(_family(), {}).get(name)
    if chosen in have:
        return chosen
    return have[-1] if force and have else None  # forced: oneDNN before MKL for bf16


@functools.cache
def _cpu():  # -> xla_env.CpuInfo, read once: the routing asks at every traced product
    from nanojax import xla_env

    return xla_env.read_cpuinfo()


def _family() -> str:
    from nanojax import xla_env

    return xla_env.isa_family(_cpu())


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


def gemm(a: jax.Array, b: jax.Array, transpose_a: bool = False, transpose_b: bool = False,
         lib: str | None = None, out_dtype: jnp.dtype = jnp.float32) -> jax.Array:
    """op(a) @ op(b) on `lib` ("mkl" or "onednn"; None: `library(a.dtype)`, else any built one):
    op(a) (M, K) is a, or a^T for a (K, M) when transpose_a; op(b) (K, N) is b, or b^T for b (N, K)
    when transpose_b; a and b both float32 (MKL's sgemm) or both bfloat16 (bf16 products summed in
    fp32). Returns (M, N) in out_dtype: the fp32 sums, rounded to bfloat16 where asked (by oneDNN
    as it stores them, else by a cast). Not differentiable by itself (dense.matmul's custom VJP
    calls it for each product). Under vmap the call runs once per mapped element."""
    M, _, N = _check(a, b, transpose_a, transpose_b)
    name = jnp.dtype(a.dtype).name
    usable = _usable(name)
    if lib is None:
        lib = library(a.dtype) or (usable[-1] if usable else None)  # as library() when forced on
    if lib not in usable:
        needs = "AVX512_BF16 and MKL or oneDNN" if name == "bfloat16" else "MKL"
        have = list(built()) or "neither MKL nor oneDNN"
        why = ffi._state.get("why") or f"built with {have}; {name} needs {needs}"
        raise RuntimeError(f"gemm: no {lib or 'library'} gemm kernel for {name} here ({why}); "
                           "pip install 'nanojax[mkl,onednn]', or use jnp.dot")
    target = {("mkl", "float32"): ffi.GEMM_TARGET, ("mkl", "bfloat16"): ffi.GEMM_BF16_TARGET,
              ("onednn", "bfloat16"): ffi.GEMM_BF16_DNNL_TARGET}[lib, name]
    out_dtype = jnp.dtype(out_dtype)
    if out_dtype not in (jnp.float32, jnp.bfloat16):
        raise ValueError(f"gemm: out_dtype must be float32 or bfloat16, got {out_dtype}")
    stored = out_dtype if lib == "onednn" else jnp.float32  # MKL stores fp32 only
    call = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct((M, N), stored), vmap_method="sequential")
    return call(a, b, transpose_a=bool(transpose_a), transpose_b=bool(transpose_b)).astype(out_dtype)
