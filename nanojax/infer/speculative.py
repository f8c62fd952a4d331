"""Speculative decoding on the compiled engine (device code): a cheap drafter proposes k tokens,
the target checks all of them in one forward over its KV cache, and every token it keeps is
exactly what the target alone would have produced (greedy) or a sample from the target's own
distribution (sampling).

Sources: Leviathan, Kalman & Matias 2023, "Fast Inference from Transformers via Speculative
Decoding" (algorithm 1 and appendix A.1, the proof that the output follows p); Chen et al. 2023,
"Accelerating Large Language Model Decoding with Speculative Sampling" (the same rejection rule);
prompt lookup (n-gram drafting from the row's own history) as in HF's prompt_lookup_num_tokens
and vLLM's ngram proposer. Read infer/engine.py first: this module reuses its cache layout
(left-padded rows, one shared write slot, [B*K, W, H] per layer), its prefill and its windows.

One iteration of the while_loop (t tokens emitted so far; `token` = the last one, at slot
s = P + t - 1, not yet fed to either model):

1. Draft. With a draft model: one 2-token step feeds (prev, token) at slots (s-1, s), then k-1
   one-token steps feed d_1 .. d_{k-1}; each samples the next d_i from the draft's q_i (after
   the same sampler transforms as the target). Re-feeding `prev` rewrites slot s-1 with what was
   there or, when the previous iteration accepted all k, fills the one slot (d_k's) that the
   draft never fed, so its cache needs no catch-up step. With prompt lookup: the longest n-gram
   (<= ngram) ending at `token` that also occurs earlier in the row's history proposes the k
   tokens that followed its most recent occurrence; q is one-hot.
2. Verify: ONE target forward over the k+1 tokens (token, d_1 .. d_k) at slots s .. s+k, causal
   inside them, giving p_0 .. p_k.
3. Accept. Greedy: the longest prefix with d_{i+1} == argmax p_i, then argmax p at the first
   mismatch (or p_k when all match). Sampling: accept d_{i+1} with probability
   min(1, p_i(d)/q_{i+1}(d)); at the first rejection draw from normalize(max(0, p_i - q_{i+1}));
   after k acceptances draw a bonus from p_k.
4. Advance every row by n = the batch minimum of (accepted + 1): rows share a write slot, so
   they move together. Row b's n tokens are the first n of its own accept/correct sequence;
   each of those is, given the tokens before it, distributed exactly as p (greedy: equal to the
   argmax), and n depends only on earlier tokens and other rows' independent draws (a stopping
   time), so the emitted prefix is still an exact sample of the target. Slots past s + n hold
   KV of rejected tokens; the next iteration overwrites them before any query can read them.

The verify forward writes k+1 slots, so the cache has next_pow2(P + max_new + k + 1) slots and
a window runs while s + k < W. Everything (draft steps, verify, accept, counters) stays on
device inside one while_loop per window; the host syncs only when it fetches.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from nanojax.config import ModelConfig
from nanojax.infer.engine import (
    _CPU_DECODE_OPTIONS,
    MIN_PROMPT_BUCKET,
    _grow,
    _heads_first,
    _next_pow2,
    _prefill,
    _windows,
    _write,
)
from nanojax.model import Params, hidden_states, unembed
from nanojax.sampling import SamplerSpec, sample, sampler_probs

Cache = list[tuple[jax.Array, jax.Array]]
State = dict[str, Any]
_NEG = float(jnp.finfo(jnp.float32).min)


@dataclasses.dataclass(frozen=True)
class DraftSpec:
    """The static part of a speculative run: the draft model's config (None: prompt lookup),
    k = tokens proposed per iteration, and the longest n-gram prompt lookup matches."""

    cfg: ModelConfig | None
    k: int
    ngram: int = 3


# ----------------------------------------------------------------------------------------------
# A multi-token step over the cache (the verify forward; the draft's steps).


def _slots_attention(q: jax.Array, kc: jax.Array, vc: jax.Array, slot: jax.Array,
                     pad: jax.Array) -> jax.Array:
    """T queries per row at slots slot .. slot+T-1 over a W-slot cache whose slots up to slot+T-1
    are written. q: (B, T, N, H); kc, vc: (B*K, W, H). Query i sees slots [pad[b], slot + i]
    (causal inside the new tokens, no pad). Softmax in float32. Returns (B, T, N, H).
    As engine._decode_attention, with the T queries of a kv head as extra rows of one matmul."""
    B, T, N, H = q.shape
    W = kc.shape[1]
    K = kc.shape[0] // B
    G = N // K
    qg = q.reshape(B, T, K, G, H).transpose(0, 2, 1, 3, 4).reshape(B * K, T * G, H)
    scores = jnp.einsum("nqh,nwh->nqw", qg, kc, preferred_element_type=jnp.float32) * (H**-0.5)
    w = jnp.arange(W, dtype=jnp.int32)
    last = slot + jnp.repeat(jnp.arange(T, dtype=jnp.int32), G)  # (T*G,) last visible slot per row
    mask = (w[None, None, :] >= pad[:, None, None]) & (w[None, None, :] <= last[None, :, None])  # (B,TG,W)
    scores = jnp.where(jnp.repeat(mask, K, axis=0), scores, _NEG)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("nqw,nwh->nqh", probs.astype(vc.dtype), vc)  # (B*K, T*G, H)
    return out.reshape(B, K, T, G, H).transpose(0, 2, 1, 3, 4).reshape(B, T, N, H)


def _step(params: Params, cfg: ModelConfig, cache: Cache, tokens: jax.Array, slot: jax.Array,
          pad: jax.Array) -> tuple[jax.Array, Cache]:
    """Feeds tokens (B, T) at slots slot .. slot+T-1; returns float32 logits (B, T, V) and the cache."""
    B, T = tokens.shape

    def attend(q, k, v, layer_cache):
        kc, vc = layer_cache
        kc, vc = _write(kc, _heads_first(k), slot), _write(vc, _heads_first(v), slot)
        return _slots_attention(q, kc, vc, slot, pad), (kc, vc)

    # Slots past the budget (rejected overshoot) may pass the context; their outputs are never
    # kept, so clamping keeps learned-position lookups in range without changing a kept token.
    positions = slot + jnp.arange(T, dtype=jnp.int32)[None, :] - pad[:, None]  # (B, T)
    positions = jnp.minimum(positions, cfg.max_seq_len - 1)
    x, cache = hidden_states(params, tokens, cfg, positions=positions, attend=attend, layer_states=cache)
    return unembed(params, x, cfg).reshape(B, T, -1), cache


# ----------------------------------------------------------------------------------------------
# Drafting and acceptance.


def speculative_accept(p: jax.Array, q: jax.Array, draft: jax.Array,
                       key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Speculative rejection sampling (Leviathan et al. 2023, algorithm 1; Chen et al. 2023).

    p: float32 (B, k+1, V) target probabilities at the k+1 verified positions; q: float32
    (B, k, V) the draft's probabilities its tokens were drawn from; draft: int32 (B, k).
    Returns (accepted (B,) int32 in [0, k], next (B,) int32): draft[:, :accepted] are kept and
    `next` follows them, drawn from normalize(max(0, p_a - q_a)) at the first rejection a, or
    from p_k when all k were accepted. For a deterministic drafter q is one-hot.
    """
    B, k1, V = p.shape
    k = k1 - 1
    k_u, k_r = jax.random.split(key)
    p_d = jnp.take_along_axis(p[:, :k], draft[..., None], axis=-1)[..., 0]  # (B, k)
    q_d = jnp.take_along_axis(q, draft[..., None], axis=-1)[..., 0]
    u = jax.random.uniform(k_u, (B, k))
    # u < p/q without dividing (q_d > 0: the draft drew this token from q).
    ok = u * q_d < p_d
    accepted = jnp.sum(jnp.cumprod(ok.astype(jnp.int32), axis=1), axis=1)  # (B,) length of the kept prefix
    resid = jnp.maximum(p[:, :k] - q, 0.0)  # (B, k, V)
    resid = jnp.concatenate([resid, p[:, k:]], axis=1)  # position k: the bonus draws from p_k
    r = jnp.take_along_axis(resid, accepted[:, None, None], axis=1)[:, 0]  # (B, V)
    # max(0, p - q) sums to 0 only when p == q, where rejection has probability 0; fall back to p.
    p_a = jnp.take_along_axis(p, accepted[:, None, None], axis=1)[:, 0]
    r = jnp.where(jnp.sum(r, axis=-1, keepdims=True) > 0, r, p_a)
    nxt = jax.random.categorical(k_r, jnp.log(r), axis=-1)  # unnormalised log-weights are fine
    return accepted.astype(jnp.int32), nxt.astype(jnp.int32)


