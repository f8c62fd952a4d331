"""Inference: bucketed prefill, a compiled decode loop over a preallocated KV cache, streaming.
The samplers it compiles in live in nanojax/sampling.py.

    out = nj.generate(params, cfg, [[1, 2, 3], [4, 5]], max_new_tokens=32, temperature=0.8,
                      top_k=40, stop_tokens=[0])          # -> [[new ids], [new ids]]
    for chunk in generate_stream(params, cfg, prompts, max_new_tokens=300, chunk_size=16,
                                 stop_strings=["\\n\\n"], detokenize=tok.decode):
        ...                                               # chunk: new ids per prompt, this chunk

How one call runs (B prompts of different lengths):

1. Every argument is checked on the host, before anything is compiled.
2. The prompts are left-padded into one (B, P) array, P a power-of-two bucket >= the longest
   prompt. Row b has pad[b] = P - len(prompt b) leading pad slots and its token in cache slot s
   has position s - pad[b], so learned positions and RoPE both count 0, 1, 2... per row. All rows
   write their next token into the same slot, so a cache write is one `dynamic_update_slice` for
   the whole batch; pad slots are masked out of attention.
3. Prefill: one jit call runs the P slots through the model (`hidden_states` with an `AttendFn`
   that writes K/V) into a fresh cache per layer and samples the first new token on device.
4. Decode: a `lax.while_loop` inside one jit; each iteration feeds the last token through the
   model (cache donated and updated in place), samples the next on device and stops early once
   every row has produced a stop token or the budget is spent. The budget fixes the cache length
   C = next_pow2(P + max_new_tokens) slots; the loop runs once per power-of-two *window* of it
   (64, 128, ..., C), and during the window ending at W the cache holds exactly W slots, so
   attention reads what the filled length costs (within 2x), not C. Attending over a long
   cache with a mask was 2x slower (DESIGN.md); the windows are how few compiled variants
   recover it. The host dispatches one call per window without waiting, and sees tokens only
   when it asks: at the end, or once per streamed chunk.

The KV cache, per layer (k, v), each [B*K, W, H] in the compute dtype: row b*K + k is batch row b's
kv head k, so both attention products are plain batched matmuls over a contiguous cache, with no
per-token copy of it. The window call that first reaches W pads the cache to W slots once (a
copy per doubling, ~log2(C) per call); within a window it is donated and written in place.

Stop semantics: a stop token id *is* included in the returned tokens (as in HF `generate`), and
nothing after it is; a stop string is *not* included: the output is cut just before it (on token
boundaries; a token that straddles the stop string's start is dropped).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from nanojax.attention import attention
from nanojax.config import ModelConfig
from nanojax.model import Params, hidden_states, unembed
from nanojax.sampling import SamplerSpec, check_sampling, make_spec, sample

Cache = list[tuple[jax.Array, jax.Array]]  # per layer (k, v), each [B*K, W, H] (module docstring)
State = dict[str, Any]

MIN_PROMPT_BUCKET = 8  # P is a power of two >= this (and <= the cache length)
MIN_WINDOW = 64  # smallest attention window: below it, reading a few unused slots costs nothing
_NEG = float(jnp.finfo(jnp.float32).min)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


# ----------------------------------------------------------------------------------------------
# The compiled pieces: prefill and the windowed decode loop.


def _accept(state: State, logits: jax.Array, spec: SamplerSpec, knobs: dict[str, jax.Array],
            stops: jax.Array) -> State:
    """Samples token t from logits (B, V), records it and advances t."""
    t = state["t"]
    B = logits.shape[0]
    key = jax.random.fold_in(jax.random.wrap_key_data(state["key"]), t)
    nxt = sample(logits, key, spec, knobs, state.get("seen"))  # (B,)
    state = dict(state)
    state["out"] = jax.lax.dynamic_update_slice(state["out"], nxt[:, None], (0, t))
    state["done"] = state["done"] | jnp.any(nxt[:, None] == stops[None, :], axis=-1)
    if "seen" in state:
        state["seen"] = state["seen"].at[jnp.arange(B), nxt].set(True)
    if "logits" in state:
        state["logits"] = jax.lax.dynamic_update_slice(state["logits"], logits[:, None], (0, t, 0))
    state["token"] = nxt
    state["t"] = t + 1
    return state


def _heads_first(x: jax.Array) -> jax.Array:
    """(B, T, K, H) keys or values -> (B*K, T, H), the cache's layout."""
    B, T, K, H = x.shape
    return x.transpose(0, 2, 1, 3).reshape(B * K, T, H)


