"""The compiled engine of nanojax.infer: bucketed prefill and a windowed decode loop over a
preallocated KV cache, and `_Round`, which drives one batch of prompts through them.

How one call runs (B prompts of different lengths):

1. Every argument is checked on the host (infer/generate.py), before anything is compiled.
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

With cfg.attn_impl == "pallas", decode attention is the split-K Pallas kernel of
nanojax/kernels/decode_attention.py over the same cache (viewed as [B, K, W, H], rows
[pad[b], slot]); prefill and every other setting keep the XLA code below, unchanged.

The KV cache, per layer (k, v), each [B*K, W, H] in the compute dtype: row b*K + k is batch row b's
kv head k, so both attention products are plain batched matmuls over a contiguous cache, with no
per-token copy of it. With kv_cache_dtype="int8" each of k, v is an `Int8KV` record instead:
int8 values [B*K, W, H] and one float32 scale per token and kv head [B*K, W] (symmetric,
max|x| / 127 over the head dim, as in KIVI's per-token keys, Liu et al. 2024); the scales are
applied after the dots, so the cache is never dequantized whole.
The window call that first reaches W pads the cache to W slots once (a copy per doubling,
~log2(C) per call); within a window it is donated and written in place.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from nanojax.attention import attention
from nanojax.config import ModelConfig
from nanojax.kernels import decode_attention
from nanojax.model import Params, hidden_states, rope_table, unembed
from nanojax.quant import ffi
from nanojax.sampling import SamplerSpec, sample

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


@struct.dataclass
class Int8KV:
    """One layer's int8 keys or values: q int8 [B*K, W, H], scale float32 [B*K, W]."""

    q: jax.Array
    scale: jax.Array

    @property
    def shape(self) -> tuple[int, ...]:
        return self.q.shape


KV_CACHE_DTYPES = (None, "int8")


def _new_cache(shape: tuple[int, int, int], dtype: Any, kv_cache_dtype: str | None) -> Any:
    if kv_cache_dtype == "int8":
        return Int8KV(jnp.zeros(shape, jnp.int8), jnp.zeros(shape[:2], jnp.float32))
    return jnp.zeros(shape, dtype)


def _write(c: Any, x: jax.Array, slot: Any) -> Any:
    """Writes x [B*K, T, H] into cache c at slot `slot` (quantizing it for an Int8KV)."""
    if isinstance(c, Int8KV):
        xf = x.astype(jnp.float32)
        scale = jnp.max(jnp.abs(xf), axis=-1) / 127.0  # [B*K, T]
        inv = jnp.where(scale > 0, 1.0 / jnp.where(scale > 0, scale, 1.0), 0.0)
        q = jnp.clip(jnp.round(xf * inv[..., None]), -127, 127).astype(jnp.int8)
        return Int8KV(jax.lax.dynamic_update_slice(c.q, q, (0, slot, 0)),
                      jax.lax.dynamic_update_slice(c.scale, scale, (0, slot)))
    return jax.lax.dynamic_update_slice(c, x.astype(c.dtype), (0, slot, 0))


def _grow(c: Any, window: int) -> Any:
    if isinstance(c, Int8KV):
        extra = window - c.q.shape[1]
        return Int8KV(jnp.pad(c.q, ((0, 0), (0, extra), (0, 0))), jnp.pad(c.scale, ((0, 0), (0, extra))))
    return jnp.pad(c, ((0, 0), (0, window - c.shape[1]), (0, 0)))


def _heads_first(x: jax.Array) -> jax.Array:
    """(B, T, K, H) keys or values -> (B*K, T, H), the cache's layout."""
    B, T, K, H = x.shape
    return x.transpose(0, 2, 1, 3).reshape(B * K, T, H)


