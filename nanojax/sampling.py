"""Samplers: greedy, temperature, top-k, top-p, min-p and repetition penalty, on device.

The decode loop (nanojax/infer/engine.py) compiles one `_sample` call into every step: the static
choices (`SamplerSpec`) are part of the compiled program and the values (`knobs`) travel as arrays, so
changing top_p or the temperature reuses the executable. `sample_tokens` is the same sampler as a
standalone function. Logits are float32 (B, V); the order of the transforms is HF's.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class SamplerSpec:
    """The static part of a sampler (what is compiled in); the values travel as arrays."""

    greedy: bool
    top_k: int | None
    top_p: bool
    min_p: bool
    rep: bool


def argmax(x: jax.Array) -> jax.Array:
    """jnp.argmax(x, axis=-1), exactly, as two plain integer reductions: x float (..., V) -> int32
    (...), the first index of the maximum (of the first NaN if the row has one, as jnp.argmax).

    jnp.argmax is one variadic (value, index) reduction, which XLA:CPU runs as scalar code: ~110 us
    a token over a 32000-token vocabulary at batch 1. Here each float becomes an int32 key in the
    same order (the sign-flip of radix sorts, M. Herf, "Radix Tricks", 2001: a negative float's
    magnitude bits are inverted), NaN made one NaN above +inf and -0.0 made +0.0 (argmax counts
    them equal); then a max of the keys and a min of the indices holding it: ~25 us
    (docs/performance/decode.md, "Decode: the non-matmul ops"). A float max instead of the key went to
    XNNPACK's reduce on this jaxlib, with a copy of the logits before it: ~80 us."""
    if x.dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
        return jnp.argmax(x, axis=-1).astype(jnp.int32)
    V = x.shape[-1]
    key = _order_key(x)
    best = jnp.max(key, axis=-1, keepdims=True)
    return jnp.min(jnp.where(key == best, jnp.arange(V, dtype=jnp.int32), V), axis=-1)


def _order_key(x: jax.Array) -> jax.Array:
    """int32 keys in the order of the floats x (argmax's docstring says how); NaN above +inf."""
    x = x.astype(jnp.float32)
    x = jnp.where(jnp.isnan(x), jnp.nan, jnp.where(x == 0, 0.0, x))
    bits = jax.lax.bitcast_convert_type(x, jnp.int32)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)  # >> is arithmetic: all ones for a negative float


def _bisect(pred, lo: jax.Array, hi: jax.Array) -> jax.Array:
    """The smallest u in [lo, hi] (uint32 (R,)) with pred(u) true, pred monotone (false ... true)
    and pred(hi) true: 32 halvings of the uint32 range, each one pass over the row."""
    def step(_, bounds):
        lo, hi = bounds
        mid = lo + (hi - lo) // 2
        ok = pred(mid)
        return jnp.where(ok, lo, mid + 1), jnp.where(ok, mid, hi)

    return jax.lax.fori_loop(0, 32, step, (lo, hi))[1]


TOP_CANDIDATES = 64  # top_k_top_p_keep's fast path: the row's best tokens, found without a full sort