@functools.partial(jax.jit, static_argnames=("cfg", "spec", "window", "n_out", "debug"))
def _prefill(params: Params, tokens: jax.Array, pad: jax.Array, seed: jax.Array, round_idx: jax.Array,
             knobs: dict[str, jax.Array], stops: jax.Array, *, cfg: ModelConfig, spec: SamplerSpec,
             window: int, n_out: int, debug: bool) -> tuple[Cache, State]:
    """tokens: int32 (B, P) left-padded; pad: int32 (B,). Returns a cache of `window` slots
    holding the prompts' K/V, and the decode state with the first new token sampled."""
    B, P = tokens.shape
    K, H, V = cfg.kv_heads, cfg.resolved_head_dim, cfg.vocab_size
    slots = jnp.arange(P, dtype=jnp.int32)
    valid = slots[None, :] >= pad[:, None]  # (B, P): not a pad slot
    positions = jnp.maximum(slots[None, :] - pad[:, None], 0)  # (B, P)
    mask = (slots[None, :, None] >= slots[None, None, :]) & valid[:, None, :]  # (B, T, S) causal, no pad

    def attend(q, k, v, layer_cache):
        kc, vc = layer_cache
        kc = jax.lax.dynamic_update_slice(kc, _heads_first(k.astype(kc.dtype)), (0, 0, 0))
        vc = jax.lax.dynamic_update_slice(vc, _heads_first(v.astype(vc.dtype)), (0, 0, 0))
        return attention(q, k, v, mask=mask, impl="xla"), (kc, vc)

    shape = (B * K, window, H)
    cache = [(jnp.zeros(shape, cfg.compute_dtype), jnp.zeros(shape, cfg.compute_dtype))
             for _ in range(cfg.n_layer)]
    x, cache = hidden_states(params, tokens, cfg, positions=positions, attend=attend, layer_states=cache)
    last = x.reshape(B, P, cfg.d_model)[:, -1]  # (B, D): every row's prompt ends at slot P - 1
    logits = unembed(params, last, cfg)  # (B, V) float32

    state: State = {
        "t": jnp.int32(0),
        "p0": jnp.int32(P),  # slot of new token 0
        "pad": pad,
        # Raw key data, not a typed key: a typed key in the state costs ~70 us of Python checks
        # every time a call returns it. A fresh stream per slide round.
        "key": jax.random.key_data(jax.random.fold_in(jax.random.key(seed), round_idx)),
        "out": jnp.zeros((B, n_out), jnp.int32),
        "done": jnp.zeros((B,), bool),
        "token": jnp.zeros((B,), jnp.int32),
    }
    if spec.rep:
        rows = jnp.broadcast_to(jnp.arange(B)[:, None], (B, P))
        state["seen"] = jnp.zeros((B, V), bool).at[rows, tokens].max(valid)
    if debug:
        state["logits"] = jnp.zeros((B, n_out, V), jnp.float32)
    return cache, _accept(state, logits, spec, knobs, stops)


