"""The compiled half of continuous batching: a slot KV cache shared by S unrelated requests, a
prefill of one request into one slot, a decode chunk that advances every slot at once, and the
block copies behind prefix reuse. The host half (queue, stops, text, events) is infer/scheduler.py.

The slot cache, per layer (k, v), each [S*K, C, H] (rows s*K + k: slot s, kv head k), the layout
of infer/engine.py so that decode attention is the same batched matmul; C = a power of two
>= cfg.max_seq_len (and >= 64). With kv_cache_dtype="int8" each is an engine.Int8KV record.
Slot s holds one request's tokens at cache positions 0, 1, 2, ... (no left padding: each row has
its own position instead, as in vLLM/JetStream), so learned positions and RoPE count from 0.

- `prefill`: one request's new tokens, right-padded to a power-of-two bucket P >= 8, written
  into its slot at positions [start, start + P) (pad positions past C are dropped); each attends
  to the slot's [0, start) (a reused prefix) and causally within the new tokens. Returns the last
  real token's logits, its first sampled token (PRNG fold_in(key(seed), 0)) and logprobs.
- `prefill_packed`: the whole prompts of several requests (none with a reused prefix) back to back
  in one row of T tokens (a power-of-two bucket of their total, at most PACK_TOKENS unless one
  longer prompt goes alone), each written into its own slot and attending only to itself: the
  requests the scheduler admits together share one call with layer-sized matmuls instead of one
  small call each (`plan_packs` groups them). Same outputs as `prefill`, one row per request.
- `decode_chunk`: `steps` decode steps for all S slots in one jit call (a lax.while_loop that
  ends early once no slot is active). Every row has its own position, active flag, budget, stop
  ids, sampler values and PRNG stream (token t of a request draws from fold_in(key(seed), t), so
  a request's tokens do not depend on its slot or its neighbours). Each row writes its K/V at its
  own position with a scatter into the donated cache (in place, no copy: see docs/serving.md for
  the step time against engine.py's decode). Attention reads a power-of-two window W >= the
  furthest active position + steps, so a short batch does not pay for C.
- `save_blocks` / `load_blocks`: prefix reuse (vLLM's automatic prefix caching, in miniature).
  A pool of fixed-size token blocks per layer [NB, K, BLOCK, H]; a prompt's full blocks are
  copied there after its prefill, and a later request with the same leading blocks copies them
  into its slot in one compiled call of fixed shape (all C/BLOCK block ids, unused ones padded:
  what lands past the prefix is overwritten by the prefill and the decode before it is read).

Compiled variants (each compiles once, then requests come and go without recompiling):
  decode_chunk: windows (log2(C/64) + 1) x batch buckets (1, 2, 4, ... up to S: the active
                slots, padded) x sampler kinds (2: all greedy; per-row sampling) x logprobs (2);
  prefill:      prompt buckets (log2(next_pow2(max_seq_len)/8) + 1, always the per-row sampler
                and logprobs: one row, cheap): requests with a reused prefix;
  prefill_packed: pack buckets (log2(next_pow2(max(PACK_TOKENS, max_seq_len))/8) + 1; the rows
                it samples are fixed by the bucket and the slots, `pack_rows`);
  save_blocks, load_blocks: 1 each (when the prefix store is on).
`variant_counts` states these numbers for a config; Engine.stats() reports how many exist so far.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from nanojax.config import ModelConfig
from nanojax.infer.engine import (
    _CPU_DECODE_OPTIONS,
    MIN_PROMPT_BUCKET,
    MIN_WINDOW,
    Int8KV,
    _decode_attention,
    _heads_first,
    _new_cache,
    _next_pow2,
    _write,
    use_attention_kernel,  # decode_chunk's choice too: the CPU kernel, else XLA's dots over a window
)
from nanojax.model import Params, hidden_states, rope_table, unembed
from nanojax.quant import ffi
from nanojax.sampling import row_logprobs, sample_rows

SlotCache = list[tuple[Any, Any]]  # per layer (k, v): [S*K, C, H] arrays or Int8KV records
N_TOP = 20  # top alternatives computed when logprobs are on (OpenAI allows 0..20)
BLOCK = 16  # prefix-store block, in tokens (vLLM's default block size)
N_STOP = 8  # stop ids per row checked on device (more are checked on the host)
_NEG = float(jnp.finfo(jnp.float32).min)


def cache_len(cfg: ModelConfig) -> int:
    """C: slots per row of the cache, a power of two >= max_seq_len, MIN_WINDOW and BLOCK."""
    return max(MIN_WINDOW, BLOCK, _next_pow2(cfg.max_seq_len))


def prefill_bucket(n_new: int) -> int:
    """P: the power-of-two length (>= MIN_PROMPT_BUCKET) that n_new new tokens are padded to."""
    return max(MIN_PROMPT_BUCKET, _next_pow2(n_new))


def window_for(furthest: int, steps: int, C: int) -> int:
    """The attention window of a chunk whose furthest active row is at position `furthest`."""
    return min(C, max(MIN_WINDOW, _next_pow2(furthest + steps)))


def batch_bucket(n_active: int, slots: int) -> int:
    """Rows a decode chunk runs for n_active active slots: a power of two, at most `slots`."""
    return min(slots, _next_pow2(n_active))


def variant_counts(cfg: ModelConfig, slots: int) -> dict[str, int]:
    """How many executables each compiled piece can have for cfg (the module docstring)."""
    C = cache_len(cfg)
    windows = C.bit_length() - MIN_WINDOW.bit_length() + 1
    batches = len({batch_bucket(n, slots) for n in range(1, slots + 1)})
    buckets = prefill_bucket(cfg.max_seq_len).bit_length() - MIN_PROMPT_BUCKET.bit_length() + 1
    packed = prefill_bucket(max(PACK_TOKENS, cfg.max_seq_len)).bit_length() - MIN_PROMPT_BUCKET.bit_length()
    packed += 1
    return {"decode_chunk": windows * batches * 2 * 2, "prefill": buckets, "prefill_packed": packed,
            "save_blocks": 1, "load_blocks": 1}


def new_cache(cfg: ModelConfig, slots: int, kv_cache_dtype: str | None) -> SlotCache:
    shape = (slots * cfg.kv_heads, cache_len(cfg), cfg.resolved_head_dim)
    return [(_new_cache(shape, cfg.compute_dtype, kv_cache_dtype),
             _new_cache(shape, cfg.compute_dtype, kv_cache_dtype)) for _ in range(cfg.n_layer)]


def new_pool(cfg: ModelConfig, blocks: int, kv_cache_dtype: str | None) -> SlotCache:
    """The prefix store's device side: per layer (k, v) [blocks, K, BLOCK, H] (Int8KV: q and scale
    [blocks, K, BLOCK])."""
    K, H = cfg.kv_heads, cfg.resolved_head_dim

    def one():
        if kv_cache_dtype == "int8":
            return Int8KV(jnp.zeros((blocks, K, BLOCK, H), jnp.int8),
                          jnp.zeros((blocks, K, BLOCK), jnp.float32))
        return jnp.zeros((blocks, K, BLOCK, H), cfg.compute_dtype)

    return [(one(), one()) for _ in range(cfg.n_layer)]


def _cache_values(x: jax.Array, like: Any) -> Any:
    """x [R, T, H] in the cache's form: quantized (engine._write into an empty record) for Int8KV."""
    if isinstance(like, Int8KV):
        return _write(_new_cache(x.shape, jnp.float32, "int8"), x, 0)
    return x.astype(like.dtype)


