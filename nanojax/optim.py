"""AdamW with linear warmup + cosine decay, global-norm clipping and a weight-decay mask."""

from __future__ import annotations

from collections.abc import Callable
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


def fused_adamw(
    schedule: optax.Schedule,
    *,
    weight_decay: float = 0.1,
    b1: float = 0.9,
    b2: float = 0.95,
    eps: float = 1e-8,
    grad_clip: float = 1.0,
    mask: Any = decay_mask,
) -> Callable[..., tuple[Any, Any]]:
    """`make_optimizer`'s update with the same arguments, as one CPU kernel call for the whole tree.

    Returns update(params, grads, opt_state, grad_norm, ok) -> (params, opt_state): what
    `optimizer.update` + `optax.apply_updates` + keeping the old state unless `ok` give, on the
    optimizer state `make_optimizer(...).init` made (so checkpoints and resumes do not care which
    ran), updated in place (csrc/adamw.cc: one pass over params, moments and gradients, where XLA
    makes ~17; docs/performance/training.md). float32 leaves on the CPU with the kernels built
    only (`adamw_kernel_enabled`). grad_norm: the gradients' global norm (what the clip uses).
    """
    from nanojax.quant import ffi

    def update(params, grads, opt_state, grad_norm, ok):
        leaves, treedef = jax.tree.flatten(params)
        mu, nu = optax.tree_utils.tree_get(opt_state, "mu"), optax.tree_utils.tree_get(opt_state, "nu")
        decays = jax.tree.leaves(mask(params) if callable(mask) else mask)
        # Both counters (Adam's, the schedule's) move together; the first is Adam's.
        count = optax.tree_utils.tree_get_all_with_path(opt_state, "count")[0][1]
        count_inc = optax.safe_increment(count)
        hyper = jnp.stack([jnp.asarray(v, jnp.float32) for v in (
            schedule(count), b1, 1 - b1, b2, 1 - b2, eps, 1 - b1 ** count_inc, 1 - b2 ** count_inc,
            grad_norm, grad_clip if grad_clip and grad_clip > 0 else jnp.inf, ok)])
        decay = jnp.asarray([weight_decay if d else 0.0 for d in decays], jnp.float32)
        new_p, new_mu, new_nu = ffi.adamw(hyper, decay, leaves, treedef.flatten_up_to(mu),
                                          treedef.flatten_up_to(nu), jax.tree.leaves(grads))
        state = optax.tree_utils.tree_set(
            opt_state, mu=treedef.unflatten(new_mu), nu=treedef.unflatten(new_nu),
            count=jnp.where(ok, count_inc, count))
        return treedef.unflatten(new_p), state

    return update
