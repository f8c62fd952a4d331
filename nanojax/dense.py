"""The one matmul seam: every weight matrix the model applies goes through `dense`.

A weight is stored in whatever shape reads best for its logical axes (wq: (D, N, H),
wo: (N, H, D), w_up: (D, F)); `dense` views it as the 2-D (I, O) matrix the activation needs,
with I the activation's last dim. Plain arrays take the custom-VJP matmul below. Anything else
that stands for a matrix (a quantized record, ...) is a `Weight`: it knows how to multiply itself,
so the model has no branch per storage format and a new format is one new record, not an edit of
model.py.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import jax
import jax.numpy as jnp


@runtime_checkable
class Weight(Protocol):
    """A matrix stored some other way than as a plain array (e.g. quantized).

    `matmul(x, dtype)`: x (M, I) -> (M, O) in `dtype`, the compute dtype.
    """

    def matmul(self, x: jax.Array, dtype: jnp.dtype) -> jax.Array: ...


@runtime_checkable
class Table(Protocol):
    """An embedding table (V, D) stored some other way than as a plain array.

    `lookup(ids, dtype)`: int ids (...) -> rows (..., D) in `dtype`; `.T` is the tied head, a
    `Weight` of logical shape (D, V)."""

    def lookup(self, ids: jax.Array, dtype: jnp.dtype) -> jax.Array: ...


def lookup(table: jax.Array | Table, ids: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """Rows of an embedding table: ids int (...) -> (..., D). A plain array's rows keep its dtype
    (the caller casts once, after adding positions); a `Table` dequantizes them into `dtype`."""
    if isinstance(table, Table):
        return table.lookup(ids, dtype)
    return jnp.take(table, ids, axis=0)


def dense(x: jax.Array, w: jax.Array | Weight, dtype: jnp.dtype) -> jax.Array:
    """x (M, I) @ w -> (M, O) in the compute dtype.

    w: a plain array whose leading dims multiply to I (viewed as (I, O) and cast to `dtype`),
    or a `Weight` record, which does its own product.
    """
    if isinstance(w, Weight):
        return w.matmul(x, dtype)
    return matmul(x, _compute_weight(x, w.reshape(x.shape[-1], -1), dtype))


def _compute_weight(x: jax.Array, w: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """w as the product takes it: cast to the compute dtype, except an fp32 master of bf16 x that
    the gemm kernel takes as it is (matmul's VJP casts it, and its gradient stays fp32)."""
    return w if x.dtype == dtype and use_gemm_kernel(x, w) else w.astype(dtype)


def dense_transposed(x: jax.Array, table: jax.Array | Table, dtype: jnp.dtype) -> jax.Array:
    """x (M, I) @ table.T -> (M, O) in the compute dtype, for a table stored (O, I): the tied head.

    Where the gemm kernel runs (`use_gemm_kernel`), all three products read the table in its
    own layout (`matmul_transposed`), so neither the forward nor the gradient copies a transposed
    (I, O) table (at GPT-2 124M two 154 MB transposes a step); otherwise it is dense(x, table.T)."""
    if isinstance(table, Table):
        return dense(x, table.T, dtype)
    table_c = _compute_weight(x, table, dtype)
    if not use_gemm_kernel(x, table_c):  # (its checks hold for table_c.T too)
        return dense(x, table.T, dtype)
    return matmul_transposed(x, table_c)


# A jit-cache-sensitive switch (a changed value re-traces), so one process can time the kernel
# against XLA's dot: `with fp32_kernel(False): ...`. None: NANOJAX_FP32_KERNEL decides.
_FP32_KERNEL = jax.make_user_context(default_value=None)


def fp32_kernel(enabled: bool | None):
    """Context manager: force the small-M fp32 CPU kernel on (where it can run) or off inside it.

    Functions jitted earlier are re-traced for the new value, so A/B timing in one process works
    (environment variables are read at trace time only, so they cannot do that)."""
    if enabled is not None and not isinstance(enabled, bool):
        raise TypeError(f"fp32_kernel: enabled must be True, False or None, got {enabled!r}")
    return _FP32_KERNEL(enabled)


def _local(w: jax.Array) -> bool:
    """True when w is not laid out over several devices (so a per-device custom call sees it whole).

    Traced under jit, only an explicit-mode sharding is visible here; the automatic sharded paths
    are recognised by the activation constraint they install while tracing (nanojax.sharding)."""
    if isinstance(w, jax.core.Tracer):
        spec = getattr(getattr(jax.typeof(w), "sharding", None), "spec", None)
        return spec is None or all(s is None for s in spec)
    sharding = getattr(w, "sharding", None)  # numpy and other host arrays: one place
    return sharding is None or len(sharding.device_set) <= 1


def whole_on_one_device(*arrays: jax.Array) -> bool:
    """Whether a per-device custom call would see these arrays whole: no sharded step is being
    traced (nanojax.sharding's activation constraint) and none is laid out over several devices.
    Inside jax.shard_map (train/manual.py) the arrays are the local shards, which a kernel may take.
    The CPU kernels' routing (the fp32 and gemm products here, the training attention) asks it."""
    from nanojax.model import ACTIVATION_CONSTRAINT  # model imports this module

    return ACTIVATION_CONSTRAINT.get() is None and all(_local(a) for a in arrays)


def use_fp32_kernel(x: jax.Array, w: jax.Array) -> bool:
    """Whether `matmul` sends x @ w to the fp32 CPU kernel (nanojax.quant.ffi.fp32_matmul).

    Yes for a decode-sized product: x (M, I) with 1 <= M <= FP32_KERNEL_MAX_ROWS (32), x and w float32, the
    CPU backend with the kernels built, not under a sharded trace, w on one device. No under
    NANOJAX_NO_KERNELS=1, NANOJAX_FP32_KERNEL=0 (read at trace time) or `with fp32_kernel(False)`.
    XLA:CPU runs a layer-sized matrix-vector dot on one thread; the kernel splits it over both
    (docs/performance/decode.md)."""
    from nanojax.quant import ffi

    if _FP32_KERNEL.value is False:
        return False
    return (x.ndim == 2 and w.ndim == 2 and 1 <= x.shape[0] <= ffi.FP32_KERNEL_MAX_ROWS
            and x.dtype == jnp.float32 and w.dtype == jnp.float32 and whole_on_one_device(w)
            and ffi.fp32_kernel_enabled(force=_FP32_KERNEL.value is True))


def use_gemm_kernel(x: jax.Array, w: jax.Array) -> bool:
    """Whether `matmul` runs x @ w and both backward products on the gemm kernel
    (nanojax.kernels.cpu_gemm: MKL or oneDNN): x (M, I) with M > FP32_KERNEL_MAX_ROWS (a training
    or prefill batch), x and w both float32 or both bfloat16, or x bfloat16 and w its fp32 master
    (`--dtype=bfloat16`'s mixed precision: the products cast w, and its gradient stays fp32), not
    under a sharded trace, w on one device, and `cpu_gemm.library(x.dtype)` names
    a library (built in, and measured faster on this CPU family or NANOJAX_GEMM_KERNEL=1; none
    with NANOJAX_GEMM_KERNEL=0 or `with cpu_gemm.gemm_kernel(False)`)."""
    from nanojax.kernels import cpu_gemm

    master = x.dtype == jnp.bfloat16 and w.dtype == jnp.float32  # mixed precision's fp32 weights
    return (x.ndim == 2 and w.ndim == 2 and x.shape[0] >= cpu_gemm.MIN_ROWS
            and (x.dtype == w.dtype or master) and x.dtype in (jnp.float32, jnp.bfloat16)
            and whole_on_one_device(w) and cpu_gemm.library(x.dtype) is not None)


def _product(x: jax.Array, w: jax.Array) -> jax.Array:
    if use_fp32_kernel(x, w):
        from nanojax.quant import ffi

        return ffi.fp32_matmul(x, w)
    if use_gemm_kernel(x, w):
        from nanojax.kernels import cpu_gemm

        return cpu_gemm.gemm(x, w.astype(x.dtype), out_dtype=x.dtype)
    return x @ w


@jax.custom_vjp
def matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """(M, I) @ (I, O) -> (M, O).

    A custom VJP writes the weight gradient as an explicit 2-D matmul of a transposed operand;
    the dot XLA derives (contracting dim 0 of both sides) missed the fast CPU matmul library.
    The forward of a decode-sized fp32 product runs the C++ kernel (`use_fp32_kernel`); a
    training-sized one runs all three products on the gemm kernel (MKL or oneDNN) where
    `use_gemm_kernel` says so (the transposes read in place); everything else is XLA's dots.
    """
    return _product(x, w)


def _matmul_fwd(x, w):
    wc = w.astype(x.dtype)  # w itself unless it is bf16 x's fp32 master (then the kernel's)
    return _product(x, wc), (x, wc, w)  # w: for its dtype only (the caller's array, no copy)


def _matmul_bwd(res, g):
    x, wc, w = res
    if g.dtype == x.dtype and use_gemm_kernel(x, wc):
        from nanojax.kernels import cpu_gemm

        # The weight gradient leaves the kernel in w's dtype: an fp32 master's is never rounded
        # to bf16 (nor cast back, a pass over every weight).
        return (cpu_gemm.gemm(g, wc, transpose_b=True, out_dtype=x.dtype),
                cpu_gemm.gemm(x, g, transpose_a=True, out_dtype=w.dtype))
    return g @ wc.T, (x.T @ g).astype(w.dtype)


matmul.defvjp(_matmul_fwd, _matmul_bwd)


@jax.custom_vjp
def matmul_transposed(x: jax.Array, table: jax.Array) -> jax.Array:
    """(M, I) @ (O, I).T -> (M, O) in x's dtype on the gemm kernel (nanojax.kernels.cpu_gemm),
    the table read in place; the gradients are the kernel's products too (table's in its (O, I)
    layout). x and table both float32 or both bfloat16, or x bfloat16 and table its fp32 master
    (cast here; its gradient stays fp32).
    Needs `cpu_gemm.library(x.dtype)`: `dense_transposed` checks `use_gemm_kernel` first."""
    return _transposed_product(x, table)


def _transposed_product(x, table):
    from nanojax.kernels import cpu_gemm

    return cpu_gemm.gemm(x, table.astype(x.dtype), transpose_b=True, out_dtype=x.dtype)


def _matmul_transposed_fwd(x, table):
    tc = table.astype(x.dtype)  # as _matmul_fwd: a bf16 copy of an fp32 master table
    return _transposed_product(x, tc), (x, tc, table)


def _matmul_transposed_bwd(res, g):
    from nanojax.kernels import cpu_gemm

    x, tc, table = res
    g = g.astype(x.dtype)
    return (cpu_gemm.gemm(g, tc, out_dtype=x.dtype),
            cpu_gemm.gemm(g, x, transpose_a=True, out_dtype=table.dtype))


matmul_transposed.defvjp(_matmul_transposed_fwd, _matmul_transposed_bwd)