def top_k_top_p_keep(x: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """HF's TopK then TopP warpers as one mask, without sorting the vocabulary: x float32 (R, V)
    (logits after the temperature), top_k int32 (R,) (V = off), top_p float32 (R,) (1 = off).
    Returns bool (R, V): a token stays when it is >= the k-th best logit and the mass of the top-k
    survivors strictly above it (in descending order) is < top_p (ties at the boundary all stay).

    The full descending sort this replaces cost ~7 ms a row at a 32000-token vocabulary on this
    project's CPU (~110 ms a step for 16 rows: docs/performance/decode.md). Fast path: the best
    TOP_CANDIDATES logits (lax.top_k) hold the whole answer when top_k <= TOP_CANDIDATES, or
    when top_k is off and the boundary of top_p's mass falls among them (probabilities from one
    logsumexp over the row); a peaked LM distribution nearly always. Otherwise (any row of the
    batch) both thresholds come from bisection over the floats' order-preserving uint32 keys: 32
    masked counts, then 32 masked sums over the row."""
    R, V = x.shape
    k = jnp.clip(top_k, 1, V)
    p = top_p
    C = min(V, TOP_CANDIDATES)
    cand = jax.lax.top_k(x, C)[0]  # (R, C), descending
    rank = jnp.arange(C)[None, :]
    in_k = rank < k[:, None]
    lse = jnp.where(k <= C, jax.nn.logsumexp(jnp.where(in_k, cand, -jnp.inf), axis=-1),
                    jax.nn.logsumexp(x, axis=-1))  # the top-k survivors' normaliser (all V when off)
    probs = jnp.where(in_k, jnp.exp(cand - lse[:, None]), 0.0)
    above = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above each candidate
    keep = in_k & ((above < p[:, None]) | (p[:, None] >= 1.0))
    n_keep = jnp.maximum(jnp.sum(keep, axis=-1), 1)
    # The kept prefix ends among the candidates (with top_k off, lse is the whole row's).
    ends_inside = (k <= C) | ((k >= V) & (p < 1.0) & (n_keep < C))
    fast_thr = jnp.where(ends_inside, jnp.take_along_axis(cand, n_keep[:, None] - 1, axis=-1)[:, 0], -jnp.inf)

    def bisected(_):
        u = jax.lax.bitcast_convert_type(_order_key(x), jnp.uint32) ^ jnp.uint32(0x80000000)  # (R, V)
        lo, hi = jnp.min(u, axis=-1), jnp.max(u, axis=-1)
        # The k-th best key: the smallest t with fewer than k keys above it.
        t_k = _bisect(lambda t: jnp.sum(u > t[:, None], axis=-1) < k, lo, hi)
        probs = jax.nn.softmax(jnp.where(u >= t_k[:, None], x, -jnp.inf), axis=-1)
        # top-p: the smallest t with survivor mass above it < top_p; every key >= it stays.
        t_p = _bisect(lambda t: jnp.sum(jnp.where(u > t[:, None], probs, 0.0), axis=-1) < p, lo, hi)
        t_p = jnp.where(p >= 1.0, lo, t_p)  # top_p 1 keeps all, whatever the rounding
        return u >= jnp.maximum(t_k, t_p)[:, None]

    fast_or_off = ends_inside | ((k >= V) & (p >= 1.0))  # nothing to drop is resolved too
    return jax.lax.cond(jnp.all(fast_or_off), lambda _: x >= fast_thr[:, None], bisected, None)


def categorical(key: jax.Array, logits: jax.Array) -> jax.Array:
    """jax.random.categorical(key, logits, axis=-1) (the Gumbel-max trick: the argmax of logits
    plus Gumbel noise, the same noise draw) with `argmax` above. logits float (..., V) -> int32 (...)."""
    return argmax(logits + jax.random.gumbel(key, logits.shape, logits.dtype))


def apply_repetition_penalty(logits: jax.Array, seen: jax.Array, penalty: jax.Array | float) -> jax.Array:
    """HF's RepetitionPenaltyLogitsProcessor (CTRL paper): for every token already present in the
    sequence (prompt or generated), divide a positive logit by `penalty` and multiply a negative
    one by it. logits: float (B, V); seen: bool (B, V). Returns (B, V)."""
    penalised = jnp.where(logits > 0, logits / penalty, logits * penalty)
    return jnp.where(seen, penalised, logits)


def _transform(logits: jax.Array, spec: SamplerSpec, knobs: dict[str, jax.Array],
               seen: jax.Array | None) -> tuple[jax.Array, jax.Array | None]:
    """The non-greedy sampler's logits after every transform, in HF's order (repetition penalty,
    temperature, top-k, top-p, min-p): (candidate logits (B, C), their token ids (B, C) or None
    when C = V in vocabulary order). Dropped candidates are -inf."""
    if spec.rep:
        logits = apply_repetition_penalty(logits, seen, knobs["repetition_penalty"])
    logits = logits / knobs["temperature"]
    idx = None  # candidates: all V tokens, or the best ones sorted high to low with their ids
    B, V = logits.shape
    if spec.top_k is not None and spec.top_k < V:
        logits, idx = jax.lax.top_k(logits, spec.top_k)  # (B, k), descending
    elif spec.top_p:  # over the whole vocabulary: the sort-free mask (top_k_top_p_keep says why)
        top_p = jnp.broadcast_to(jnp.asarray(knobs["top_p"], jnp.float32).reshape(-1), (B,))
        keep = top_k_top_p_keep(logits, jnp.full((B,), V, jnp.int32), top_p)
        logits = jnp.where(keep, logits, -jnp.inf)
    if spec.top_p and idx is not None:
        # Keep the smallest prefix of the sorted candidates whose mass reaches top_p: a token stays
        # when the mass strictly above it is < top_p (HF TopPLogitsWarper; the best always stays).
        probs = jax.nn.softmax(logits, axis=-1)
        above = jnp.cumsum(probs, axis=-1) - probs
        logits = jnp.where(above < knobs["top_p"], logits, -jnp.inf)
    if spec.min_p:
        # HF MinPLogitsWarper: drop tokens whose probability is below min_p x the best one's.
        probs = jax.nn.softmax(logits, axis=-1)
        keep = probs >= knobs["min_p"] * jnp.max(probs, axis=-1, keepdims=True)
        logits = jnp.where(keep, logits, -jnp.inf)
    return logits, idx


def sample(logits: jax.Array, key: jax.Array, spec: SamplerSpec, knobs: dict[str, jax.Array],
           seen: jax.Array | None) -> jax.Array:
    """One token per row. Order as in HF: repetition penalty, temperature, top-k, top-p, min-p."""
    if spec.greedy:
        if spec.rep:
            logits = apply_repetition_penalty(logits, seen, knobs["repetition_penalty"])
        return argmax(logits)
    logits, idx = _transform(logits, spec, knobs, seen)
    choice = categorical(key, logits)  # (B,) Gumbel-max
    if idx is not None:
        choice = jnp.take_along_axis(idx, choice[:, None], axis=-1)[:, 0]
    return choice.astype(jnp.int32)


def sampler_probs(logits: jax.Array, spec: SamplerSpec, knobs: dict[str, jax.Array]) -> jax.Array:
    """The distribution `sample` draws from, over the whole vocabulary: float32 (B, V) rows that
    sum to 1 (one-hot at the argmax when greedy). Speculative decoding's rejection test compares
    these for the target and the draft (nanojax/infer/speculative.py). No repetition penalty."""
    if spec.greedy:
        return jax.nn.one_hot(argmax(logits), logits.shape[-1], dtype=jnp.float32)
    cand, idx = _transform(logits, spec, knobs, None)
    probs = jax.nn.softmax(cand, axis=-1)  # (B, C)
    if idx is None:
        return probs
    rows = jnp.arange(logits.shape[0])[:, None]
    return jnp.zeros(logits.shape, jnp.float32).at[rows, idx].set(probs)


def make_spec(temperature: float, top_k: int | None, top_p: float | None, min_p: float | None,
              repetition_penalty: float | None) -> tuple[SamplerSpec, dict[str, np.ndarray]]:
    """Splits checked sampling arguments into the compiled-in spec and the float32 knob values."""
    greedy = temperature == 0.0
    spec = SamplerSpec(
        greedy=greedy,
        top_k=None if greedy else top_k,
        top_p=not greedy and top_p is not None and top_p < 1.0,
        min_p=not greedy and min_p is not None and min_p > 0.0,
        rep=repetition_penalty is not None and repetition_penalty != 1.0,
    )
    knobs = {
        "temperature": np.float32(temperature or 1.0),
        "top_p": np.float32(1.0 if top_p is None else top_p),
        "min_p": np.float32(0.0 if min_p is None else min_p),
        "repetition_penalty": np.float32(1.0 if repetition_penalty is None else repetition_penalty),
    }
    return spec, knobs


def sample_tokens(
    logits: jax.Array,
    key: jax.Array,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    repetition_penalty: float | None = None,
    seen: jax.Array | None = None,
) -> jax.Array:
    """The decode loop's sampler as a standalone function (for tests and custom loops).

    logits: float32 (B, V); key: a PRNG key; seen: bool (B, V), the tokens present so far (needed
    for repetition_penalty). temperature 0 is greedy. Returns int32 (B,) token ids.
    """
    check_sampling(temperature, top_k, top_p, min_p, repetition_penalty, logits.shape[-1])
    spec, knobs = make_spec(temperature, top_k, top_p, min_p, repetition_penalty)
    if spec.rep and seen is None:
        raise ValueError("repetition_penalty needs `seen`, a bool (B, V) mask of the tokens so far")
    return _sample_jit(jnp.asarray(logits, jnp.float32), key, spec, knobs, seen)


@functools.partial(jax.jit, static_argnames=("spec",))
def _sample_jit(logits, key, spec, knobs, seen):
    return sample(logits, key, spec, knobs, seen)


def check_sampling(temperature: float, top_k: int | None, top_p: float | None, min_p: float | None,
                   repetition_penalty: float | None, vocab_size: int) -> None:
    """Raises ValueError naming the first bad sampling argument and its valid range."""
    if not (isinstance(temperature, int | float) and math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be a finite number >= 0 (0 is greedy), got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int | np.integer)
                              or top_k < 1):
        raise ValueError(f"top_k must be an integer >= 1 (or None for all {vocab_size}), got {top_k!r}")
    if top_p is not None and not (isinstance(top_p, int | float) and 0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be in (0, 1] (or None), got {top_p!r}")
    if min_p is not None and not (isinstance(min_p, int | float) and 0.0 <= min_p <= 1.0):
        raise ValueError(f"min_p must be in [0, 1] (or None), got {min_p!r}")
    if repetition_penalty is not None and not (
        isinstance(repetition_penalty, int | float) and math.isfinite(repetition_penalty)
        and repetition_penalty > 0
    ):
        raise ValueError(
            f"repetition_penalty must be > 0 (1 is off, > 1 discourages repeats), got {repetition_penalty!r}"
        )


# ----------------------------------------------------------------------------------------------
# Per-row samplers: every row its own temperature, top-k, top-p, min-p and PRNG stream (the
# continuous-batching engine, nanojax/infer/slots.py, decodes unrelated requests in one batch).

ROW_KNOBS = ("temperature", "top_k", "top_p", "min_p", "greedy")


def row_knobs(temperature: float, top_k: int | None, top_p: float | None, min_p: float | None,
              vocab_size: int) -> dict[str, np.ndarray]:
    """One row's sampler values for `sample_rows` (checked arguments; "off" values where unset):
    float32 temperature (1 for greedy), int32 top_k (V = off), float32 top_p (1 = off), float32
    min_p (0 = off), bool greedy (temperature 0)."""
    greedy = temperature == 0.0
    return {"temperature": np.float32(1.0 if greedy else temperature),
            "top_k": np.int32(vocab_size if top_k is None else min(int(top_k), vocab_size)),
            "top_p": np.float32(1.0 if top_p is None else top_p),
            "min_p": np.float32(0.0 if min_p is None else min_p),
            "greedy": np.bool_(greedy)}


def sample_rows(logits: jax.Array, keys: jax.Array, knobs: dict[str, jax.Array],
                greedy_only: bool) -> jax.Array:
    """One token per row, each row with its own sampler values (`row_knobs`, stacked to (R,)).

    logits: float32 (R, V); keys: typed PRNG keys (R,), one per row. Greedy rows (and every row
    when greedy_only, the static fast path) are the exact argmax of the raw logits. The others
    follow `sample`'s HF order, temperature, top-k, top-p, min-p, with the thresholds taken per
    row from one descending sort (a token stays when its logit is >= the row's k-th best, and
    >= the smallest logit of the top-p prefix: HF's TopK/TopP warpers up to ties). Returns int32 (R,).
    """
    best = argmax(logits)
    if greedy_only:
        return best
    x = logits / knobs["temperature"][:, None]
    x = jnp.where(top_k_top_p_keep(x, knobs["top_k"], knobs["top_p"]), x, -jnp.inf)
    probs = jax.nn.softmax(x, axis=-1)
    x = jnp.where(probs >= knobs["min_p"][:, None] * jnp.max(probs, axis=-1, keepdims=True), x, -jnp.inf)
    choice = jax.vmap(categorical)(keys, x)  # each row its own key: jax.random.categorical per row
    return jnp.where(knobs["greedy"], best, choice)


def row_logprobs(logits: jax.Array, temperature: jax.Array, tokens: jax.Array, n_top: int
                 ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Log-probabilities as OpenAI-style APIs report them: log_softmax after the temperature,
    before any filtering (vLLM's default). logits float32 (R, V); temperature (R,) (1 for greedy
    rows); tokens int32 (R,). Returns (token logprob (R,), top ids int32 (R, n_top), top logprobs
    (R, n_top)), best first."""
    lp = jax.nn.log_softmax(logits / temperature[:, None], axis=-1)
    top_lp, top_ids = jax.lax.top_k(lp, n_top)
    return jnp.take_along_axis(lp, tokens[:, None], axis=-1)[:, 0], top_ids.astype(jnp.int32), top_lp
