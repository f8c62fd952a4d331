"""FlashAttention-2 in Pallas: forward and backward kernels, wired together as a `jax.custom_vjp`.

Source: Tri Dao, "FlashAttention-2: Faster Attention with Better Parallelism and Work
Partitioning" (2023), Algorithm 1 (forward) and Algorithm 2 (backward). Comments tagged
"A1 l.N" / "A2 l.N" point at line N of those algorithms. docs/attention.md explains the idea.

Shapes (scaling-book letters): B batch, T query length, S key length, N query heads, K kv
heads (G = N // K query heads share one kv head: GQA), H head dim. Arrays stay in the model's
(B, T, N, H) layout; each kernel program picks its head with the BlockSpec, so no transpose
copies are made. The paper's Br and Bc (row and column block sizes) are `block_q` and `block_k`.

What is never built: the (T, S) score matrix. A program holds one (block_q, block_k) tile of it
at a time, so memory is linear in T (tests/test_flash_attention.py checks the lowered program).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from nanojax.kernels import backend

# Masked scores get this instead of -inf, so that exp(s - m) never meets (-inf) - (-inf) = NaN;
# masked probabilities are also zeroed explicitly, so its exact value never matters.
_MASK = float(jnp.finfo(jnp.float32).min)


def _dot(a: jax.Array, b: jax.Array, *, ta: bool = False, tb: bool = False) -> jax.Array:
    """a @ b with either operand transposed in the contraction (no transposed copy), fp32 out."""
    dims = (((0 if ta else 1,), (1 if tb else 0,)), ((), ()))
    return lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def _visible(rows: jax.Array, cols: jax.Array, *, causal: bool, seq_k: int, offset: int) -> jax.Array:
    """(len(rows), len(cols)) bool: which keys each query may see. Keys past seq_k are padding;
    causal queries are aligned to the end of the keys, query t seeing keys s <= t + offset."""
    ok = cols[None, :] < seq_k
    if causal:
        ok = ok & (cols[None, :] <= rows[:, None] + offset)
    return ok


def _kv_blocks_for(i: jax.Array, *, causal: bool, block_q: int, block_k: int, n_k: int,
                   offset: int) -> jax.Array:
    """How many key blocks query block i needs: all of them, or (causal) those up to the
    diagonal. The blocks past it are skipped outright, about half the work at T = S."""
    if not causal:
        return jnp.int32(n_k)
    last_key = (i + 1) * block_q - 1 + offset  # the last key the block's last query sees
    return jnp.minimum(n_k, last_key // block_k + 1)


# ----------------------------------------------------------------------------------------------
# Forward: Algorithm 1. One program per (batch row, query head, query block i).


def _fwd_kernel(q_ref, k_ref, v_ref, o_ref, lse_ref, *, scale: float, causal: bool, block_q: int,
                block_k: int, seq_k: int, offset: int):
    # q_ref: (block_q, H) this program's Q_i; k_ref, v_ref: (S_pad, H) all of its kv head's K, V;
    # o_ref: (block_q, H) O_i; lse_ref: (block_q,) L_i.
    i = pl.program_id(2)
    H = q_ref.shape[-1]
    n_k = k_ref.shape[0] // block_k  # A1 l.1: Tc key/value blocks K_j, V_j of Bc rows
    q = q_ref[...]  # A1 l.4: load Q_i on chip
    rows = i * block_q + jnp.arange(block_q)
    # A1 l.5: O_i = 0, l_i = 0, m_i = -inf (all fp32, whatever the input dtype)
    o = jnp.zeros((block_q, H), jnp.float32)
    l = jnp.zeros((block_q,), jnp.float32)
    m = jnp.full((block_q,), -jnp.inf, jnp.float32)

    def body(j, carry):  # A1 l.6: for each key block j (only up to the diagonal when causal)
        o, m, l = carry
        k = k_ref[pl.ds(j * block_k, block_k), :]  # A1 l.7: load K_j, V_j on chip
        v = v_ref[pl.ds(j * block_k, block_k), :]
        s = _dot(q, k, tb=True) * scale  # A1 l.8: S_ij = Q_i K_j^T (scaled by 1/sqrt(H))
        ok = _visible(rows, j * block_k + jnp.arange(block_k), causal=causal, seq_k=seq_k, offset=offset)
        s = jnp.where(ok, s, _MASK)
        # A1 l.9: the running max m_ij, the unnormalised probabilities P~_ij = exp(S_ij - m_ij),
        # and the running sum l_ij, rescaled by exp(m_i(j-1) - m_ij) for the max's move.
        m_new = jnp.maximum(m, s.max(axis=-1))
        p = jnp.where(ok, jnp.exp(s - m_new[:, None]), 0.0)
        alpha = jnp.exp(m - m_new)
        l = alpha * l + p.sum(axis=-1)
        # A1 l.10: O_ij = diag(exp(m_i(j-1) - m_ij)) O_i(j-1) + P~_ij V_j. The product runs in
        # the input dtype (bf16 on GPUs), accumulating in fp32, as the paper's kernels do.
        o = alpha[:, None] * o + _dot(p.astype(v.dtype), v)
        return o, m_new, l

    hi = _kv_blocks_for(i, causal=causal, block_q=block_q, block_k=block_k, n_k=n_k, offset=offset)
    o, m, l = lax.fori_loop(0, hi, body, (o, m, l))  # A1 l.11
    o_ref[...] = (o / l[:, None]).astype(o_ref.dtype)  # A1 l.12, l.14: O_i = diag(l_i)^-1 O_i
    lse_ref[...] = m + jnp.log(l)  # A1 l.13, l.15: L_i = m_i + log(l_i), kept for the backward


def _fwd(q, k, v, *, scale, causal, block_q, block_k, seq_q, seq_k, interpret):
    """Padded inputs -> (O (B, T_pad, N, H), L (B, N, T_pad) fp32)."""
    B, Tp, N, H = q.shape
    Sp, K = k.shape[1], k.shape[2]
    G = N // K
    kernel = functools.partial(_fwd_kernel, scale=scale, causal=causal, block_q=block_q,
                               block_k=block_k, seq_k=seq_k, offset=seq_k - seq_q)
    q_spec = pl.BlockSpec((None, block_q, None, H), lambda b, n, i: (b, i, n, 0))
    kv_spec = pl.BlockSpec((None, Sp, None, H), lambda b, n, i: (b, 0, n // G, 0))  # GQA: n's kv head
    return pl.pallas_call(
        kernel,
        grid=(B, N, Tp // block_q),
        in_specs=[q_spec, kv_spec, kv_spec],
        out_specs=[q_spec, pl.BlockSpec((None, None, block_q), lambda b, n, i: (b, n, i))],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((B, N, Tp), jnp.float32)],
        interpret=interpret,
        compiler_params=backend.compiler_params(H),
        name="flash_attention_fwd",
    )(q, k, v)


# ----------------------------------------------------------------------------------------------
# Backward: Algorithm 2, split in two kernels. The paper's single loop (A2 l.5-19) walks key
# blocks outside and query blocks inside, and adds each dS_ij K_j into dQ_i in HBM (A2 l.15), an
# atomic add across programs. Pallas has no portable atomics, so the dQ updates run as a
# second kernel that walks the same tiles the other way round (query blocks outside): both
# recompute P_ij from the saved L instead of storing it (A2 l.11), which is the whole point.


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, d_ref, dk_ref, dv_ref, *, scale: float,
                causal: bool, block_q: int, block_k: int, seq_k: int, offset: int):
    # One program per (batch row, kv head, key block j). q_ref, do_ref: (T_pad, G, H), the G
    # query heads sharing this kv head; k_ref, v_ref: (block_k, H) K_j, V_j; lse_ref, d_ref:
    # (G, T_pad); dk_ref, dv_ref: (block_k, H).
    j = pl.program_id(2)
    Tp, G, H = q_ref.shape
    n_q = Tp // block_q  # A2 l.1-2: Tr query blocks Q_i, with their O_i, dO_i, L_i
    k = k_ref[...]  # A2 l.6: load K_j, V_j on chip
    v = v_ref[...]
    cols = j * block_k + jnp.arange(block_k)
    # Causal: queries before the block's first key (minus the alignment offset) see none of it.
    lo = jnp.maximum(0, (j * block_k - offset) // block_q) if causal else 0
    dk = jnp.zeros((block_k, H), jnp.float32)  # A2 l.7: dK_j = 0, dV_j = 0
    dv = jnp.zeros((block_k, H), jnp.float32)
    for g in range(G):  # GQA: a kv head's gradient sums over the query heads that read it
        def body(i, carry, g=g):  # A2 l.8: for each query block i
            dk, dv = carry
            sl = pl.ds(i * block_q, block_q)
            q = q_ref[sl, g, :]  # A2 l.9: load Q_i, dO_i, L_i, D_i
            do = do_ref[sl, g, :]
            lse = lse_ref[g, sl]
            di = d_ref[g, sl]
            s = _dot(q, k, tb=True) * scale  # A2 l.10: S_ij = Q_i K_j^T
            ok = _visible(i * block_q + jnp.arange(block_q), cols, causal=causal, seq_k=seq_k, offset=offset)
            p = jnp.where(ok, jnp.exp(s - lse[:, None]), 0.0)  # A2 l.11: P_ij = exp(S_ij - L_i)
            dv = dv + _dot(p.astype(do.dtype), do, ta=True)  # A2 l.12: dV_j += P_ij^T dO_i
            dp = _dot(do, v, tb=True)  # A2 l.13: dP_ij = dO_i V_j^T
            ds = p * (dp - di[:, None])  # A2 l.14: dS_ij = P_ij * (dP_ij - D_i)
            # A2 l.16: dK_j += dS_ij^T Q_i (times the softmax scale, which the paper folds into Q)
            dk = dk + scale * _dot(ds.astype(q.dtype), q, ta=True)
            return dk, dv

        dk, dv = lax.fori_loop(lo, n_q, body, (dk, dv))  # A2 l.17
    dk_ref[...] = dk.astype(dk_ref.dtype)  # A2 l.18: write dK_j, dV_j
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, d_ref, dq_ref, *, scale: float, causal: bool,
               block_q: int, block_k: int, seq_k: int, offset: int):
    # One program per (batch row, query head, query block i): A2 l.15 without atomics.
    # q_ref, do_ref, dq_ref: (block_q, H); k_ref, v_ref: (S_pad, H); lse_ref, d_ref: (block_q,).
    i = pl.program_id(2)
    H = q_ref.shape[-1]
    n_k = k_ref.shape[0] // block_k
    q, do, lse, di = q_ref[...], do_ref[...], lse_ref[...], d_ref[...]
    rows = i * block_q + jnp.arange(block_q)

    def body(j, dq):
        k = k_ref[pl.ds(j * block_k, block_k), :]
        v = v_ref[pl.ds(j * block_k, block_k), :]
        s = _dot(q, k, tb=True) * scale  # A2 l.10
        ok = _visible(rows, j * block_k + jnp.arange(block_k), causal=causal, seq_k=seq_k, offset=offset)
        p = jnp.where(ok, jnp.exp(s - lse[:, None]), 0.0)  # A2 l.11
        ds = p * (_dot(do, v, tb=True) - di[:, None])  # A2 l.13-14
        return dq + scale * _dot(ds.astype(k.dtype), k)  # A2 l.15: dQ_i += dS_ij K_j

    hi = _kv_blocks_for(i, causal=causal, block_q=block_q, block_k=block_k, n_k=n_k, offset=offset)
    dq = lax.fori_loop(0, hi, body, jnp.zeros((block_q, H), jnp.float32))
    dq_ref[...] = dq.astype(dq_ref.dtype)


def _bwd(q, k, v, o, lse, do, *, scale, causal, block_q, block_k, seq_q, seq_k, interpret):
    """Padded inputs and forward results -> (dQ, dK, dV) in the inputs' shapes and dtypes."""
    B, Tp, N, H = q.shape
    Sp, K = k.shape[1], k.shape[2]
    G = N // K
    # A2 l.4: D_i = rowsum(dO_i * O_i), one number per query row, (B, N, T_pad) fp32. A plain
    # elementwise pass: XLA fuses it, a kernel of its own would gain nothing.
    d = jnp.einsum("btnh,btnh->bnt", do.astype(jnp.float32), o.astype(jnp.float32))
    static = dict(scale=scale, causal=causal, block_q=block_q, block_k=block_k,
                  seq_k=seq_k, offset=seq_k - seq_q)

    group = pl.BlockSpec((None, Tp, G, H), lambda b, kh, j: (b, 0, kh, 0))  # a kv head's G q heads
    group_rows = pl.BlockSpec((None, G, Tp), lambda b, kh, j: (b, kh, 0))
    kv_block = pl.BlockSpec((None, block_k, None, H), lambda b, kh, j: (b, j, kh, 0))
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, **static),
        grid=(B, K, Sp // block_k),
        in_specs=[group, kv_block, kv_block, group, group_rows, group_rows],
        out_specs=[kv_block, kv_block],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        interpret=interpret,
        compiler_params=backend.compiler_params(H),
        name="flash_attention_dkv",
    )(q, k, v, do, lse, d)

    q_block = pl.BlockSpec((None, block_q, None, H), lambda b, n, i: (b, i, n, 0))
    rows_block = pl.BlockSpec((None, None, block_q), lambda b, n, i: (b, n, i))
    kv_all = pl.BlockSpec((None, Sp, None, H), lambda b, n, i: (b, 0, n // G, 0))
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, **static),
        grid=(B, N, Tp // block_q),
        in_specs=[q_block, kv_all, kv_all, q_block, rows_block, rows_block],
        out_specs=q_block,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        interpret=interpret,
        compiler_params=backend.compiler_params(H),
        name="flash_attention_dq",
    )(q, k, v, do, lse, d)
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------
# The differentiable function: pad to whole blocks, run, slice back.


def _pad_to(x: jax.Array, axis: int, size: int) -> jax.Array:
    if x.shape[axis] == size:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths)


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6, 7))
def _flash(q, k, v, scale, causal, block_q, block_k, interpret):
    return _flash_fwd(q, k, v, scale, causal, block_q, block_k, interpret)[0]


