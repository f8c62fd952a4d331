"""Sampling. A simple loop for now: one full forward per new token over a fixed-size window."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from nanojax.config import ModelConfig
from nanojax.model import Params, forward


@functools.partial(jax.jit, static_argnames=("cfg",))
def _next_logits(params: Params, tokens: jax.Array, lengths: jax.Array, cfg: ModelConfig) -> jax.Array:
    logits = forward(params, tokens, cfg)  # (B, T, V)
    return jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]  # (B, V)


def generate(
    params: Params,
    cfg: ModelConfig,
    prompts: list[list[int]],
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
) -> list[list[int]]:
    """New tokens for each prompt (ragged list of token-id lists). temperature 0 is greedy."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    B = len(prompts)
    T = cfg.max_seq_len
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > T:
        raise ValueError(f"prompt ({longest}) + max_new_tokens ({max_new_tokens}) exceeds context {T}")
    buf = np.zeros((B, T), np.int32)
    for i, p in enumerate(prompts):
        buf[i, : len(p)] = p
    lengths = np.array([len(p) for p in prompts], np.int32)
    key = jax.random.key(seed)
    out: list[list[int]] = [[] for _ in prompts]
    for t in range(max_new_tokens):
        logits = _next_logits(params, jnp.asarray(buf), jnp.asarray(lengths), cfg)
        if temperature == 0.0:
            nxt = jnp.argmax(logits, axis=-1)
        else:
            logits = logits / temperature
            if top_k:
                kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
                logits = jnp.where(logits < kth, -jnp.inf, logits)
            nxt = jax.random.categorical(jax.random.fold_in(key, t), logits)
        nxt = np.asarray(nxt)
        buf[np.arange(B), lengths] = nxt
        lengths += 1
        for i in range(B):
            out[i].append(int(nxt[i]))
    return out