def _decode_attention(q: jax.Array, kc: jax.Array, vc: jax.Array, slot: jax.Array,
                      pad: jax.Array) -> jax.Array:
    """One query per row over cache slots [pad[b], slot] of a W-slot cache.

    q: (B, 1, N, H); kc, vc: (B*K, W, H). Returns (B, 1, N, H). Softmax in float32.
    With (batch, kv head) as the one leading batch dimension, both products are batched matmuls
    that read the cache where it lies. Both earlier layouts paid a copy of the window per layer
    per token, because XLA:CPU's dot wants its batch dimensions major: [B, C, K, H] (slot-major,
    batch and heads split by the slot axis), and [B, K, C, H] (a window slice of it is strided).
    A 4-d [B, K, W, H] cache copied as well: at batch 1 XLA fused the cache write into the
    reshape feeding the dot and so had to copy the cache around the in-place write.
    """
    B, _, N, H = q.shape
    W = kc.shape[1]
    K = kc.shape[0] // B
    G = N // K  # query heads per kv head
    qg = q.reshape(B * K, G, H)
    scores = jnp.einsum("ngh,nwh->ngw", qg, kc, preferred_element_type=jnp.float32) * (H**-0.5)
    w = jnp.arange(W, dtype=jnp.int32)
    mask = (w[None, :] >= pad[:, None]) & (w[None, :] <= slot)  # (B, W)
    scores = jnp.where(jnp.repeat(mask, K, axis=0)[:, None, :], scores, _NEG)
    probs = jax.nn.softmax(scores, axis=-1).astype(vc.dtype)  # over W
    out = jnp.einsum("ngw,nwh->ngh", probs, vc)  # (B*K, G, H)
    return out.reshape(B, 1, N, H)


def _decode_loop(params: Params, cache: Cache, state: State, limit: jax.Array, knobs: dict[str, jax.Array],
                 stops: jax.Array, *, cfg: ModelConfig, spec: SamplerSpec,
                 window: int) -> tuple[Cache, State]:
    """Decodes while t < limit, the fed slot is inside `window`, and some row is not done.
    A cache shorter than `window` slots is first padded to it."""

    def cond(carry):
        _, st = carry
        slot = st["p0"] + st["t"] - 1
        return (st["t"] < limit) & (slot < window) & ~jnp.all(st["done"])

    def body(carry):
        cache, st = carry
        slot = st["p0"] + st["t"] - 1  # where the token being fed goes
        pad = st["pad"]

        def attend(q, k, v, layer_cache):
            kc, vc = layer_cache
            kc = jax.lax.dynamic_update_slice(kc, _heads_first(k.astype(kc.dtype)), (0, slot, 0))
            vc = jax.lax.dynamic_update_slice(vc, _heads_first(v.astype(vc.dtype)), (0, slot, 0))
            return _decode_attention(q, kc, vc, slot, pad), (kc, vc)

        positions = (slot - pad)[:, None]  # (B, 1)
        x, cache = hidden_states(params, st["token"][:, None], cfg, positions=positions, attend=attend,
                                 layer_states=cache)
        logits = unembed(params, x, cfg)  # (B, V)
        return cache, _accept(st, logits, spec, knobs, stops)

    def grow(c: jax.Array) -> jax.Array:
        return jnp.pad(c, ((0, 0), (0, window - c.shape[1]), (0, 0)))

    cache = [(grow(kc), grow(vc)) for kc, vc in cache]
    return jax.lax.while_loop(cond, body, (cache, state))


# XLA:CPU rewrites every reduction longer than 32 into a reduce-window plus a reduce (pairwise sums,
# for the accuracy of long reductions). A decode step reduces only over d_model and the attention
# window, and those extra thunks cost ~3% of a small model's step (docs/performance.md), so the
# decode executable skips that pass on CPU. Other backends compile it as is.
_CPU_DECODE_OPTIONS = {"xla_disable_hlo_passes": "tree_reduction_rewriter"}


@functools.cache
def _decode_jit(donate_cache: bool) -> Callable:
    options = _CPU_DECODE_OPTIONS if jax.default_backend() == "cpu" else None
    return jax.jit(_decode_loop, static_argnames=("cfg", "spec", "window"),
                   donate_argnums=(1, 2) if donate_cache else (2,), compiler_options=options)


def _decode(params: Params, cache: Cache, *args: Any, window: int, **kwargs: Any) -> tuple[Cache, State]:
    """The jitted decode loop, state donated; the cache too unless it grows to a new window
    (a buffer of another shape cannot take the result). See _decode_loop."""
    same = cache[0][0].shape[1] == window
    return _decode_jit(same)(params, cache, *args, window=window, **kwargs)