def _padded(q, k, v, block_q, block_k):
    """Zero-pads T and S up to whole blocks. Padded query rows are sliced off the results;
    padded keys are masked out by `_visible`."""
    Tp, Sp = _round_up(q.shape[1], block_q), _round_up(k.shape[1], block_k)
    return _pad_to(q, 1, Tp), _pad_to(k, 1, Sp), _pad_to(v, 1, Sp)


def _flash_fwd(q, k, v, scale, causal, block_q, block_k, interpret):
    T, S = q.shape[1], k.shape[1]
    qp, kp, vp = _padded(q, k, v, block_q, block_k)
    o, lse = _fwd(qp, kp, vp, scale=scale, causal=causal, block_q=block_q, block_k=block_k, seq_q=T, seq_k=S,
                  interpret=interpret)
    # Saved for the backward: the inputs, O and L (A1 l.17); never P, which is (T, S).
    return o[:, :T], (q, k, v, o, lse)


def _flash_bwd(scale, causal, block_q, block_k, interpret, res, do):
    q, k, v, o, lse = res
    T, S = q.shape[1], k.shape[1]
    qp, kp, vp = _padded(q, k, v, block_q, block_k)
    dop = _pad_to(do, 1, qp.shape[1])  # zero dO on padded rows: they add nothing to dK, dV
    dq, dk, dv = _bwd(qp, kp, vp, o, lse, dop, scale=scale, causal=causal, block_q=block_q, block_k=block_k,
                      seq_q=T, seq_k=S, interpret=interpret)
    return dq[:, :T], dk[:, :S], dv[:, :S]