@functools.partial(jax.jit, static_argnames=("cfg", "spec", "window", "n_out", "debug", "kv_cache_dtype"))
def _prefill(params: Params, tokens: jax.Array, pad: jax.Array, seed: jax.Array, round_idx: jax.Array,
             knobs: dict[str, jax.Array], stops: jax.Array, *, cfg: ModelConfig, spec: SamplerSpec,
             window: int, n_out: int, debug: bool, kv_cache_dtype: str | None = None,
             lora: Any = None) -> tuple[Cache, State]:
    """tokens: int32 (B, P) left-padded; pad: int32 (B,). Returns a cache of `window` slots
    holding the prompts' K/V, and the decode state with the first new token sampled.
    lora: None, a LoraAdapter, or a StackedLora (one adapter per row): a traced argument, so
    every adapter of one shape shares the compiled call."""
    B, P = tokens.shape
    K, H, V = cfg.kv_heads, cfg.resolved_head_dim, cfg.vocab_size
    slots = jnp.arange(P, dtype=jnp.int32)
    valid = slots[None, :] >= pad[:, None]  # (B, P): not a pad slot
    positions = jnp.maximum(slots[None, :] - pad[:, None], 0)  # (B, P)
    mask = (slots[None, :, None] >= slots[None, None, :]) & valid[:, None, :]  # (B, T, S) causal, no pad

    def attend(q, k, v, layer_cache):
        kc, vc = layer_cache
        kc, vc = _write(kc, _heads_first(k), 0), _write(vc, _heads_first(v), 0)
        return attention(q, k, v, mask=mask, impl="xla"), (kc, vc)

    shape = (B * K, window, H)
    cache = [(_new_cache(shape, cfg.compute_dtype, kv_cache_dtype),
              _new_cache(shape, cfg.compute_dtype, kv_cache_dtype)) for _ in range(cfg.n_layer)]
    x, cache = hidden_states(params, tokens, cfg, positions=positions, attend=attend, layer_states=cache,
                             lora=lora)
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


def _kernel_decode_attention(q: jax.Array, kc: jax.Array, vc: jax.Array, slot: jax.Array,
                             pad: jax.Array) -> jax.Array:
    """`_decode_attention` through the CPU kernel (nanojax.quant.ffi.decode_attention): each (row, kv
    head) reads only its slots [pad[b], slot] of the window, in place, on both cores, with the
    softmax fused; XLA's batched dots read the whole window on one thread. q: (B, 1, N, H) float32;
    kc, vc: (B*K, W, H) float32. Returns (B, 1, N, H)."""
    B = q.shape[0]
    K = kc.shape[0] // B
    lens = jnp.broadcast_to(slot + 1, (B,)).astype(jnp.int32)
    out = ffi.decode_attention(q[:, 0], kc, vc, jnp.arange(B, dtype=jnp.int32), lens, K, starts=pad)
    return out[:, None]


def use_attention_kernel(cfg: ModelConfig, cache: Any) -> bool:
    """Whether the decode loop attends with the CPU kernel: attn_impl "auto", an fp32 cache (not
    Int8KV) on the CPU with the kernels' AVX-512 loop; NANOJAX_ATTN_KERNEL=0 turns it off (read at
    trace time)."""
    kc = cache[0][0]
    return (cfg.attn_impl == "auto" and not isinstance(kc, Int8KV) and kc.dtype == jnp.float32
            and ffi.attention_kernel_enabled(cfg.resolved_head_dim))