def _windows(first_slot: int, cache_len: int) -> list[int]:
    """Power-of-two window ends covering slots [first_slot, cache_len)."""
    w = max(MIN_WINDOW, _next_pow2(first_slot + 1))
    ends = []
    while w < cache_len:
        ends.append(w)
        w *= 2
    return ends + [cache_len]


# ----------------------------------------------------------------------------------------------
# Validation: every bad input is a clear error before anything compiles.


def _check_ids(ids: Any, vocab_size: int, what: str) -> list[int]:
    arr = np.asarray(ids)
    if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"{what} must be a flat list of int token ids, got {ids!r:.80}")
    if arr.size and (arr.min() < 0 or arr.max() >= vocab_size):
        bad = arr[(arr < 0) | (arr >= vocab_size)][0]
        raise ValueError(f"{what} holds token id {int(bad)}, outside the vocabulary [0, {vocab_size})")
    return [int(i) for i in arr]


def _check_prompts(prompts: Any, cfg: ModelConfig) -> list[list[int]]:
    if isinstance(prompts, str) or not isinstance(prompts, Sequence) or len(prompts) == 0:
        raise ValueError("prompts must be a non-empty list of token-id lists, e.g. [[1, 2, 3], [4, 5]]; "
                         "encode text with the tokenizer first")
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, int | np.integer):
            raise ValueError(f"prompts[{i}] is a single int: pass a list of prompts, e.g. [[...]]")
        ids = _check_ids(p, cfg.vocab_size, f"prompts[{i}]")
        if not ids:
            raise ValueError(f"prompts[{i}] is empty: every prompt needs at least one token "
                             "(e.g. a BOS or newline token)")
        if len(ids) > cfg.max_seq_len:
            raise ValueError(f"prompts[{i}] has {len(ids)} tokens, more than the context "
                             f"max_seq_len={cfg.max_seq_len}; shorten it (e.g. keep its last tokens)")
        out.append(ids)
    return out


def _validate(params: Params, cfg: ModelConfig, prompts: Any, max_new_tokens: int, temperature: float,
              top_k: int | None, top_p: float | None, min_p: float | None,
              repetition_penalty: float | None, stop_tokens: Any, overflow: str, chunk_size: int,
              stop_strings: Any, detokenize: Any) -> tuple[list[list[int]], list[int]]:
    if not isinstance(cfg, ModelConfig):
        raise TypeError(f"cfg must be a nanojax ModelConfig, got {type(cfg).__name__} "
                        "(the argument order is generate(params, cfg, prompts, ...))")
    prompts = _check_prompts(prompts, cfg)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int | np.integer) \
            or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    check_sampling(temperature, top_k, top_p, min_p, repetition_penalty, cfg.vocab_size)
    if overflow not in ("error", "slide"):
        raise ValueError(f"overflow must be 'error' or 'slide', got {overflow!r}")
    if overflow == "error":
        longest = max(len(p) for p in prompts)
        if longest + max_new_tokens > cfg.max_seq_len:
            raise ValueError(
                f"the longest prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                f"context max_seq_len={cfg.max_seq_len}; lower max_new_tokens to "
                f"{cfg.max_seq_len - longest}, shorten the prompt, or pass overflow='slide'"
            )
    if not isinstance(chunk_size, int | np.integer) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
    stops = [] if stop_tokens is None else _check_ids(
        [stop_tokens] if isinstance(stop_tokens, int | np.integer) else stop_tokens,
        cfg.vocab_size, "stop_tokens")
    if stop_strings is not None:
        if isinstance(stop_strings, str) or not all(isinstance(s, str) and s for s in stop_strings):
            raise ValueError(f"stop_strings must be a list of non-empty strings, got {stop_strings!r}")
        if detokenize is None:
            raise ValueError("stop_strings need detokenize=tokenizer.decode to turn ids into text")
    wte = params.get("wte") if isinstance(params, dict) else None
    if wte is None or tuple(wte.shape) != (cfg.vocab_size, cfg.d_model):
        raise ValueError(f"params do not match cfg: wte is {getattr(wte, 'shape', None)}, expected "
                         f"({cfg.vocab_size}, {cfg.d_model})")
    return prompts, stops


