"""Quantized weight records: pytrees that stand for a float matrix and multiply themselves.

The layout (shared with the C++ kernels of nanojax/quant/ffi.py; it is ggml/llama.cpp's): a weight
of logical (I, O) shape -- the model computes x (M, I) @ W (I, O), nanojax/dense.py -- is stored
OUT-MAJOR, so a matrix-vector product reads each output's row contiguously:

    int8  q      int8  (O, I)        W[i, o] = q[o, i] * scale[o, i // G]
    int4  q      uint8 (O, I // 2)   byte j of row o: element 2j in the low nibble, 2j+1 in the high
                                     one, each stored as value + 8 (value in [-8, 7])
          scale  (O, I // G)         in the compute dtype; G = I is one scale per output channel

`QuantizedMatrix` is a `nanojax.dense.Weight`: `dense(x, w, dtype)` calls `w.matmul(x, dtype)`.
`QuantizedTable` is an embedding table (V, D) held as the matrix of its tied head (D, V): the
lookup gathers and dequantizes only the rows asked for, and `.T` is the head, so one record
serves both. Static fields (bits, group size, stored shape) are pytree metadata, not leaves.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

try:  # the C++ kernels (another part of issue 12); without them every product is pure JAX
    from nanojax.quant import ffi as _ffi
except ImportError:  # pragma: no cover - depends on which parts are installed
    _ffi = None

INT4_GROUPS = (32, 64, 128)


@struct.dataclass
class QuantizedMatrix:
    """A weight of stored shape `shape` (e.g. wq (D, N, H)) viewed as the matrix (I, O), quantized.

    q: int8 (O, I) for bits=8, uint8 (O, I // 2) for bits=4; scale: (O, I // group_size).
    `in_features` I is the product of the stored shape's leading dims that the activation
    contracts (1 for (D, F), 2 for wo (N, H, D)), O the rest.
    """

    q: jax.Array
    scale: jax.Array
    bits: int = struct.field(pytree_node=False)
    group_size: int = struct.field(pytree_node=False)
    shape: tuple[int, ...] = struct.field(pytree_node=False)
    # What the CPU kernel does with x: "fp32" keeps it exact (the pure-JAX path's numbers);
    # "int8" rounds it to int8 per 32-block and multiplies in integers on AVX-512 VNNI
    # (llama.cpp's q8_0 activations: ~2x faster int4 decode, ~0.5-1% output error; ffi.py).
    kernel_activations: str = struct.field(pytree_node=False, default="fp32")

    @property
    def in_features(self) -> int:
        return self.q.shape[1] * (8 // self.bits)

    @property
    def out_features(self) -> int:
        return self.q.shape[0]

    @property
    def dtype(self) -> jnp.dtype:
        return self.scale.dtype

    @property
    def nbytes(self) -> int:
        """Bytes held: the packed values plus the scales."""
        return int(self.q.nbytes + self.scale.nbytes)

    def values(self) -> jax.Array:
        """The integer values, int8 (O, I) (int4 unpacked to [-8, 7])."""
        return unpack_values(self.q, self.bits)

    def dequantize_t(self, dtype: jnp.dtype = jnp.float32) -> jax.Array:
        """W transposed, (O, I) in `dtype`: q * scale, group by group."""
        return dequantize_rows(self.values(), self.scale, self.group_size, dtype)

    def dequantize(self, dtype: jnp.dtype = jnp.float32) -> jax.Array:
        """The float weight in its stored shape (e.g. (D, N, H)), in `dtype`."""
        return self.dequantize_t(dtype).T.reshape(self.shape)

    def matmul(self, x: jax.Array, dtype: jnp.dtype) -> jax.Array:
        """x (M, I) @ W -> (M, O) in `dtype`.

        On the CPU backend the fused kernels of nanojax.quant.ffi read the packed weights when
        they are built. Elsewhere: dequantize, then one dot -- on GPU XLA fuses the convert and
        the scale multiply into the dot's operand, so no full-width float copy is made
        (tests/test_gpu.py checks the compiled temp memory). A per-channel scale multiplies the
        (M, O) result instead, leaving the dot only a convert to fuse."""
        x = x.astype(dtype)
        if _use_kernels():
            fn = _ffi.int8_matmul if self.bits == 8 else _ffi.int4_matmul
            return fn(x, self.q, self.scale, self.group_size,
                      activations=self.kernel_activations).astype(dtype)
        dims = (((1,), (1,)), ((), ()))  # x (M, I) . w (O, I) -> (M, O)
        if self.group_size == self.in_features:  # one scale per output: applied after the dot
            y = jax.lax.dot_general(x, self.values().astype(dtype), dims)
            return y * self.scale[:, 0].astype(dtype)
        return jax.lax.dot_general(x, self.dequantize_t(dtype), dims)

    @property
    def T(self) -> QuantizedTable:  # noqa: N802 - mirrors ndarray.T
        """The table this matrix is the head of: (O, I) rows, e.g. a tied head (D, V) -> (V, D)."""
        return QuantizedTable(self)


@struct.dataclass
class QuantizedTable:
    """An embedding table (V, D) stored as its head matrix (D, V): row v of the table is row v
    of `matrix.q` (out-major), so a lookup reads V-major rows like the float table."""

    matrix: QuantizedMatrix

    @property
    def shape(self) -> tuple[int, int]:
        return (self.matrix.out_features, self.matrix.in_features)

    @property
    def dtype(self) -> jnp.dtype:
        return self.matrix.dtype

    @property
    def nbytes(self) -> int:
        return self.matrix.nbytes

    @property
    def T(self) -> QuantizedMatrix:  # noqa: N802
        """The tied head, (D, V) as a matrix."""
        return self.matrix

    def lookup(self, ids: jax.Array, dtype: jnp.dtype) -> jax.Array:
        """ids int (...) -> rows (..., D) in `dtype`; only the gathered rows are dequantized."""
        m = self.matrix
        q = jnp.take(m.q, ids.reshape(-1), axis=0)  # (n, D or D // 2)
        s = jnp.take(m.scale, ids.reshape(-1), axis=0)  # (n, D // G)
        rows = dequantize_rows(unpack_values(q, m.bits), s, m.group_size, dtype)
        return rows.reshape(*ids.shape, m.in_features)

    def dequantize(self, dtype: jnp.dtype = jnp.float32) -> jax.Array:
        """The float table (V, D)."""
        return self.matrix.dequantize_t(dtype)


Record = QuantizedMatrix | QuantizedTable


def is_quantized(x: object) -> bool:
    return isinstance(x, QuantizedMatrix | QuantizedTable)


# ----------------------------------------------------------------------------------------------
# Packing and dequantization, shared by the records, quantize() and the GGUF importer.


def unpack_values(q: jax.Array, bits: int) -> jax.Array:
    """int8 values (..., I) from int8 q (..., I) or packed uint8 q (..., I // 2)."""
    if bits == 8:
        return q
    lo = (q & 0xF).astype(jnp.int8) - 8
    hi = (q >> 4).astype(jnp.int8) - 8
    return jnp.stack([lo, hi], axis=-1).reshape(*q.shape[:-1], q.shape[-1] * 2)


def dequantize_rows(values: jax.Array, scale: jax.Array, group: int, dtype: jnp.dtype) -> jax.Array:
    """values (..., I) int8, scale (..., I // group) -> (..., I) in dtype."""
    *lead, n = values.shape
    v = values.astype(dtype).reshape(*lead, n // group, group)
    return (v * scale.astype(dtype)[..., None]).reshape(*lead, n)


def pack_int4(values: np.ndarray) -> np.ndarray:
    """int values in [-8, 7], (..., I) with I even -> uint8 (..., I // 2), low nibble first."""
    v = (np.asarray(values).astype(np.int16) + 8).astype(np.uint8)
    return (v[..., 0::2] | (v[..., 1::2] << 4)).astype(np.uint8)


def _use_kernels() -> bool:
    """Whether nanojax.quant.ffi takes the product: on the CPU backend, when that module is there.
    It runs its C++ kernels when they are built and otherwise its own pure-JAX path, warning once
    (the layout contract of issue 12); on other backends XLA fuses our dequantize into the dot."""
    return _ffi is not None and jax.default_backend() == "cpu"


def matrix_dims(shape: tuple[int, ...], in_dims: int) -> tuple[int, int]:
    """(I, O) of a stored weight whose first `in_dims` axes are contracted."""
    return math.prod(shape[:in_dims]), math.prod(shape[in_dims:])