def _put(c: Any, rows: jax.Array, cols: jax.Array, x: jax.Array) -> Any:
    """Scatters x [R, T, H] into cache c at (rows[r], cols[r, t]); out-of-range cols are dropped.
    With c donated, XLA updates it in place."""
    new = _cache_values(x, c)
    return jax.tree.map(lambda a, n: a.at[rows[:, None], cols].set(n, mode="drop"), c, new)


def _slot_view(c: Any, slot: jax.Array, K: int) -> jax.Array:
    """Slot `slot`'s rows of cache c as float (K, C, H) (an Int8KV is dequantized: prefill only)."""
    if isinstance(c, Int8KV):
        q = jax.lax.dynamic_slice_in_dim(c.q, slot * K, K, 0).astype(jnp.float32)
        return q * jax.lax.dynamic_slice_in_dim(c.scale, slot * K, K, 0)[..., None]
    return jax.lax.dynamic_slice_in_dim(c, slot * K, K, 0)


def _prefill_attention(q: jax.Array, kview: jax.Array, vview: jax.Array, pos: jax.Array) -> jax.Array:
    """q (1, P, N, H) at cache positions pos (P,); kview, vview (K, C, H) hold the slot with the
    new tokens written. Query p sees cache positions [0, pos[p]]. Returns (1, P, N, H)."""
    _, P, N, H = q.shape
    K, C, _ = kview.shape
    G = N // K
    qg = q[0].reshape(P, K, G, H).transpose(1, 2, 0, 3).reshape(K, G * P, H)  # row g*P + p
    scores = jnp.einsum("nqh,nch->nqc", qg.astype(kview.dtype), kview,
                        preferred_element_type=jnp.float32) * (H**-0.5)  # (K, G*P, C)
    mask = jnp.arange(C)[None, :] <= jnp.tile(pos, G)[:, None]  # (G*P, C) causal over the slot
    probs = jax.nn.softmax(jnp.where(mask[None], scores, _NEG), axis=-1)
    out = jnp.einsum("nqc,nch->nqh", probs.astype(vview.dtype), vview)  # (K, G*P, H)
    return out.reshape(K, G, P, H).transpose(2, 0, 1, 3).reshape(1, P, N, H).astype(q.dtype)