# ----------------------------------------------------------------------------------------------
# Host side: one round (prefill + chunks of decode), streaming, and sliding past the context.


@dataclasses.dataclass
class _Round:
    """Decode of one batch of prompts, advanced chunk by chunk."""

    params: Params
    cfg: ModelConfig
    spec: SamplerSpec
    knobs: dict[str, jax.Array]
    stops: jax.Array
    max_new: int
    cache: Cache
    state: State
    cache_len: int
    prompt_len: int
    t: int = 1  # host's upper bound on the device's t (equal unless every row stopped early)

    def advance(self, t_end: int) -> None:
        """Dispatches decode calls up to token t_end (no host sync)."""
        t_end = min(t_end, self.max_new)
        for w in _windows(self.prompt_len, self.cache_len):
            if self.t >= t_end:
                break
            if self.prompt_len + self.t - 1 >= w:
                continue
            self.cache, self.state = _decode(
                self.params, self.cache, self.state, np.int32(t_end), self.knobs, self.stops,
                cfg=self.cfg, spec=self.spec, window=w)
            self.t = min(t_end, w - self.prompt_len + 1)

    def fetch(self) -> tuple[np.ndarray, int]:
        """(tokens (B, t), t) generated so far; waits for the device. One transfer, sliced on the
        host (slicing on device would compile a new slice for every t)."""
        out, t = jax.device_get((self.state["out"], self.state["t"]))
        return out[:, : int(t)], int(t)

    def mark_done(self, rows: np.ndarray) -> None:
        self.state = dict(self.state, done=self.state["done"] | jnp.asarray(rows))


def _start(params: Params, cfg: ModelConfig, prompts: list[list[int]], max_new: int, spec: SamplerSpec,
           knobs: dict[str, jax.Array], stops: jax.Array, seed: int, round_idx: int,
           debug: bool) -> _Round:
    B = len(prompts)
    longest = max(len(p) for p in prompts)
    P = max(MIN_PROMPT_BUCKET, _next_pow2(longest))
    cache_len = _next_pow2(P + max_new)
    tokens = np.zeros((B, P), np.int32)
    pad = np.zeros((B,), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, P - len(p):] = p
        pad[i] = P - len(p)
    n_out = cache_len - P
    cache, state = _prefill(params, tokens, pad, np.uint32(seed % 2**32), np.int32(round_idx), knobs, stops,
                            cfg=cfg, spec=spec, window=_windows(P, cache_len)[0], n_out=n_out, debug=debug)
    return _Round(params, cfg, spec, knobs, stops, max_new, cache, state, cache_len, P)