def ngram_propose(hist: jax.Array, end: jax.Array, pad: jax.Array, k: int, ngram: int) -> jax.Array:
    """Prompt lookup: k proposed tokens per row from the row's own history.

    hist: int32 (B, L) tokens by slot; valid slots are [pad[b], end], end (scalar) holding the
    last token. Finds the longest m <= ngram such that hist[end-m+1 .. end] also occurs ending
    at an earlier slot i < end (the most recent such i), and proposes hist[i+1 .. i+k] (clipped
    to end). With no match it proposes the last token repeated. Returns int32 (B, k).
    """
    B, L = hist.shape
    i = jnp.arange(L, dtype=jnp.int32)
    tail = jax.lax.dynamic_slice(jnp.pad(hist, ((0, 0), (ngram, 0))), (0, end + 1), (B, ngram))  # (B, m)
    run = jnp.ones((B, L), bool)
    best = jnp.full((B,), -1, jnp.int32)  # ending slot of the chosen match
    for m in range(1, ngram + 1):
        shifted = jnp.pad(hist, ((0, 0), (m - 1, 0)))[:, :L]  # hist[i - (m-1)]
        run = run & (shifted == tail[:, ngram - m][:, None])
        ok = run & (i[None, :] < end) & (i[None, :] - (m - 1) >= pad[:, None])
        found = jnp.max(jnp.where(ok, i[None, :], -1), axis=1)  # most recent match of length m
        best = jnp.where(found >= 0, found, best)  # a longer match replaces a shorter one
    start = jnp.where(best >= 0, best + 1, end)
    idx = jnp.minimum(start[:, None] + jnp.arange(k, dtype=jnp.int32)[None, :], end)
    return jnp.take_along_axis(hist, idx, axis=1)