PACK_TOKENS = 512  # a packed prefill holds at most this many new tokens (one longer prompt goes alone)


def pack_rows(T: int, slots: int) -> int:
    """R: the requests a packed prefill of T tokens can carry (logit rows it samples): one per
    MIN_PROMPT_BUCKET tokens, at most `slots`. A function of (T, slots) only, so each T bucket is
    one executable."""
    return max(1, min(slots, T // MIN_PROMPT_BUCKET))


def plan_packs(lengths: list[int], slots: int) -> list[list[int]]:
    """Groups requests (their new-token counts, in queue order) into packed prefills: consecutive
    requests share a pack while its tokens fit PACK_TOKENS (or it is one longer request alone) and
    its count fits pack_rows of its bucket. Returns the index lists, in order."""
    packs: list[list[int]] = []
    total = 0
    for i, n in enumerate(lengths):
        if packs:
            t, k = total + n, len(packs[-1]) + 1
            if t <= PACK_TOKENS and k <= pack_rows(prefill_bucket(t), slots):
                packs[-1].append(i)
                total = t
                continue
        packs.append([i])
        total = n
    return packs


def _pack_attention(q: jax.Array, k: jax.Array, v: jax.Array, seg: jax.Array) -> jax.Array:
    """Causal attention inside each request of a pack. q (1, T, N, H), k, v (1, T, K, H); seg int32
    (T,): token t sees tokens u <= t with seg[u] == seg[t] (its own request; padding has its own
    seg). Returns (1, T, N, H)."""
    _, T, N, H = q.shape
    K = k.shape[2]
    G = N // K
    qg = q[0].reshape(T, K, G, H).transpose(1, 2, 0, 3).reshape(K, G * T, H)  # row g*T + t
    kk, vv = _heads_first(k), _heads_first(v)  # (K, T, H)
    scores = jnp.einsum("nqh,nch->nqc", qg, kk, preferred_element_type=jnp.float32) * (H**-0.5)
    idx = jnp.arange(T)
    mask = (seg[None, :] == seg[:, None]) & (idx[None, :] <= idx[:, None])  # (T, T)
    probs = jax.nn.softmax(jnp.where(jnp.tile(mask, (G, 1))[None], scores, _NEG), axis=-1)
    out = jnp.einsum("nqc,nch->nqh", probs.astype(vv.dtype), vv)  # (K, G*T, H)
    return out.reshape(K, G, T, H).transpose(2, 0, 1, 3).reshape(1, T, N, H).astype(q.dtype)


@functools.partial(jax.jit, static_argnames=("cfg",), donate_argnums=(1,))
def prefill_packed(params: Params, cache: SlotCache, tokens: jax.Array, slot: jax.Array, pos: jax.Array,
                   last: jax.Array, knobs: dict[str, jax.Array], key_data: jax.Array, *,
                   cfg: ModelConfig) -> tuple[SlotCache, dict[str, jax.Array]]:
    """Several requests' whole prompts (no reused prefix) in one call, back to back in one row, each
    written into its own slot: one set of weight reads and large matmuls for all of them, where one
    call per request ran the layers at a few dozen rows each (vLLM and SARATHI pack prefills the
    same way).

    tokens: int32 (1, T) (T = prefill_bucket of the total); request r's tokens are a contiguous run;
    slot: int32 (T,) each token's slot (distinct per request; padding tokens: any slot not in the
    pack, or the pack's last one); pos: int32 (T,) each token's cache position (0, 1, ... within
    its request; padding: >= C, dropped from the cache and masked from every real token);
    last: int32 (R,) the pack index of each request's last token (R = pack_rows(T, S); rows past
    the pack's requests repeat any index, their outputs are unused); knobs: each (R,); key_data:
    uint32 (R, 2). Returns the cache (donated) and what `prefill` returns, with R rows.
    """
    T = tokens.shape[1]
    K = cfg.kv_heads
    C = cache_len(cfg)
    real = pos < C
    seg = jnp.where(real, slot, -1)  # padding tokens see only padding; no real token sees them
    rows = slot[None, :] * K + jnp.arange(K, dtype=jnp.int32)[:, None]  # (K, T)
    cols = jnp.broadcast_to(pos, (K, T))

    def scatter(c, x):  # x (K, T, H) into c at (rows, cols); pos >= C is dropped
        new = _cache_values(x, c)
        return jax.tree.map(lambda a, n: a.at[rows, cols].set(n, mode="drop"), c, new)

    def attend(q, k, v, layer_cache):
        kc, vc = layer_cache
        out = _pack_attention(q, k, v, seg)
        return out, (scatter(kc, _heads_first(k)), scatter(vc, _heads_first(v)))

    positions = jnp.minimum(pos, cfg.max_seq_len - 1)[None, :]  # (1, T)
    x, cache = hidden_states(params, tokens, cfg, positions=positions, attend=attend, layer_states=cache)
    logits = unembed(params, x[last], cfg)  # (R, V)
    zero = jnp.zeros(last.shape, jnp.int32)
    token = sample_rows(logits, _row_keys(key_data, zero), knobs, greedy_only=False)
    lp, top_ids, top_lp = row_logprobs(logits, knobs["temperature"], token, N_TOP)
    return cache, {"logits": logits, "token": token, "logprob": lp, "top_ids": top_ids,
                   "top_logprobs": top_lp}


def _view_dtype(c: Any) -> Any:
    return jnp.float32 if isinstance(c, Int8KV) else c.dtype


def _window_rows(c: Any, slot: jax.Array, K: int, window: int) -> Any:
    """Slots slot[0], slot[1], ...'s first `window` positions of cache c, contiguous: (S*K, window,
    H), for the batched dots. One dynamic slice per row (K runs of window*H contiguous values),
    concatenated; the same step time as a gather of those rows, measured. Taken once per decode
    chunk, not per step (a trace showed this copy at ~20% of a batch-8 step when it was per step)."""
    def one(a):
        return jnp.concatenate([jax.lax.dynamic_slice_in_dim(a, slot[b] * K, K, 0)[:, :window]
                                for b in range(slot.shape[0])])

    return jax.tree.map(one, c)


def _put_window_rows(c: Any, w: Any, slot: jax.Array, K: int) -> Any:
    """The inverse of `_window_rows`: writes w (S*K, window, H) back over slots slot[0], slot[1],
    ...'s first `window` positions of cache c (donated: in place). The slots must be distinct (the
    scheduler's active rows and idle padding rows are), or a later row's copy would win."""
    def one(a, b):
        for r in range(slot.shape[0]):
            start = (slot[r] * K,) + (0,) * (a.ndim - 1)
            a = jax.lax.dynamic_update_slice(a, b[r * K:(r + 1) * K], start)
        return a

    return jax.tree.map(one, c, w)


def _row_keys(key_data: jax.Array, t: jax.Array) -> jax.Array:
    """Row r's key for its token t[r]: fold_in(key(seed_r), t[r]). key_data uint32 (R, 2)."""
    return jax.vmap(lambda kd, i: jax.random.fold_in(jax.random.wrap_key_data(kd), i))(key_data, t)


@functools.partial(jax.jit, static_argnames=("cfg",), donate_argnums=(1,))
def prefill(params: Params, cache: SlotCache, tokens: jax.Array, slot: jax.Array, start: jax.Array,
            n_new: jax.Array, knobs: dict[str, jax.Array], key_data: jax.Array, *,
            cfg: ModelConfig) -> tuple[SlotCache, dict[str, jax.Array]]:
    """One request's new tokens into slot `slot` at cache positions [start, start + n_new).

    tokens: int32 (1, P) right-padded (P = prefill_bucket(n_new)); slot, start, n_new: int32
    scalars; knobs: the request's `row_knobs`, each (1,); key_data: uint32 (1, 2), its seed's key.
    Returns the cache (donated, updated) and {"logits": float32 (1, V) of the last real token,
    "token": int32 (1,) sampled from them as the request's token 0, "logprob" (1,), "top_ids"
    int32 (1, N_TOP), "top_logprobs" (1, N_TOP)}.
    """
    P = tokens.shape[1]
    K = cfg.kv_heads
    pos = start + jnp.arange(P, dtype=jnp.int32)  # cache positions of the new tokens
    rows = slot * K + jnp.arange(K, dtype=jnp.int32)
    cols = jnp.broadcast_to(pos, (K, P))

    def attend(q, k, v, layer_cache):
        kc, vc = layer_cache
        kn, vn = _heads_first(k), _heads_first(v)  # (K, P, H)
        if not isinstance(kc, Int8KV):
            # Write, then read the slot back: reading it first (and writing after) made XLA copy
            # the whole cache around the in-place write, every layer (92 vs 36 ms at 16 slots).
            kc, vc = _put(kc, rows, cols, kn), _put(vc, rows, cols, vn)
            return _prefill_attention(q, _slot_view(kc, slot, K), _slot_view(vc, slot, K), pos), (kc, vc)
        # Attend over the slot with the new tokens' exact K/V (as engine.py's prefill does; an
        # int8 cache quantizes only what later reads see).
        kview = _slot_view(kc, slot, K).at[:, pos].set(kn.astype(_view_dtype(kc)), mode="drop")
        vview = _slot_view(vc, slot, K).at[:, pos].set(vn.astype(_view_dtype(vc)), mode="drop")
        out = _prefill_attention(q, kview, vview, pos)
        return out, (_put(kc, rows, cols, kn), _put(vc, rows, cols, vn))

    # Pad tokens past the context get a valid position (their outputs are never read).
    positions = jnp.minimum(pos, cfg.max_seq_len - 1)[None, :]  # (1, P)
    x, cache = hidden_states(params, tokens, cfg, positions=positions, attend=attend, layer_states=cache)
    last = jax.lax.dynamic_slice_in_dim(x, n_new - 1, 1, 0)  # (1, D)
    logits = unembed(params, last, cfg)  # (1, V)
    zero = jnp.zeros((1,), jnp.int32)
    token = sample_rows(logits, _row_keys(key_data, zero), knobs, greedy_only=False)
    lp, top_ids, top_lp = row_logprobs(logits, knobs["temperature"], token, N_TOP)
    return cache, {"logits": logits, "token": token, "logprob": lp, "top_ids": top_ids,
                   "top_logprobs": top_lp}


def _decode_chunk(params: Params, cache: SlotCache, rows: dict[str, jax.Array], *, cfg: ModelConfig,
                  steps: int, window: int, greedy_only: bool, logprobs: bool, kernel: bool
                  ) -> tuple[SlotCache, dict[str, jax.Array]]:
    """Up to `steps` decode steps for S batch rows. rows (each leading dim S): slot int32 (the cache
    slot the row decodes; S is a power-of-two bucket of the active slots, padded with inactive
    rows, so a lone request does not pay for the whole cache), token int32 (the last sampled
    token, fed next), pos int32 (its cache position), t int32 (its index in the request:
    the next token drawn is t + 1), active bool, remaining int32 (tokens still allowed), stops
    int32 (S, N_STOP) (-1 = none), key uint32 (S, 2), and the `row_knobs`. Returns the cache and
    {"tokens": int32 (S, steps) (-1 where a row made none), "n": int32 (S,) tokens made, and with
    logprobs "logprob" (S, steps), "top_ids" int32 (S, steps, N_TOP), "top_logprobs"}, and
    "state": the rows' token, pos, t, active, remaining after the chunk (so the next chunk can
    start from them on device, before the host has looked at this one). kernel: attend with
    ffi.decode_attention over the slot cache in place (`use_attention_kernel`), window unused."""
    S = rows["token"].shape[0]  # batch rows (a bucket of the active slots), not the cache's slots
    K = cfg.kv_heads
    C = cache_len(cfg)
    knobs = {k: rows[k] for k in ("temperature", "top_k", "top_p", "min_p", "greedy")}
    zeros = jnp.zeros((S,), jnp.int32)
    out = {"tokens": jnp.full((S, steps), -1, jnp.int32), "n": zeros}
    if logprobs:
        out["logprob"] = jnp.zeros((S, steps), jnp.float32)
        out["top_ids"] = jnp.zeros((S, steps, N_TOP), jnp.int32)
        out["top_logprobs"] = jnp.zeros((S, steps, N_TOP), jnp.float32)
    st = {k: rows[k] for k in ("token", "pos", "t", "active", "remaining")}

    def cond(carry):
        i, _, st, _ = carry
        return (i < steps) & jnp.any(st["active"])

    # With the CPU attention kernel (use_attention_kernel) each step writes its K/V straight into
    # the slot cache and the kernel reads every row's own positions there. Otherwise the rows'
    # windows are copied out of the slot cache once per chunk, decoded in (each step writes its K/V
    # into them and XLA's batched dots attend over them), and written back after the chunk: a copy
    # per step cost batch 8 ~1.2x against engine.py's decode. window_for() makes the window hold
    # every position the chunk reaches (furthest + steps).
    if kernel:
        windows = cache
        w_rows = rows["slot"][:, None] * K + jnp.arange(K, dtype=jnp.int32)  # (S, K) cache rows
        w_rows = w_rows.reshape(S * K)
    else:
        windows = [(_window_rows(kc, rows["slot"], K, window), _window_rows(vc, rows["slot"], K, window))
                   for kc, vc in cache]
        w_rows = jnp.arange(S * K, dtype=jnp.int32)
    # RoPE's cos/sin for every step of the chunk, made before the loop (engine.window_rope says
    # why): an active row feeds position pos + i at step i (inactive rows' outputs are unused).
    rope = None
    if cfg.pos_emb == "rope":
        ahead = jnp.minimum(rows["pos"][:, None] + jnp.arange(steps, dtype=jnp.int32), cfg.max_seq_len - 1)
        rope = rope_table(ahead, cfg.resolved_head_dim, cfg.rope_theta)  # each (S, steps, 1, H/2)

    def body(carry):
        i, windows, st, out = carry
        active, pos = st["active"], st["pos"]
        # Inactive rows write out of range (dropped), so a free slot is left alone.
        cols = jnp.repeat(jnp.where(active, pos, C if kernel else window), K)[:, None]  # (S*K, 1)

        def attend(q, k, v, layer_window):
            kw, vw = layer_window
            kw, vw = _put(kw, w_rows, cols, _heads_first(k)), _put(vw, w_rows, cols, _heads_first(v))
            if kernel:  # every row over its own positions [0, pos], read from the cache in place
                out = ffi.decode_attention(q[:, 0], kw, vw, rows["slot"], pos + 1, K)
                return out[:, None].astype(q.dtype), (kw, vw)
            return _decode_attention(q, kw, vw, pos[:, None], zeros), (kw, vw)

        positions = jnp.minimum(pos, cfg.max_seq_len - 1)[:, None]  # (S, 1)
        rope_cs = None if rope is None else tuple(jax.lax.dynamic_slice_in_dim(t, i, 1, 1) for t in rope)
        x, windows = hidden_states(params, st["token"][:, None], cfg, positions=positions, attend=attend,
                                   layer_states=windows, rope_cs=rope_cs)
        logits = unembed(params, x, cfg)  # (S, V)
        t_new = st["t"] + 1
        nxt = sample_rows(logits, _row_keys(rows["key"], t_new), knobs, greedy_only)
        out = dict(out)
        out["tokens"] = out["tokens"].at[:, i].set(jnp.where(active, nxt, -1))
        out["n"] = out["n"] + active
        if logprobs:
            lp, top_ids, top_lp = row_logprobs(logits, knobs["temperature"], nxt, N_TOP)
            out["logprob"] = out["logprob"].at[:, i].set(lp)
            out["top_ids"] = out["top_ids"].at[:, i].set(top_ids)
            out["top_logprobs"] = out["top_logprobs"].at[:, i].set(top_lp)
        hit = jnp.any(nxt[:, None] == rows["stops"], axis=-1)
        remaining = st["remaining"] - active
        st = {"token": jnp.where(active, nxt, st["token"]), "pos": pos + active,
              "t": jnp.where(active, t_new, st["t"]), "remaining": remaining,
              "active": active & ~hit & (remaining > 0)}
        return i + 1, windows, st, out

    _, windows, st, out = jax.lax.while_loop(cond, body, (jnp.int32(0), windows, st, out))
    if kernel:
        return windows, dict(out, state=st)
    cache = [(_put_window_rows(kc, kw, rows["slot"], K), _put_window_rows(vc, vw, rows["slot"], K))
             for (kc, vc), (kw, vw) in zip(cache, windows, strict=True)]
    return cache, dict(out, state=st)


@functools.cache
def _decode_chunk_jit() -> Any:
    options = _CPU_DECODE_OPTIONS if jax.default_backend() == "cpu" else None
    static = ("cfg", "steps", "window", "greedy_only", "logprobs", "kernel")
    return jax.jit(_decode_chunk, static_argnames=static,
                   donate_argnums=(1,), compiler_options=options)


def decode_chunk(params: Params, cache: SlotCache, rows: dict[str, Any], *, cfg: ModelConfig, steps: int,
                 window: int, greedy_only: bool, logprobs: bool) -> tuple[SlotCache, dict[str, jax.Array]]:
    """The jitted `_decode_chunk` (cache donated; its docstring gives the shapes), attending with
    the CPU kernel where `use_attention_kernel` says so (decided per call, so the switch works
    between calls in one process)."""
    kernel = use_attention_kernel(cfg, cache)
    if kernel:  # the kernel reads each row's own positions: one executable for every window
        window = cache_len(cfg)
    return _decode_chunk_jit()(params, cache, rows, cfg=cfg, steps=steps, window=window,
                               greedy_only=greedy_only, logprobs=logprobs, kernel=kernel)


@functools.partial(jax.jit, donate_argnums=(1,))
def save_blocks(cache: SlotCache, pool: SlotCache, slot: jax.Array, src: jax.Array,
                dst: jax.Array) -> SlotCache:
    """Copies slot `slot`'s blocks src[i] (block i = cache positions [i*BLOCK, (i+1)*BLOCK)) into
    pool blocks dst[i]; src, dst int32 (C/BLOCK,), dst = pool size for entries to skip (dropped).
    Returns the pool (donated)."""

    def one(a, p):
        K = p.shape[1]
        v = jax.lax.dynamic_slice_in_dim(a, slot * K, K, 0)  # (K, C, ...)
        v = v.reshape(K, a.shape[1] // BLOCK, BLOCK, *a.shape[2:])
        return p.at[dst].set(jnp.moveaxis(v, 1, 0)[src], mode="drop")

    return jax.tree.map(one, cache, pool)


@functools.partial(jax.jit, donate_argnums=(0,))
def load_blocks(cache: SlotCache, pool: SlotCache, slot: jax.Array, ids: jax.Array) -> SlotCache:
    """Fills slot `slot`'s cache positions [0, C) from pool blocks ids (int32 (C/BLOCK,)): the
    reused prefix first; entries past it may name any block (what they bring in is overwritten
    before it is read). Returns the cache (donated)."""

    def one(a, p):
        K = p.shape[1]
        blocks = jnp.moveaxis(p[ids], 0, 1)  # (K, C/BLOCK, BLOCK, ...)
        return jax.lax.dynamic_update_slice_in_dim(a, blocks.reshape(K, *a.shape[1:]), slot * K, 0)

    return jax.tree.map(one, cache, pool)