def _decode_attention(q: jax.Array, kc: Any, vc: Any, slot: jax.Array, pad: jax.Array) -> jax.Array:
    """One query per row over cache slots [pad[b], slot] of a W-slot cache.

    q: (B, 1, N, H); kc, vc: (B*K, W, H) arrays or Int8KV records. Returns (B, 1, N, H). Softmax
    in float32. An Int8KV's per-token scales multiply the scores (keys) and the probabilities
    (values): the dots read int8 values, scaled after, never a dequantized cache.
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
    if isinstance(kc, Int8KV):
        scores = jnp.einsum("ngh,nwh->ngw", qg.astype(jnp.float32), kc.q.astype(jnp.float32))
        scores = scores * kc.scale[:, None, :] * (H**-0.5)
    else:
        scores = jnp.einsum("ngh,nwh->ngw", qg, kc, preferred_element_type=jnp.float32) * (H**-0.5)
    w = jnp.arange(W, dtype=jnp.int32)
    mask = (w[None, :] >= pad[:, None]) & (w[None, :] <= slot)  # (B, W)
    scores = jnp.where(jnp.repeat(mask, K, axis=0)[:, None, :], scores, _NEG)
    probs = jax.nn.softmax(scores, axis=-1)  # over W
    if isinstance(vc, Int8KV):
        out = jnp.einsum("ngw,nwh->ngh", probs * vc.scale[:, None, :], vc.q.astype(jnp.float32))
        out = out.astype(q.dtype)
    else:
        out = jnp.einsum("ngw,nwh->ngh", probs.astype(vc.dtype), vc)  # (B*K, G, H)
    return out.reshape(B, 1, N, H)


def _pallas_decode_attention(q: jax.Array, kc: jax.Array, vc: jax.Array, slot: jax.Array,
                             pad: jax.Array) -> jax.Array:
    """`_decode_attention` through the split-K Pallas kernel (cfg.attn_impl == "pallas").
    q: (B, 1, N, H); kc, vc: (B*K, W, H), viewed as (B, K, W, H) without a copy. Row b's
    valid slots are [pad[b], slot]. Returns (B, 1, N, H)."""
    B, _, N, H = q.shape
    W = kc.shape[1]
    K = kc.shape[0] // B
    lengths = jnp.broadcast_to(slot + 1, pad.shape)  # every row has written up to this slot
    out = decode_attention(q[:, 0], kc.reshape(B, K, W, H), vc.reshape(B, K, W, H), lengths, starts=pad)
    return out[:, None]


def window_rope(cfg: ModelConfig, window: int) -> tuple[jax.Array, jax.Array] | None:
    """RoPE's cos and sin for positions 0 .. window-1, each float32 (window, H/2), made once per
    decode call, outside its while loop (None for learned positions). Made inside the loop, XLA:CPU
    fused the sin/cos into every layer's q and k fusions and evaluated them per element: ~6 us of
    every layer of a llama-134m step (docs/performance/decode.md, "Decode: the non-matmul ops")."""
    if cfg.pos_emb != "rope":
        return None
    cos, sin = rope_table(jnp.arange(window, dtype=jnp.int32)[None], cfg.resolved_head_dim, cfg.rope_theta)
    return cos[0, :, 0], sin[0, :, 0]


def step_rope(table: tuple[jax.Array, jax.Array] | None, positions: jax.Array
              ) -> tuple[jax.Array, jax.Array] | None:
    """`rope_table(positions)` gathered from `window_rope`'s table: positions (B, T) int, every one
    < window. Returns cos, sin (B, T, 1, H/2), or None."""
    if table is None:
        return None
    return table[0][positions][:, :, None, :], table[1][positions][:, :, None, :]


def _decode_loop(params: Params, cache: Cache, state: State, limit: jax.Array, knobs: dict[str, jax.Array],
                 stops: jax.Array, *, cfg: ModelConfig, spec: SamplerSpec,
                 window: int, lora: Any = None) -> tuple[Cache, State]:
    """Decodes while t < limit, the fed slot is inside `window`, and some row is not done.
    A cache shorter than `window` slots is first padded to it."""
    rope = window_rope(cfg, window)  # made once, read by every step (window_rope says why)
    attn = (_pallas_decode_attention if cfg.attn_impl == "pallas" else
            _kernel_decode_attention if use_attention_kernel(cfg, cache) else _decode_attention)

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
            kc, vc = _write(kc, _heads_first(k), slot), _write(vc, _heads_first(v), slot)
            return attn(q, kc, vc, slot, pad), (kc, vc)

        positions = (slot - pad)[:, None]  # (B, 1)
        x, cache = hidden_states(params, st["token"][:, None], cfg, positions=positions, attend=attend,
                                 layer_states=cache, lora=lora, rope_cs=step_rope(rope, positions))
        logits = unembed(params, x, cfg)  # (B, V)
        return cache, _accept(st, logits, spec, knobs, stops)

    cache = [(_grow(kc, window), _grow(vc, window)) for kc, vc in cache]
    return jax.lax.while_loop(cond, body, (cache, state))


# XLA:CPU rewrites every reduction longer than 32 into a reduce-window plus a reduce (pairwise sums,
# for the accuracy of long reductions). A decode step reduces only over d_model and the attention
# window, and those extra thunks cost ~3% of a small model's step (docs/performance/decode.md), so the
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
# One round on the host: prefill, then decode chunk by chunk.


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
    lora: Any = None  # None, a LoraAdapter or a StackedLora for these rows
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
                cfg=self.cfg, spec=self.spec, window=w, lora=self.lora)
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
           debug: bool, kv_cache_dtype: str | None = None, lora: Any = None) -> _Round:
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
                            cfg=cfg, spec=spec, window=_windows(P, cache_len)[0], n_out=n_out, debug=debug,
                            kv_cache_dtype=kv_cache_dtype, lora=lora)
    return _Round(params, cfg, spec, knobs, stops, max_new, cache, state, cache_len, P, lora)