# ----------------------------------------------------------------------------------------------
# The compiled loop.


def _spec_loop(params: Params, cache: Cache, dparams: Params | None, dcache: Cache | None, state: State,
               limit: jax.Array, knobs: dict[str, jax.Array], stops: jax.Array, *, cfg: ModelConfig,
               spec: SamplerSpec, dspec: DraftSpec, window: int) -> tuple[Cache, Cache | None, State]:
    """Speculative iterations while t < limit, the verify's last slot is inside `window`, and some
    row is not done. Caches shorter than `window` are first padded to it."""
    k = dspec.k

    def cond(carry):
        st = carry[2]
        return (st["t"] < limit) & (st["p0"] + st["t"] - 1 + k < window) & ~jnp.all(st["done"])

    def body(carry):
        cache, dcache, st = carry
        t, pad, token = st["t"], st["pad"], st["token"]
        B = token.shape[0]
        s = st["p0"] + t - 1  # the slot of `token`
        key = jax.random.fold_in(jax.random.wrap_key_data(st["key"]), t)
        k_draft, k_acc = jax.random.split(key)
        if dspec.cfg is not None:
            logits, dcache = _step(dparams, dspec.cfg, dcache, jnp.stack([st["prev"], token], 1), s - 1, pad)
            ql, drafts, qs = logits[:, -1], [], []
            for i in range(k):
                if not spec.greedy:
                    qs.append(sampler_probs(ql, spec, knobs))
                d = sample(ql, jax.random.fold_in(k_draft, i), spec, knobs, None)
                drafts.append(d)
                if i < k - 1:
                    ql, dcache = _step(dparams, dspec.cfg, dcache, d[:, None], s + 1 + i, pad)
                    ql = ql[:, 0]
            drafts = jnp.stack(drafts, 1)  # (B, k)
        else:
            hist = jnp.concatenate([st["prompt"], st["out"]], axis=1)  # (B, P + n_out) by slot
            drafts = ngram_propose(hist, s, pad, k, dspec.ngram)
        fed = jnp.concatenate([token[:, None], drafts], axis=1)  # (B, k+1)
        p_logits, cache = _step(params, cfg, cache, fed, s, pad)  # (B, k+1, V)
        V = p_logits.shape[-1]
        if spec.greedy:
            tgt = jnp.argmax(p_logits, axis=-1).astype(jnp.int32)  # (B, k+1)
            accepted = jnp.sum(jnp.cumprod((drafts == tgt[:, :k]).astype(jnp.int32), axis=1), axis=1)
            emitted = tgt  # tgt[j] == drafts[j] for every j < accepted
        else:
            p = sampler_probs(p_logits.reshape(B * (k + 1), V), spec, knobs).reshape(B, k + 1, V)
            q = jnp.stack(qs, 1) if qs else jax.nn.one_hot(drafts, V, dtype=jnp.float32)
            accepted, nxt = speculative_accept(p, q, drafts, k_acc)
            j = jnp.arange(k + 1)[None, :]
            emitted = jnp.where(j < accepted[:, None], jnp.pad(drafts, ((0, 0), (0, 1))), nxt[:, None])
        active = ~st["done"]
        # Every row advances by the batch minimum (module docstring, step 4); finished rows don't bind.
        n = jnp.min(jnp.where(active, accepted + 1, k + 1))
        st = dict(st)
        st["out"] = jax.lax.dynamic_update_slice(st["out"], emitted, (0, t))
        kept = jnp.arange(k + 1)[None, :] < n
        hit = jnp.any((emitted[:, :, None] == stops[None, None, :]) & kept[:, :, None], axis=(1, 2))
        st["done"] = st["done"] | hit
        if "logits" in st:
            st["logits"] = jax.lax.dynamic_update_slice(st["logits"], p_logits, (0, t, 0))
        seq = jnp.concatenate([token[:, None], emitted], axis=1)  # (B, k+2)
        st["prev"] = jax.lax.dynamic_index_in_dim(seq, n - 1, axis=1, keepdims=False)
        st["token"] = jax.lax.dynamic_index_in_dim(seq, n, axis=1, keepdims=False)
        st["t"] = t + n
        st["proposed"] = st["proposed"] + k * jnp.sum(active, dtype=jnp.int32)
        st["accepted"] = st["accepted"] + jnp.sum(jnp.where(active, accepted, 0), dtype=jnp.int32)
        st["calls"] = st["calls"] + 1
        return cache, dcache, st

    cache = [(_grow(kc, window), _grow(vc, window)) for kc, vc in cache]
    if dcache is not None:
        dcache = [(_grow(kc, window), _grow(vc, window)) for kc, vc in dcache]
    return jax.lax.while_loop(cond, body, (cache, dcache, state))