def _stop_ids(stops: list[int]) -> np.ndarray:
    n = 8 * max(1, -(-len(stops) // 8))  # a multiple of 8 slots, so the count rarely recompiles
    arr = np.full((n,), -1, np.int32)
    arr[: len(stops)] = stops
    return arr


def _cut_at_stop_token(row: np.ndarray, stops: list[int]) -> list[int]:
    out = row.tolist()
    if stops:
        hits = np.flatnonzero(np.isin(row, stops))
        if hits.size:
            out = out[: hits[0] + 1]
    return out


class _TextWatch:
    """Stop strings on decoded text, checked at chunk boundaries on the host.

    Holds back tokens whose text could still be the start of a stop string, so what was already
    yielded never has to be taken back.
    """

    def __init__(self, stop_strings: list[str], detokenize: Callable[[list[int]], str]):
        self.stops = stop_strings
        self.decode = detokenize
        self.hold = max(len(s) for s in stop_strings) - 1

    def safe_len(self, toks: list[int], final: bool) -> tuple[int, bool]:
        """(number of tokens that may be emitted, whether a stop string was hit)."""
        text = self.decode(toks)
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            limit, stopped = min(hits), True
        elif final:
            return len(toks), False
        else:
            limit, stopped = len(text) - self.hold, False
        n = len(toks)
        while n > 0 and len(self.decode(toks[:n])) > limit:
            n -= 1
        return n, stopped


def generate_stream(
    params: Params,
    cfg: ModelConfig,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    repetition_penalty: float | None = None,
    stop_tokens: Sequence[int] | None = None,
    seed: int = 0,
    *,
    chunk_size: int = 16,
    stop_strings: Sequence[str] | None = None,
    detokenize: Callable[[list[int]], str] | None = None,
    overflow: str = "error",
) -> Iterator[list[list[int]]]:
    """Like `generate`, but yields the new tokens as they come: one list per prompt per chunk.

    Each chunk is one compiled multi-step decode call of up to `chunk_size` tokens, the KV cache
    carried from chunk to chunk; the host syncs once per chunk. Concatenating the yields gives
    exactly `generate`'s result for the same arguments and seed. A finished row yields [].

    stop_strings: text that ends a row; checked on `detokenize(tokens)` at chunk boundaries and
      cut off (the returned tokens decode to the text before the stop string). Tokens that could
      be the start of a stop string are held back until the next chunk decides.
    overflow: "error" (default) rejects prompt + max_new_tokens > cfg.max_seq_len. "slide" keeps
      going past the context like nanoGPT's crop: when the longest row's context is full, every
      unfinished row is re-prefilled with its last max_seq_len // 2 tokens and decoding goes on
      (positions restart at 0; the model sees only that window). Each slide costs one prefill.
    """
    prompts, stops = _validate(params, cfg, prompts, max_new_tokens, temperature, top_k, top_p, min_p,
                               repetition_penalty, stop_tokens, overflow, chunk_size, stop_strings,
                               detokenize)
    yield from _stream(params, cfg, prompts, int(max_new_tokens), temperature, top_k, top_p, min_p,
                       repetition_penalty, stops, seed, int(chunk_size), stop_strings, detokenize)


def _stream(params: Params, cfg: ModelConfig, prompts: list[list[int]], max_new: int, temperature: float,
            top_k: int | None, top_p: float | None, min_p: float | None,
            repetition_penalty: float | None, stops: list[int], seed: int, chunk_size: int,
            stop_strings: Sequence[str] | None, detokenize: Callable[[list[int]], str] | None,
            logits_log: list | None = None) -> Iterator[list[list[int]]]:
    """The validated core of generate_stream: rounds (one per slide) of prefill + decode chunks.

    logits_log: when a list, each round appends (rows, float32 logits (B_round, t, V)).
    """
    spec, knobs = make_spec(temperature, top_k, top_p, min_p, repetition_penalty)
    knobs = {k: jnp.asarray(v) for k, v in knobs.items()}  # on device once, not per call
    stop_arr = jnp.asarray(_stop_ids(stops))
    watch = _TextWatch(list(stop_strings), detokenize) if stop_strings else None
    B, T = len(prompts), cfg.max_seq_len
    generated: list[list[int]] = [[] for _ in range(B)]  # the new tokens so far, per row
    emitted = [0] * B  # how many of them were yielded
    finished = [max_new == 0] * B
    round_idx = 0
    while not all(finished):
        rows = [b for b in range(B) if not finished[b]]
        remaining = max_new - len(generated[rows[0]])  # all unfinished rows advance together
        ctx = [prompts[b] + generated[b] for b in rows]
        if round_idx > 0 or max(len(c) for c in ctx) >= T:  # the longest row filled the context:
            ctx = [c[-(T // 2):] for c in ctx]  # slide, every row to its last T // 2 tokens
        budget = min(remaining, T - max(len(c) for c in ctx))
        rnd = _start(params, cfg, ctx, budget, spec, knobs, stop_arr, seed, round_idx,
                     debug=logits_log is not None)
        base = [len(generated[b]) for b in rows]
        target = 0
        while True:
            target = min(budget, target + chunk_size)
            rnd.advance(target)
            toks, t = rnd.fetch()
            last = t >= budget
            chunk: list[list[int]] = [[] for _ in range(B)]
            newly_done = np.zeros((len(rows),), bool)
            for j, b in enumerate(rows):
                if finished[b]:
                    continue
                row = _cut_at_stop_token(toks[j], stops)
                hit_token = bool(stops) and len(row) > 0 and row[-1] in stops
                generated[b] = generated[b][: base[j]] + row
                n, hit_text = len(generated[b]), False
                if watch is not None:
                    final = hit_token or (last and remaining == budget)
                    n, hit_text = watch.safe_len(generated[b], final)
                    if hit_text:
                        generated[b] = generated[b][:n]
                chunk[b] = generated[b][emitted[b]:n]
                emitted[b] = n
                if hit_token or hit_text:
                    finished[b] = newly_done[j] = True
            if any(chunk):
                yield chunk
            if last or all(finished[b] for b in rows):
                break
            if newly_done.any():
                rnd.mark_done(newly_done)
        if logits_log is not None:
            logits_log.append((rows, np.asarray(rnd.state["logits"])[:, :t]))
        for b in rows:
            if len(generated[b]) >= max_new:
                finished[b] = True
        round_idx += 1
    tail = [generated[b][emitted[b]:] for b in range(B)]  # whatever a stop-string watch held back
    if any(tail):
        yield tail


def generate(
    params: Params,
    cfg: ModelConfig,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    repetition_penalty: float | None = None,
    stop_tokens: Sequence[int] | None = None,
    seed: int = 0,
    *,
    stop_strings: Sequence[str] | None = None,
    detokenize: Callable[[list[int]], str] | None = None,
    overflow: str = "error",
    return_logits: bool = False,
) -> list[list[int]] | tuple[list[list[int]], list[np.ndarray]]:
    """New tokens for each prompt: a ragged batch in, a ragged list of new token ids out.

    Args:
      prompts: B lists of int token ids in [0, V), of any lengths >= 1 (each gets its own
        positions, its own stop state).
      max_new_tokens: the budget per prompt, in tokens. prompt + budget must fit in
        cfg.max_seq_len unless overflow="slide" (see `generate_stream`).
      temperature: 0 is greedy (argmax; top_k/top_p/min_p are then ignored, repetition_penalty
        still applies, as in HF). > 0 divides the logits before sampling.
      top_k: sample among the k most likely tokens. top_p: among the smallest set whose
        probability mass is >= top_p (nucleus). min_p: drop tokens less likely than min_p x the
        most likely one. repetition_penalty: HF's, over prompt + generated tokens (> 1 discourages
        repeats). Applied in HF's order: penalty, temperature, top-k, top-p, min-p.
      stop_tokens: ids that end a row; the stop token is included in that row's output.
      seed: the sampling seed; same seed, same arguments -> same tokens (token t draws from
        fold_in(fold_in(key(seed), slide round), t), so streaming and chunking do not change the
        result).
      stop_strings, detokenize: cut each row before the first stop string in its decoded text.
      return_logits: also return, per prompt, the float32 (n, V) model logits (before any
        sampler) that produced each new token: a debugging and testing aid (costs memory).

    Returns:
      list of B lists of new token ids (and the logits list when return_logits).
    """
    prompts, stops = _validate(params, cfg, prompts, max_new_tokens, temperature, top_k, top_p, min_p,
                               repetition_penalty, stop_tokens, overflow, 1, stop_strings, detokenize)
    out: list[list[int]] = [[] for _ in prompts]
    logits_log: list | None = [] if return_logits else None
    # Without stop strings one chunk covers the whole budget: the host syncs once, at the end.
    chunk = 16 if stop_strings else max(1, int(max_new_tokens))
    for part in _stream(params, cfg, prompts, int(max_new_tokens), temperature, top_k, top_p, min_p,
                        repetition_penalty, stops, seed, chunk, stop_strings, detokenize, logits_log):
        for b, toks in enumerate(part):
            out[b].extend(toks)
    if logits_log is None:
        return out
    pieces: list[list[np.ndarray]] = [[] for _ in prompts]
    for rows, lg in logits_log:
        for j, b in enumerate(rows):
            pieces[b].append(lg[j])
    logits = [np.concatenate(p)[: len(o)] if p else np.zeros((0, cfg.vocab_size), np.float32)
              for p, o in zip(pieces, out, strict=True)]
    return out, logits
