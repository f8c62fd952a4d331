"""Decode attention in Pallas: one new query token per sequence against its KV cache.

During decoding each sequence brings a single query row, so the work is reading the cache, not
multiplying: a batch-1 step has B * K programs at most, far too few to fill a GPU if each walks
its whole cache alone. Flash-decoding (Dao, Haziza, Massa, Sizov 2023, "Flash-Decoding for
long-context inference") splits every cache along its length into `num_splits` chunks, handled
by separate programs in parallel (split-K); each returns its chunk's softmax-weighted output and
log-sum-exp, and a small reduction merges them exactly (the same rescaling as FlashAttention's
online softmax, done once across chunks instead of once per block).

Caches are ragged: row b holds valid keys in slots [starts[b], lengths[b]) (the compiled decode
loop left-pads prompts, so its rows start at their pad length; a slot cache starts at 0). Key
blocks wholly outside a row's range are skipped, not masked, so a short row costs what it holds.

Shapes: B batch, N query heads, K kv heads (G = N // K per kv head), S cache slots, H head dim.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from nanojax.kernels import backend
from nanojax.kernels.flash_attention import _MASK, _dot, _pad_to, _round_up


def _split_kernel(start_ref, length_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *, scale: float,
                  block_k: int):
    # One program per (batch row b, kv head, split c). start_ref, length_ref: () this row's
    # valid range; q_ref: (G, H) the query heads sharing the kv head; k_ref, v_ref: (chunk, H)
    # this split's slots; o_ref: (G, H) fp32; lse_ref: (G,) fp32.
    c = pl.program_id(2)
    chunk = k_ref.shape[0]
    G, H = q_ref.shape
    base = c * chunk  # the cache slot of this split's first key
    start, length = start_ref[...], length_ref[...]
    # This split's key blocks that overlap [start, length); the rest are never read.
    lo = jnp.clip(start - base, 0, chunk) // block_k
    hi = (jnp.clip(length - base, 0, chunk) + block_k - 1) // block_k
    q = q_ref[...]

    def body(j, carry):  # the online softmax of FlashAttention (flash_attention.py, A1 l.6-10)
        o, m, l = carry
        slots = base + j * block_k + jnp.arange(block_k)
        k = k_ref[pl.ds(j * block_k, block_k), :]
        v = v_ref[pl.ds(j * block_k, block_k), :]
        ok = ((slots >= start) & (slots < length))[None, :]  # (1, block_k)
        s = jnp.where(ok, _dot(q, k, tb=True) * scale, _MASK)  # (G, block_k)
        m_new = jnp.maximum(m, s.max(axis=-1))
        p = jnp.where(ok, jnp.exp(s - m_new[:, None]), 0.0)
        alpha = jnp.exp(m - m_new)
        return alpha[:, None] * o + _dot(p.astype(v.dtype), v), m_new, alpha * l + p.sum(axis=-1)

    init = (jnp.zeros((G, H), jnp.float32), jnp.full((G,), -jnp.inf, jnp.float32),
            jnp.zeros((G,), jnp.float32))
    o, m, l = lax.fori_loop(lo, hi, body, init)
    # An empty split (the row ends before it) reports weight zero: lse = -inf, o = 0.
    has = l > 0
    o_ref[...] = o / jnp.where(has, l, 1.0)[:, None]
    lse_ref[...] = jnp.where(has, m + jnp.log(jnp.where(has, l, 1.0)), -jnp.inf)


def decode_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, lengths: jax.Array, *,
                     starts: jax.Array | None = None, block_k: int | None = None,
                     num_splits: int | None = None, interpret: bool | None = None) -> jax.Array:
    """Attention of one query token per row over a ragged KV cache.

    Args:
      q: (B, N, H) this step's queries.
      k_cache, v_cache: (B, K, S, H) per-row, per-kv-head caches (N % K == 0), q's dtype.
      lengths: (B,) int: row b's valid keys end at slot lengths[b] (exclusive).
      starts: (B,) int or None (all 0): row b's valid keys begin at slot starts[b].
        Every row needs starts[b] < lengths[b] <= S; a row with no key gives zeros.
      block_k: keys per inner step; num_splits: programs per (row, kv head), each taking one
        contiguous chunk of the S slots (split-K). Defaults: nanojax.kernels.backend.decode_blocks.
      interpret: Pallas interpret mode; default: on CPU only.
    Returns:
      (B, N, H) in q's dtype; softmax in float32.
    """
    if q.ndim != 3 or k_cache.ndim != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"decode_attention wants q (B, N, H) and k_cache, v_cache (B, K, S, H) of one "
                         f"shape; got q {q.shape}, k {k_cache.shape}, v {v_cache.shape}")
    (B, N, H), (Bc, K, S, Hc) = q.shape, k_cache.shape
    if B != Bc or H != Hc or N % K:
        raise ValueError(f"decode_attention: q {q.shape} and caches {k_cache.shape} disagree; batch and "
                         f"head dim must match and the kv heads ({K}) must divide the query heads ({N})")
    if lengths.shape != (B,) or (starts is not None and starts.shape != (B,)):
        raise ValueError(f"decode_attention wants lengths and starts of shape ({B},), one per row; got "
                         f"{lengths.shape} and {None if starts is None else starts.shape}")
    G = N // K
    bk0, splits0 = backend.decode_blocks()
    interpret = backend.interpret_default() if interpret is None else interpret
    num_splits = max(1, min(num_splits or splits0, -(-S // backend.min_tile())))
    chunk = -(-S // num_splits)  # slots per split, then whole blocks
    block_k = block_k or min(bk0, max(backend.min_tile(), 1 << max(0, (chunk - 1).bit_length())))
    chunk = _round_up(chunk, block_k)
    # Triton tiles are >= 16 and powers of two: on GPU the G query heads are padded up to 16
    # rows (decode reads the cache once either way; the spare rows cost no memory traffic) and
    # H to a power of two. Zero rows and columns change no real output.
    floor = backend.min_tile()
    pad = backend.pads_tiles()
    Gp = max(floor, 1 << max(0, (G - 1).bit_length())) if pad else G
    Hp = max(floor, 1 << max(0, (H - 1).bit_length())) if pad else H
    qg = _pad_to(_pad_to(q.reshape(B, K, G, H), 2, Gp), 3, Hp)  # (B, K, Gp, Hp)
    kc = _pad_to(_pad_to(k_cache, 2, chunk * num_splits), 3, Hp)  # (B, K, S_pad, Hp)
    vc = _pad_to(_pad_to(v_cache, 2, chunk * num_splits), 3, Hp)
    lengths = lengths.astype(jnp.int32)
    starts = jnp.zeros_like(lengths) if starts is None else starts.astype(jnp.int32)

    row = pl.BlockSpec((None,), lambda b, h, c: (b,))
    o, lse = pl.pallas_call(
        functools.partial(_split_kernel, scale=1.0 / math.sqrt(H), block_k=block_k),
        grid=(B, K, num_splits),
        in_specs=[row, row,
                  pl.BlockSpec((None, None, Gp, Hp), lambda b, h, c: (b, h, 0, 0)),
                  pl.BlockSpec((None, None, chunk, Hp), lambda b, h, c: (b, h, c, 0)),
                  pl.BlockSpec((None, None, chunk, Hp), lambda b, h, c: (b, h, c, 0))],
        out_specs=[pl.BlockSpec((None, None, None, Gp, Hp), lambda b, h, c: (b, h, c, 0, 0)),
                   pl.BlockSpec((None, None, None, Gp), lambda b, h, c: (b, h, c, 0))],
        out_shape=[jax.ShapeDtypeStruct((B, K, num_splits, Gp, Hp), jnp.float32),
                   jax.ShapeDtypeStruct((B, K, num_splits, Gp), jnp.float32)],
        interpret=interpret,
        compiler_params=backend.compiler_params(Hp, decode=True),
        name="decode_attention",
    )(starts, lengths, qg, kc, vc)
    return _merge_splits(o, lse)[:, :, :G, :H].reshape(B, N, H).astype(q.dtype)


def _merge_splits(o: jax.Array, lse: jax.Array) -> jax.Array:
    """Exact merge of per-split results: o (B, K, C, G, H) each normalised over its own split,
    lse (B, K, C, G) each split's log-sum-exp -> (B, K, G, H). Weight of split c is
    exp(lse_c - max_c lse_c), i.e. its share of the softmax's total mass."""
    top = lse.max(axis=2, keepdims=True)
    top = jnp.where(jnp.isfinite(top), top, 0.0)  # a row with no key at all: weights 0, output 0
    w = jnp.exp(lse - top)  # (B, K, C, G)
    total = w.sum(axis=2)
    out = jnp.einsum("bkcg,bkcgh->bkgh", w, o)
    return out / jnp.where(total > 0, total, 1.0)[..., None]