@functools.cache
def _spec_jit(donate_cache: bool) -> Any:
    options = _CPU_DECODE_OPTIONS if jax.default_backend() == "cpu" else None
    return jax.jit(_spec_loop, static_argnames=("cfg", "spec", "dspec", "window"),
                   donate_argnums=(1, 3, 4) if donate_cache else (4,), compiler_options=options)


# ----------------------------------------------------------------------------------------------
# The host side of one round (same interface as engine._Round).


@dataclasses.dataclass
class _SpecRound:
    """Speculative decode of one batch of prompts, advanced chunk by chunk."""

    params: Params
    cfg: ModelConfig
    dparams: Params | None
    dspec: DraftSpec
    spec: SamplerSpec
    knobs: dict[str, jax.Array]
    stops: jax.Array
    max_new: int
    cache: Cache
    dcache: Cache | None
    state: State
    cache_len: int
    prompt_len: int
    t: int = 1  # host's lower bound on the device's t once every dispatched call has run

    def advance(self, t_end: int) -> None:
        """Dispatches window calls until token t_end (no host sync)."""
        t_end = min(t_end, self.max_new)
        P, k = self.prompt_len, self.dspec.k
        for w in _windows(P + k, self.cache_len):
            if self.t >= t_end:
                break
            if P + self.t - 1 + k >= w:
                continue
            same = self.cache[0][0].shape[1] == w
            self.cache, self.dcache, self.state = _spec_jit(same)(
                self.params, self.cache, self.dparams, self.dcache, self.state, np.int32(t_end), self.knobs,
                self.stops, cfg=self.cfg, spec=self.spec, dspec=self.dspec, window=w)
            # The call ran until t >= t_end or the next verify would leave the window.
            self.t = min(t_end, w - P + 1 - k)

    def fetch(self) -> tuple[np.ndarray, int]:
        """(tokens (B, t), t) so far, t <= max_new (an iteration may overshoot the budget)."""
        out, t = jax.device_get((self.state["out"], self.state["t"]))
        t = min(int(t), self.max_new)
        return out[:, :t], t

    def mark_done(self, rows: np.ndarray) -> None:
        self.state = dict(self.state, done=self.state["done"] | jnp.asarray(rows))

    def stats(self) -> dict[str, int]:
        got = jax.device_get({k: self.state[k] for k in ("proposed", "accepted", "calls")})
        return {k: int(v) for k, v in got.items()}


