"""Causal training attention on the CPU: a fused C++ kernel, forward and backward (csrc/fattn.cc).

    out = causal_attention(q, k, v)   # q (B, T, N, H), k, v (B, T, K, H) float32 -> (B, T, N, H)

`causal_attention` is a `jax.custom_vjp` over two XLA FFI custom calls: the forward returns the
output and each row's logsumexp (B, N, T), the backward recomputes the probabilities from it
(FlashAttention-2's backward, Dao 2023) and returns dq, dk, dv. Query t sees keys s <= t (T == S,
training or a prefill from position 0); query head n uses kv head n // (N // K); scale H^-0.5.

Why: XLA:CPU runs training attention as batched dots at ~17-54 GFLOP/s with the mask, softmax and
transposes as separate passes over (T, T) scores; the kernel does a (batch row, kv head) in one
pass that stays in cache, on both cores (docs/attention.md, docs/performance/training.md).

nanojax.attention's impl="auto" takes it on the CPU for float32 with no explicit mask when
`enabled(head_dim)` (AVX-512, kernels built, NANOJAX_TRAIN_ATTN_KERNEL not "0", or forced by
`train_attention_kernel(True)`) and the arrays sit on one device (attention.use_cpu_kernel).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from nanojax.quant import ffi

_FWD, _BWD = tuple(ffi._TRAIN_ATTN_TARGETS)
ENV_SWITCH = "NANOJAX_TRAIN_ATTN_KERNEL"

# A jit-cache-sensitive switch (a changed value re-traces), so one process can time the kernel
# against XLA's attention: `with train_attention_kernel(False): ...`. None: the environment decides.
_TRAIN_ATTN_KERNEL = jax.make_user_context(default_value=None)


def train_attention_kernel(enabled: bool | None):
    """Context manager: force the training attention kernel on (where it can run) or off inside it.

    Functions jitted earlier are re-traced for the new value (NANOJAX_TRAIN_ATTN_KERNEL is read at
    trace time only, so it cannot A/B two runs in one process)."""
    if enabled is not None and not isinstance(enabled, bool):
        raise TypeError(f"train_attention_kernel: enabled must be True, False or None, got {enabled!r}")
    return _TRAIN_ATTN_KERNEL(enabled)


def available(head_dim: int) -> bool:
    """True when the kernel runs its AVX-512 loops for this head size here: the CPU backend, the
    kernel library built and loaded, an AVX-512 CPU and head_dim a multiple of 16. (The scalar
    loops it has otherwise are for tests: slower than XLA.)"""
    return (jax.default_backend() == "cpu" and ffi._load()
            and ffi._state["lib"].nj_fattn_vector_bits(int(head_dim)) == 512)


def enabled(head_dim: int) -> bool:
    """Whether nanojax.attention may route causal fp32 attention here: `available(head_dim)`, and
    neither `train_attention_kernel(False)` nor NANOJAX_TRAIN_ATTN_KERNEL=0 (read at trace time)
    has switched it off (`train_attention_kernel(True)` overrides the environment)."""
    force = _TRAIN_ATTN_KERNEL.value
    if force is False or (force is None and ffi._switched_off(ENV_SWITCH)):
        return False
    return available(head_dim)


def exp_max_ulp_error(lo: float = -87.0, hi: float = 0.0, points: int = 1 << 20) -> float:
    """The kernel's vectorised exp against double-precision exp: the largest error in units of the
    float spacing at the exact value, over `points` evenly spaced x in [lo, hi] (the softmax's
    inputs are <= 0). -1.0 without AVX-512."""
    if not ffi._load():
        raise RuntimeError(f"exp_max_ulp_error: the CPU kernels are unavailable ({ffi._state.get('why')})")
    fn = ffi._state["lib"].nj_fattn_exp_max_ulp
    import ctypes

    fn.restype, fn.argtypes = ctypes.c_double, [ctypes.c_float, ctypes.c_float, ctypes.c_int64]
    return float(fn(lo, hi, points))


def _check(q: jax.Array, k: jax.Array, v: jax.Array) -> None:
    if q.ndim != 4 or k.ndim != 4 or k.shape != v.shape:
        raise ValueError(f"causal_attention: need q (B, T, N, H) and k, v (B, T, K, H), got {q.shape}, "
                         f"{k.shape}, {v.shape}")
    B, T, N, H = q.shape
    if k.shape[0] != B or k.shape[1] != T or k.shape[3] != H:
        raise ValueError(f"causal_attention: k and v {k.shape} must share q's batch, length and head size "
                         f"{(B, T, '-', H)} (the kernel is causal self-attention, T == S; use "
                         "nanojax.attention.attention(impl='xla') for a cache or a mask)")
    if N % k.shape[2]:
        raise ValueError(f"causal_attention: N = {N} query heads must be a multiple of K = {k.shape[2]} "
                         "kv heads")
    if not (q.dtype == k.dtype == v.dtype == jnp.float32):
        raise ValueError(f"causal_attention: q, k, v must be float32, got {q.dtype}, {k.dtype}, {v.dtype}; "
                         "use nanojax.attention.attention for other dtypes")


def _forward(q, k, v):
    B, T, N, H = q.shape
    call = jax.ffi.ffi_call(_FWD, (jax.ShapeDtypeStruct(q.shape, jnp.float32),
                                   jax.ShapeDtypeStruct((B, N, T), jnp.float32)), vmap_method="sequential")
    return call(q, k, v)


@jax.custom_vjp
def _attention(q, k, v):
    return _forward(q, k, v)[0]


def _attention_fwd(q, k, v):
    out, lse = _forward(q, k, v)
    return out, (q, k, v, out, lse)


def _attention_bwd(res, dout):
    q, k, v, out, lse = res
    call = jax.ffi.ffi_call(_BWD, (jax.ShapeDtypeStruct(q.shape, jnp.float32),
                                   jax.ShapeDtypeStruct(k.shape, jnp.float32),
                                   jax.ShapeDtypeStruct(v.shape, jnp.float32)), vmap_method="sequential")
    return call(q, k, v, out, lse, dout.astype(jnp.float32))


_attention.defvjp(_attention_fwd, _attention_bwd)


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Causal self-attention on the CPU kernel, differentiable.

    q float32 (B, T, N, H); k, v float32 (B, T, K, H), K dividing N. Returns float32 (B, T, N, H):
    out[b, t, n] = softmax_{s <= t}(q[b, t, n] . k[b, s, n // G] / sqrt(H)) v[b, s, n // G], G = N // K.
    The gradient is the kernel's backward. Runs wherever the library loads (the scalar loops when
    AVX-512 or H % 16 == 0 is missing); needs the kernels (`nanojax.quant.ffi.kernels_available()`).
    Under vmap the calls run once per mapped element (sequential).
    """
    _check(q, k, v)
    if not ffi._load():
        raise RuntimeError(f"causal_attention: the CPU kernels are unavailable ({ffi._state.get('why')}); "
                           "build them with `make kernels`, or use nanojax.attention.attention(impl='xla')")
    return _attention(q, k, v)


def logsumexp(q: jax.Array, k: jax.Array, v: jax.Array) -> np.ndarray:
    """The forward's per-row logsumexp of the scaled scores, float32 (B, N, T) (for tests)."""
    _check(q, k, v)
    return np.asarray(_forward(q, k, v)[1])
