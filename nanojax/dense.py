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
    return matmul(x, w.reshape(x.shape[-1], -1).astype(dtype))


@jax.custom_vjp
def matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """(M, I) @ (I, O) -> (M, O).

    A custom VJP writes the weight gradient as an explicit 2-D matmul of a transposed operand;
    the dot XLA derives (contracting dim 0 of both sides) missed the fast CPU matmul library.
    """
    return x @ w


def _matmul_fwd(x, w):
    return x @ w, (x, w)


def _matmul_bwd(res, g):
    x, w = res
    return g @ w.T, (x.T @ g).astype(w.dtype)


matmul.defvjp(_matmul_fwd, _matmul_bwd)