_flash.defvjp(_flash_fwd, _flash_bwd)


def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool = True,
                    block_q: int | None = None, block_k: int | None = None,
                    interpret: bool | None = None) -> jax.Array:
    """Exact softmax attention, FlashAttention-2 style, differentiable (custom VJP).

    Args:
      q: (B, T, N, H) queries; k, v: (B, S, K, H) keys and values, N % K == 0 (GQA), the same
        dtype (float32, bfloat16 or float16). Softmax statistics and accumulators are float32.
      causal: queries aligned to the end of the keys, query t seeing keys s <= t + S - T
        (needs S >= T); False: every query sees every key.
      block_q, block_k: query and key tile sizes (the paper's Br, Bc); default per backend
        (nanojax.kernels.backend.flash_blocks), capped at the padded lengths.
      interpret: run in Pallas interpret mode; default: on CPU only.
    Returns:
      (B, T, N, H) in q's dtype.
    """
    _check(q, k, v, causal)
    B, T, N, H = q.shape
    S = k.shape[1]
    dq_, dk_ = backend.flash_blocks(H)
    floor = backend.min_tile()
    # A short sequence gets a block no longer than itself (rounded up to the lowering's minimum),
    # so T = 40 runs one 64-row block, not a 128-row block that is mostly padding.
    block_q = block_q or min(dq_, max(floor, _next_pow2(T)))
    block_k = block_k or min(dk_, max(floor, _next_pow2(S)))
    interpret = backend.interpret_default() if interpret is None else interpret
    # Triton needs power-of-two tiles: pad the head dim with zero columns (q.k and p.v unchanged;
    # the extra output columns are zero and sliced off). The softmax scale keeps the true H.
    Hp = max(floor, _next_pow2(H)) if backend.pads_tiles() else H
    q, k, v = (_pad_to(x, 3, Hp) for x in (q, k, v))
    out = _flash(q, k, v, 1.0 / math.sqrt(H), causal, block_q, block_k, interpret)
    return out[..., :H]


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _check(q: jax.Array, k: jax.Array, v: jax.Array, causal: bool) -> None:
    if q.ndim != 4 or k.ndim != 4 or k.shape != v.shape:
        raise ValueError(f"flash_attention wants q (B, T, N, H) and k, v (B, S, K, H) of one shape; "
                         f"got q {q.shape}, k {k.shape}, v {v.shape}")
    (B, T, N, H), (Bk, S, K, Hk) = q.shape, k.shape
    if B != Bk or H != Hk or N % K:
        raise ValueError(f"flash_attention: q {q.shape} and k/v {k.shape} disagree; batch and head dim "
                         f"must match and the kv heads ({K}) must divide the query heads ({N})")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
        raise ValueError(f"flash_attention wants q, k, v of one float dtype (float32, bfloat16, float16); "
                         f"got {q.dtype}, {k.dtype}, {v.dtype}: cast them first")
    if causal and S < T:
        raise ValueError(f"causal flash_attention needs at least as many keys as queries (S >= T), got "
                         f"T={T}, S={S}: the first T - S queries would see no key at all")
