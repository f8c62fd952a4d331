"""AdamW with linear warmup + cosine decay, global-norm clipping and a weight-decay mask."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

NO_DECAY_TOP = ("wte", "wpe")  # the embeddings: decayed only when asked (decay_mask's `embeddings`)


def decay_mask(params: Any, embeddings: bool = False) -> Any:
    """True for matrices that get weight decay: every >=2-D weight, the embeddings (wte, wpe)
    only when `embeddings` (nanoGPT decays them). Norm scales and biases are never decayed, the
    q/k/v biases (heads, head_dim) included."""

    def keep(path, x) -> bool:
        top = getattr(path[0], "key", None)
        if str(getattr(path[-1], "key", "")).startswith("b"):  # bias, bq, bo, b_in, ...: a bias
            return False
        return x.ndim >= 2 and (embeddings or top not in NO_DECAY_TOP)

    return jax.tree_util.tree_map_with_path(keep, params)


def lr_schedule(lr: float, warmup_steps: int, total_steps: int, min_lr: float) -> optax.Schedule:
    """The learning rate of update s (s = 0, 1, ...: updates made before it), nanoGPT's schedule.

    Warmup, s < W: lr * (s + 1) / (W + 1), so the first update already moves (lr / (W + 1)) and
    the ramp reaches lr at s = W; optax's linear warmup starts at 0 and wastes update 0. Then
    cosine from lr at s = W to min_lr at s = total_steps, and min_lr after (nanoGPT train.py
    get_lr; Loshchilov & Hutter 2017, SGDR, for the cosine). W is clipped to total_steps.
    """
    warmup = max(0, min(warmup_steps, total_steps))
    decay_span = max(total_steps - warmup, 1)

    def schedule(step: jax.Array | int) -> jax.Array:
        s = jnp.asarray(step, jnp.float32)
        ramp = lr * (s + 1.0) / (warmup + 1)
        frac = jnp.clip((s - warmup) / decay_span, 0.0, 1.0)
        cosine = min_lr + (lr - min_lr) * 0.5 * (1.0 + jnp.cos(jnp.pi * frac))
        return jnp.where(s < warmup, ramp, cosine)

    return schedule


def make_optimizer(
    schedule: optax.Schedule | float,
    *,
    weight_decay: float = 0.1,
    b1: float = 0.9,
    b2: float = 0.95,
    eps: float = 1e-8,
    grad_clip: float = 1.0,
    mask: Any = decay_mask,
) -> optax.GradientTransformation:
    """clip_by_global_norm(grad_clip) then AdamW (decoupled decay, Loshchilov & Hutter 2019) at the
    learning rate `schedule` (step -> rate, e.g. `lr_schedule(...)`, or a constant). mask: which
    leaves decay (a tree of bools or a function of the params; default `decay_mask`)."""
    # identity() keeps the state's structure when clipping is off, so a run can resume either way.
    chain = [optax.clip_by_global_norm(grad_clip) if grad_clip and grad_clip > 0 else optax.identity()]
    chain.append(
        optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=mask)
    )
    return optax.chain(*chain)
