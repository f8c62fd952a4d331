"""The verify-step timer shared by bench_speculative.py and profile_speculative_shapes.py (a
benchmark helper, not library code; no flags, so both scripts can import it)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

import nanojax as nj
from nanojax.infer import speculative


def step_runner(params, cfg: nj.ModelConfig, T: int, window: int, calls: int, batch: int = 1):
    """A compiled function running `calls` `speculative._step`s of T tokens at `batch` rows over a
    `window`-slot cache in one jitted fori_loop (the loop's own overhead included, as in the decode
    loop), compiled and warmed up, with its arguments: call `run(*args)`."""
    K, H = cfg.kv_heads, cfg.resolved_head_dim
    cache = [(jnp.zeros((batch * K, window, H), cfg.compute_dtype),) * 2 for _ in range(cfg.n_layer)]
    pad = jnp.zeros((batch,), jnp.int32)

    @jax.jit
    def run(params, cache):
        def body(i, carry):
            cache, tok = carry
            logits, cache = speculative._step(params, cfg, cache, tok, window // 2 + (i % 8), pad)
            return cache, jnp.argmax(logits, -1).astype(jnp.int32)
        return jax.lax.fori_loop(0, calls, body, (cache, jnp.zeros((batch, T), jnp.int32)))

    jax.block_until_ready(run(params, cache))
    return run, (params, cache)
