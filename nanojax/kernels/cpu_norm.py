"""LayerNorm and RMSNorm on the CPU: a fused C++ kernel, forward and backward (csrc/norm.cc).

    y = layer_norm(x, scale, bias, rms=False, eps=1e-5, out_dtype=jnp.bfloat16)
    # x (M, D) float32, scale and bias (D,) -> y (M, D) in out_dtype

`layer_norm` is a `jax.custom_vjp` over two XLA FFI custom calls: the forward returns y and each
row's mean and reciprocal standard deviation (M,), the backward returns dx (float32) and the
gradients of scale and bias. It computes what `nanojax.model.norm` computes, in float32, and
rounds y to bf16 as it stores it when out_dtype is bf16.

Why: XLA:CPU runs a norm's forward and autodiff backward as a dozen passes (YNNPACK row and column
reductions, elementwise fusions between them); the kernel reads each row once per pass while it
sits in L1 (docs/performance/training.md, "The norms").

nanojax.model.norm takes it for a 2-D activation of more than FP32_KERNEL_MAX_ROWS rows (a
training or prefill batch; decode keeps XLA's fusion) when `enabled(d_model)` (the CPU backend,
the kernels built, AVX-512 and d_model a multiple of 16, NANOJAX_NORM_KERNEL not "0", or forced by
`norm_kernel(True)`) and x sits on one device (`use_kernel`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from nanojax.quant import ffi

_FWD, _BWD = tuple(ffi._NORM_TARGETS)
ENV_SWITCH = "NANOJAX_NORM_KERNEL"
MIN_ROWS = ffi.FP32_KERNEL_MAX_ROWS + 1  # a decode step's rows keep XLA's fused norm

# A jit-cache-sensitive switch (a changed value re-traces), so one process can time the kernel
# against XLA's norm: `with norm_kernel(False): ...`. None: the environment decides.
_NORM_KERNEL = jax.make_user_context(default_value=None)


def norm_kernel(enabled: bool | None):
    """Context manager: force the norm kernel on (where it can run) or off inside it.

    Functions jitted earlier are re-traced for the new value (NANOJAX_NORM_KERNEL is read at trace
    time only, so it cannot A/B two runs in one process)."""
    if enabled is not None and not isinstance(enabled, bool):
        raise TypeError(f"norm_kernel: enabled must be True, False or None, got {enabled!r}")
    return _NORM_KERNEL(enabled)


def available(d_model: int) -> bool:
    """True when the kernel runs its AVX-512 loops for this width here: the CPU backend, the
    kernel library built and loaded, an AVX-512 CPU and d_model a multiple of 16. (Its scalar
    loops are for tests: slower than XLA.)"""
    return (jax.default_backend() == "cpu" and ffi._load()
            and ffi._state["lib"].nj_norm_vector_bits(int(d_model)) == 512)


def enabled(d_model: int) -> bool:
    """`available(d_model)`, and neither `norm_kernel(False)` nor NANOJAX_NORM_KERNEL=0 (read at
    trace time) has switched it off (`norm_kernel(True)` overrides the environment)."""
    force = _NORM_KERNEL.value
    if force is False or (force is None and ffi._switched_off(ENV_SWITCH)):
        return False
    return available(d_model)


def use_kernel(x: jax.Array) -> bool:
    """Whether nanojax.model.norm runs x (M, D) on the kernel: float32 or bfloat16 x of more than
    FP32_KERNEL_MAX_ROWS rows, `enabled(D)`, not under a sharded trace and x on one device (the
    custom call sees each array whole; inside jax.shard_map the arrays are the local shards)."""
    from nanojax.dense import whole_on_one_device

    return (x.ndim == 2 and x.shape[0] >= MIN_ROWS and x.dtype in (jnp.float32, jnp.bfloat16)
            and whole_on_one_device(x) and enabled(x.shape[1]))


def _forward(x, scale, bias, rms, eps, out_dtype):
    M, D = x.shape
    call = jax.ffi.ffi_call(_FWD, (jax.ShapeDtypeStruct((M, D), out_dtype),
                                   jax.ShapeDtypeStruct((M,), jnp.float32),
                                   jax.ShapeDtypeStruct((M,), jnp.float32)), vmap_method="sequential")
    return call(x, scale, bias, rms=rms, eps=np.float32(eps))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _norm(x, scale, bias, rms, eps, out_dtype):
    return _forward(x, scale, bias, rms, eps, out_dtype)[0]


def _norm_fwd(x, scale, bias, rms, eps, out_dtype):
    y, mean, rstd = _forward(x, scale, bias, rms, eps, out_dtype)
    return y, (x, scale, mean, rstd)


def _norm_bwd(rms, eps, out_dtype, res, dy):
    x, scale, mean, rstd = res
    call = jax.ffi.ffi_call(_BWD, (jax.ShapeDtypeStruct(x.shape, jnp.float32),
                                   jax.ShapeDtypeStruct(scale.shape, jnp.float32),
                                   jax.ShapeDtypeStruct(scale.shape, jnp.float32)), vmap_method="sequential")
    return call(x, scale, mean, rstd, dy, rms=rms)


_norm.defvjp(_norm_fwd, _norm_bwd)


def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array | None = None, *, rms: bool = False,
               eps: float = 1e-5, out_dtype=jnp.float32) -> jax.Array:
    """LayerNorm (rms=False) or RMSNorm (rms=True, no bias) of x's rows on the kernel, differentiable.

    x float32 or bfloat16 (M, D) (computed in float32), scale and bias (D,) (any float dtype, used in
    float32; bias None: zeros). Returns (M, D) in out_dtype (float32 or bfloat16, rounded to nearest
    even once). Gradients: x's in x's dtype, scale's and bias's in theirs. Needs the kernels
    (`nanojax.quant.ffi.kernels_available()`); the scalar loops run where AVX-512 or D % 16 == 0 is
    missing.
    """
    if x.ndim != 2 or scale.shape != (x.shape[1],) or (bias is not None and bias.shape != scale.shape):
        raise ValueError(f"layer_norm: need x (M, D) and scale, bias (D,), got {x.shape}, {scale.shape}, "
                         f"{None if bias is None else bias.shape}")
    if rms and bias is not None:
        raise ValueError("layer_norm: RMSNorm (rms=True) has no bias")
    out_dtype = jnp.dtype(out_dtype)
    if out_dtype not in (jnp.float32, jnp.bfloat16):
        raise ValueError(f"layer_norm: out_dtype must be float32 or bfloat16, got {out_dtype}")
    if not ffi._load():
        raise RuntimeError(f"layer_norm: the CPU kernels are unavailable ({ffi._state.get('why')}); "
                           "build them with `make kernels`, or use nanojax.model.norm")
    b = jnp.zeros_like(scale, jnp.float32) if bias is None else bias.astype(jnp.float32)
    return _norm(x.astype(jnp.float32), scale.astype(jnp.float32), b, bool(rms), float(eps), out_dtype)