def start_speculative(params: Params, cfg: ModelConfig, dparams: Params | None, dspec: DraftSpec,
                      prompts: list[list[int]], max_new: int, spec: SamplerSpec, knobs: dict[str, jax.Array],
                      stops: jax.Array, seed: int, debug: bool) -> _SpecRound:
    """Prefills the target (sampling token 0 exactly as the plain engine does) and the draft
    model's cache over the same left-padded slots; returns the round to advance."""
    B = len(prompts)
    P = max(MIN_PROMPT_BUCKET, _next_pow2(max(len(p) for p in prompts)))
    cache_len = _next_pow2(P + max_new + dspec.k + 1)  # room for the last verify's overshoot
    tokens = np.zeros((B, P), np.int32)
    pad = np.zeros((B,), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, P - len(p):] = p
        pad[i] = P - len(p)
    window = _windows(P + dspec.k, cache_len)[0]
    seed_arr, round_arr = np.uint32(seed % 2**32), np.int32(0)
    cache, state = _prefill(params, tokens, pad, seed_arr, round_arr, knobs, stops, cfg=cfg, spec=spec,
                            window=window, n_out=cache_len - P, debug=debug)
    dcache = None
    if dspec.cfg is not None:
        # Only the draft's cache is kept; its sampled token is ignored (greedy: no sampler state).
        greedy = SamplerSpec(greedy=True, top_k=None, top_p=False, min_p=False, rep=False)
        dcache, _ = _prefill(dparams, tokens, pad, seed_arr, round_arr, knobs, stops, cfg=dspec.cfg,
                             spec=greedy, window=window, n_out=1, debug=False)
    state = dict(state, prev=jnp.asarray(tokens[:, -1]), proposed=jnp.int32(0), accepted=jnp.int32(0),
                 calls=jnp.int32(0))
    if dspec.cfg is None:
        state["prompt"] = jnp.asarray(tokens)
    return _SpecRound(params, cfg, dparams, dspec, spec, knobs, stops, max_new, cache, dcache, state,
                      cache_len, P)
