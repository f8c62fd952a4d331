"""The loss and the jitted train and eval steps, and `build`, which compiles them for a config.

The step is a pure function `(params, opt_state, x, y, step) -> (params, opt_state, metrics)`
with donated state; its shardings come from nanojax.sharding, so one CPU and a pod differ only in
the mesh.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from nanojax import sharding as shd
from nanojax.config import ModelConfig
from nanojax.model import Params, forward, init_params, param_shapes
from nanojax.optim import decay_mask, fused_adamw, lr_schedule, make_optimizer


def token_losses(params: Params, x: jax.Array, y: jax.Array, cfg: ModelConfig,
                 dropout_rng: jax.Array | None = None, lora: Any = None) -> jax.Array:
    """Next-token cross-entropy of every position: float32 (B, T) nats. x, y: int32 (B, T).
    lora: an adapter applied on top of params (nanojax.lora)."""
    logits = forward(params, x, cfg, dropout_rng=dropout_rng, lora=lora)  # (B, T, V) float32
    return optax.softmax_cross_entropy_with_integer_labels(logits, y)


def loss_fn(params: Params, x: jax.Array, y: jax.Array, cfg: ModelConfig,
            dropout_rng: jax.Array | None = None, lora: Any = None) -> jax.Array:
    """Mean next-token cross-entropy (nats). x, y: int32 (B, T)."""
    return token_losses(params, x, y, cfg, dropout_rng, lora).mean()


def make_train_step(cfg: ModelConfig, optimizer: optax.GradientTransformation, seed: int,
                    schedule: optax.Schedule | None = None,
                    mesh: jax.sharding.Mesh | None = None, loss: Callable = loss_fn,
                    use_dropout: bool | None = None, fused_update: Callable | None = None) -> Callable:
    """The un-jitted step. x, y: int32 (A, B, T) with A micro-batches accumulated per update.

    With `schedule`, the metrics carry the step's learning rate too (computed on the device, so
    the host loop dispatches nothing but the step). With `mesh`, activations are pinned to it by
    logical axes while the step is traced (sharding.activation_sharding).

    `loss(params, x, y, cfg, dropout_rng, *frozen)` is differentiated w.r.t. `params` only; the
    step takes the `frozen` trees after `step` (LoRA: the base model, which gets no gradient and
    no optimizer state). use_dropout: draw dropout keys (default: cfg.dropout > 0).
    fused_update: `optim.fused_adamw(...)` of the same settings as `optimizer`, to run the update
    as one CPU kernel call (`build` passes it where it runs)."""
    base_key = jax.random.key(seed)
    use_dropout = cfg.dropout > 0 if use_dropout is None else use_dropout
    objective = loss  # `loss` is the step's value below

    def step_fn(params, opt_state, x, y, step, *frozen):
        with shd.activation_sharding(mesh):
            return _step(params, opt_state, x, y, step, frozen)

    def _step(params, opt_state, x, y, step, frozen):
        rng = jax.random.fold_in(base_key, step)
        grad_fn = jax.value_and_grad(lambda p, *a: objective(p, *a, *frozen))
        A = x.shape[0]
        if A == 1:
            loss, grads = grad_fn(params, x[0], y[0], cfg, rng if use_dropout else None)
        else:
            def micro(carry, inputs):
                loss_sum, grad_sum = carry
                xi, yi, i = inputs
                li, gi = grad_fn(params, xi, yi, cfg, jax.random.fold_in(rng, i) if use_dropout else None)
                return (loss_sum + li, jax.tree.map(jnp.add, grad_sum, gi)), None

            zeros = jax.tree.map(jnp.zeros_like, params)
            (loss, grads), _ = jax.lax.scan(micro, (jnp.zeros((), jnp.float32), zeros),
                                            (x, y, jnp.arange(A)))
            loss, grads = loss / A, jax.tree.map(lambda g: g / A, grads)
        return guarded_update(optimizer, schedule, params, opt_state, grads, loss,
                              optax.tree.norm(grads), step, fused_update)

    return step_fn


def guarded_update(optimizer: optax.GradientTransformation, schedule: optax.Schedule | None,
                   params: Params, opt_state: Any, grads: Params, loss: jax.Array,
                   grad_norm: jax.Array, step: jax.Array,
                   fused: Callable | None = None) -> tuple[Params, Any, dict[str, jax.Array]]:
    """The optimizer update and the step's metrics (loss, grad_norm, ok, and lr with `schedule`).

    A non-finite loss or gradient norm changes nothing: the host sees ok=False and stops with the
    last good state, so no NaN ever reaches a checkpoint. The select fuses into the Adam update.
    Shared by the jit step and the shard_map step (train/manual.py). fused: the same update as
    one kernel call (`optim.fused_adamw`), used instead of `optimizer` when given."""
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    if fused is not None:
        new_params, new_opt_state = fused(params, grads, opt_state, grad_norm, ok)
    else:
        updates, new_opt_state = optimizer.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        keep = lambda new, old: jnp.where(ok, new, old)  # noqa: E731
        new_params = jax.tree.map(keep, new_params, params)
        new_opt_state = jax.tree.map(keep, new_opt_state, opt_state)
    metrics = {"loss": loss, "grad_norm": grad_norm, "ok": ok}
    if schedule is not None:
        metrics["lr"] = jnp.asarray(schedule(step), jnp.float32)
    return new_params, new_opt_state, metrics


def make_eval_step(cfg: ModelConfig, mesh: jax.sharding.Mesh | None = None) -> Callable:
    def eval_fn(params, x, y, lora=None):
        with shd.activation_sharding(mesh):
            return loss_fn(params, x, y, cfg, lora=lora)

    return eval_fn


def make_eval_sum_step(cfg: ModelConfig, mesh: jax.sharding.Mesh | None = None) -> Callable:
    """The un-jitted weighted loss sum: (params, x, y, w) -> float32 scalar, sum of w * per-token
    loss in nats. x, y: int32 (B, T); w: float32 (B, T), 1 for a position to count, 0 for padding.
    A sum, not a mean, so the host can weight batches by their token counts (loop.evaluate_full)."""
    def eval_sum_fn(params, x, y, w, lora=None):
        with shd.activation_sharding(mesh):
            return jnp.sum(token_losses(params, x, y, cfg, lora=lora) * w)

    return eval_sum_fn


@dataclasses.dataclass(frozen=True)
class Run:
    """Everything compiled for a run: mesh, optimizer, shardings and the jitted functions.

    step_fn(params, opt_state, x, y, step) -> (params, opt_state, metrics), x/y int32 (A, B, T),
    params and opt_state donated. eval_fn(params, x, y) -> mean loss, x/y (B, T).
    eval_sum_fn(params, x, y, w) -> sum of w * per-token loss (nats), x/y/w (B, T), w float32.
    init_fn(key) -> (params, opt_state), created directly in their shardings.
    """

    cfg: ModelConfig
    mesh: jax.sharding.Mesh
    optimizer: optax.GradientTransformation
    param_shardings: Any
    opt_shardings: Any
    batch_sharding: Any
    eval_batch_sharding: Any
    step_fn: Callable
    eval_fn: Callable
    init_fn: Callable
    eval_sum_fn: Callable

    def abstract_step_args(self, batch_size: int, accum: int = 1) -> tuple:
        """ShapeDtypeStructs for `step_fn.lower(...)`: cost analysis without allocating."""
        params = param_shapes(self.cfg)
        opt_state = jax.eval_shape(self.optimizer.init, params)
        x = jax.ShapeDtypeStruct((accum, batch_size, self.cfg.max_seq_len), jnp.int32)
        return params, opt_state, x, x, jax.ShapeDtypeStruct((), jnp.int32)


def _fused_update(cfg: ModelConfig, mesh: jax.sharding.Mesh, schedule: optax.Schedule, grad_clip: float,
                  adamw: dict) -> Callable | None:
    """The AdamW update as one CPU kernel call where it runs: one device (the kernel sees whole
    arrays), float32 params, the kernels built (`ffi.adamw_kernel_enabled`); else None (optax).
    adamw: the settings the optax optimizer was made with, so the two updates cannot differ."""
    from nanojax.quant import ffi

    if mesh.size != 1 or cfg.param_dtype != "float32" or not ffi.adamw_kernel_enabled():
        return None
    return fused_adamw(schedule, grad_clip=grad_clip, **adamw)


def build(config: ml_collections.ConfigDict, cfg: ModelConfig) -> Run:
    """Mesh, optimizer, shardings and jitted step/eval/init for a training config.

    config.sharding_mode "auto" jits the step with these shardings (the partitioner places the
    communication); "manual" runs it under jax.shard_map with explicit collectives. Evaluation
    is the jitted (auto) path in both modes."""
    mesh = shd.make_mesh(**config.mesh.to_dict())
    schedule = lr_schedule(config.lr, config.warmup_steps, config.max_steps, config.min_lr)
    mask = functools.partial(decay_mask, embeddings=bool(config.get("decay_embeddings", False)))
    # One set of AdamW settings for every update built below (optax's, clipped or not, and the kernel's).
    adamw = {"weight_decay": config.weight_decay, "b1": config.b1, "b2": config.b2, "mask": mask}
    optimizer = make_optimizer(schedule, grad_clip=config.grad_clip, **adamw)
    p_sh = shd.param_shardings(cfg, mesh)
    o_sh = shd.opt_state_shardings(optimizer, param_shapes(cfg), p_sh, mesh)
    repl = shd.replicated(mesh)
    batch_sh, eval_sh = shd.batch_sharding(mesh, ndim=3), shd.batch_sharding(mesh)
    if config.get("sharding_mode", "auto") == "manual":
        # The same shardings, but the step is one device's program with its collectives written
        # out (nanojax.train.manual); the global-norm clip moves into it, out of the optimizer.
        from nanojax.train import manual

        unclipped = make_optimizer(schedule, grad_clip=0, **adamw)
        step = manual.make_manual_train_step(cfg, unclipped, config.grad_clip, mesh, manual.specs_of(p_sh),
                                             manual.specs_of(o_sh), schedule)
        batch_sh = manual.manual_batch_sharding(mesh)
    else:
        step = make_train_step(cfg, optimizer, config.seed, schedule, mesh,
                               fused_update=_fused_update(cfg, mesh, schedule, config.grad_clip, adamw))
    step_fn = jax.jit(
        step,
        in_shardings=(p_sh, o_sh, batch_sh, batch_sh, repl),
        out_shardings=(p_sh, o_sh, repl),
        donate_argnums=(0, 1),
    )
    eval_fn = jax.jit(make_eval_step(cfg, mesh), in_shardings=(p_sh, eval_sh, eval_sh), out_shardings=repl)
    eval_sum_fn = jax.jit(make_eval_sum_step(cfg, mesh), in_shardings=(p_sh, eval_sh, eval_sh, eval_sh),
                          out_shardings=repl)

    def init(key):
        params = init_params(cfg, key)
        return params, optimizer.init(params)

    init_fn = jax.jit(init, out_shardings=(p_sh, o_sh))
    return Run(cfg, mesh, optimizer, p_sh, o_sh, batch_sh, eval_sh, step_fn, eval_fn, init_fn, eval_sum_fn)
