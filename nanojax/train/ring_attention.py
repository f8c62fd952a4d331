"""Ring attention: causal attention over a sequence split across the `sequence` mesh axis.

Each of the S ranks of the axis holds T consecutive tokens (rank i: global positions
[i*T, (i+1)*T)) of q, k and v. The K/V blocks travel around the ring with `ppermute`, one hop per
step, while each rank folds every block that reaches it into its queries' result with the online
(streaming) softmax: a running max m, a running sum l of exp(score - m) and a running weighted sum
of values, rescaled by exp(m_old - m_new) when the max grows (Milakov & Gimelshein 2018; Liu et al.
2023, "Ring Attention with Blockwise Transformers"). After S - 1 hops every query has seen every
key; no rank ever holds more than one foreign K/V block.

Causality: at step s rank i holds the block of rank j = (i - s) mod S. Keys of a later block
(j > i) are all in the future and are masked whole (this simple ring does that work anyway;
load-balanced orders such as striped or zig-zag attention are a known refinement, not done here).
Step 0 is the rank's own, diagonal block, where every query sees at least itself, so the running
max is a real score before any fully masked block arrives.

Runs inside `jax.shard_map` (it names the mesh axis). Shapes use the scaling book's letters:
B batch, T local tokens, N query heads, K kv heads, G = N / K, H head dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from nanojax.model import AttendFn

SEQUENCE_AXIS = "sequence"


def ring_attention(q: jax.Array, k: jax.Array, v: jax.Array, axis: str = SEQUENCE_AXIS) -> jax.Array:
    """Causal attention of this rank's queries against the keys of all ranks up to it.

    q: (B, T, N, H); k, v: (B, T, K, H), this rank's T tokens. Returns (B, T, N, H) in q's dtype.
    Scores, softmax statistics and the accumulator are float32.
    """
    S = jax.lax.axis_size(axis)  # static: the number of blocks in the ring
    i = jax.lax.axis_index(axis)  # this rank's block
    B, T, N, H = q.shape
    K = k.shape[2]
    G = N // K
    # Heads-first, GQA as a reshape (as nanojax.attention): the G query heads of one kv head are
    # stacked along the query axis, (B, K, G*T, H).
    qh = q.reshape(B, T, K, G, H).transpose(0, 2, 3, 1, 4).reshape(B, K, G * T, H)
    q_pos = i * T + jnp.tile(jnp.arange(T), G)  # (G*T,) global position of each stacked query
    neg = jnp.finfo(jnp.float32).min  # not -inf: exp(neg - m) is 0 and never NaN

    m = jnp.full((B, K, G * T), neg, jnp.float32)  # running max of the scores
    l = jnp.zeros((B, K, G * T), jnp.float32)  # running sum of exp(score - m)
    acc = jnp.zeros((B, K, G * T, H), jnp.float32)  # running sum of exp(score - m) * v
    kb, vb = k, v
    ring = [(r, (r + 1) % S) for r in range(S)]  # rank r sends its block to rank r + 1
    for s in range(S):
        j = (i - s) % S  # whose block this rank holds now
        k_pos = j * T + jnp.arange(T)  # (T,)
        scores = jnp.einsum("bkqh,bskh->bkqs", qh, kb, preferred_element_type=jnp.float32) * H**-0.5
        scores = jnp.where(k_pos[None, :] <= q_pos[:, None], scores, neg)  # (B, K, G*T, T)
        # The result does not depend on m (it cancels in acc / l), so its gradient is not needed.
        m_new = jax.lax.stop_gradient(jnp.maximum(m, scores.max(axis=-1)))
        rescale = jnp.exp(m - m_new)  # (B, K, G*T): older terms, measured against the new max
        p = jnp.exp(scores - m_new[..., None])
        l = l * rescale + p.sum(axis=-1)
        acc = acc * rescale[..., None] + jnp.einsum("bkqs,bskh->bkqh", p, vb.astype(jnp.float32))
        m = m_new
        if s < S - 1:  # pass the block on; the last one needs no further hop
            kb, vb = jax.lax.ppermute((kb, vb), axis, perm=ring)
    out = acc / l[..., None]  # (B, K, G*T, H)
    return out.reshape(B, K, G, T, H).transpose(0, 3, 1, 2, 4).reshape(B, T, N, H).astype(q.dtype)


def ring_attend(axis: str = SEQUENCE_AXIS) -> AttendFn:
    """An AttendFn (nanojax.model.block's attention callable) running ring_attention."""

    def attend(q, k, v, state):
        return ring_attention(q, k, v, axis), state

    return attend


__all__ = ["SEQUENCE_AXIS", "ring_attention", "ring_attend"]
