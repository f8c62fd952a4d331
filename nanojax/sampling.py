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
    (docs/performance.md, "Decode: the non-matmul ops"). A float max instead of the key went to
    XNNPACK's reduce on this jaxlib, with a copy of the logits before it: ~80 us."""
    if x.dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
        return jnp.argmax(x, axis=-1).astype(jnp.int32)
    V = x.shape[-1]
    x = x.astype(jnp.float32)
    x = jnp.where(jnp.isnan(x), jnp.nan, jnp.where(x == 0, 0.0, x))
    bits = jax.lax.bitcast_convert_type(x, jnp.int32)
    key = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # >> is arithmetic: all ones for a negative float
    best = jnp.max(key, axis=-1, keepdims=True)
    return jnp.min(jnp.where(key == best, jnp.arange(V, dtype=jnp.int32), V), axis=-1)


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
    if spec.top_k is not None and spec.top_k < logits.shape[-1]:
        logits, idx = jax.lax.top_k(logits, spec.top_k)  # (B, k), descending
    elif spec.top_p:
        idx = jnp.argsort(-logits, axis=-1)  # (B, V) descending
        logits = jnp.take_along_axis(logits, idx, axis=-1)
    if spec.top_p:
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
    R, V = logits.shape
    x = logits / knobs["temperature"][:, None]
    desc = -jnp.sort(-x, axis=-1)  # (R, V) high to low
    rank = jnp.arange(V)[None, :]
    k = jnp.clip(knobs["top_k"], 1, V)[:, None]  # (R, 1)
    desc = jnp.where(rank < k, desc, -jnp.inf)  # the survivors of top-k, still sorted
    probs = jax.nn.softmax(desc, axis=-1)
    above = jnp.cumsum(probs, -1) - probs  # mass strictly above each sorted candidate
    top_p = knobs["top_p"][:, None]
    keep = (rank < k) & ((above < top_p) | (top_p >= 1.0))  # top_p 1 keeps all, whatever the rounding
    # top-k and top-p as one threshold: the smallest logit kept (the survivors are a prefix).
    n_keep = jnp.maximum(jnp.sum(keep, axis=-1, keepdims=True), 1)
    x = jnp.where(x >= jnp.take_along_axis(desc, n_keep - 1, axis=-1), x, -jnp.inf)
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
