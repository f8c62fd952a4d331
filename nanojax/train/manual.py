"""The train step under `jax.shard_map`, every collective written out (sharding_mode="manual").

The auto step (nanojax.train.step) is one program for the whole mesh and the compiler places the
communication. Here the step is the program ONE device runs on its own shards, and each
collective is a line below, where it happens (docs/sharding.md draws them):

  fsdp      each weight is stored split along its `embed` dim. A layer's shards are all-gathered
            just before the layer runs (`fsdp_gather`), so one layer at a time is whole; the
            backward of that gather is a reduce-scatter (`psum_scatter`) of the weight's gradient,
            which leaves each rank the summed gradient of its own shard. Under remat the backward
            gathers the layer again instead of keeping it (ZeRO-3 / FSDP, Rajbhandari et al. 2020).
  tensor    heads and the MLP width are split (Megatron-LM, Shoeybi et al. 2019): q/k/v and the
            MLP's first matmul are column-split, the out-projection and the MLP's last matmul are
            row-split, so each sublayer ends in one all-reduce (`tp_leave`, a psum) and its input's
            gradient in another (`tp_enter`).
  sequence  the tokens are split; attention runs as ring attention (ring_attention.py), K/V passed
            with `ppermute`; positions are offset by the rank's first token.
  data      plain replicas: gradients are psum'd over data (and over sequence, and over fsdp for
            the few leaves not split on it), the loss and the global gradient norm likewise.

The embedding and head tables are gathered whole (over fsdp and tensor), so each tensor rank
computes the full logits: simple, at the cost of a vocab-parallel loss (not done here).
The optimizer runs in the same shard_map on the shards: AdamW is elementwise, and the global-norm
clip uses the norm reduced here (optax's clip would see only the local shard).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec as P

from nanojax import sharding as shd
from nanojax.config import ModelConfig
from nanojax.model import BlockComms, Params, block, causal_attend, embed, remat_block, unembed
from nanojax.train.ring_attention import ring_attend
from nanojax.train.step import guarded_update

TOKEN_AXES = ("data", "fsdp", "sequence")  # every mesh axis that splits the tokens of a batch


# ----------------------------------------------------------------------------------------------
# The collectives, each with its backward written out (a custom VJP), so the program reads as
# what goes over the wire in both directions.


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def fsdp_gather(w: jax.Array, dim: int) -> jax.Array:
    """All-gather w's fsdp shards along `dim`: (.., D/f, ..) -> (.., D, ..)."""
    return jax.lax.all_gather(w, "fsdp", axis=dim, tiled=True)


def _fsdp_gather_fwd(w, dim):
    return fsdp_gather(w, dim), None


def _fsdp_gather_bwd(dim, _, g):
    # Every fsdp rank holds a gradient of the whole weight from its own tokens; the sum of them,
    # split back into shards, is each rank's share: one reduce-scatter.
    return (jax.lax.psum_scatter(g, "fsdp", scatter_dimension=dim, tiled=True),)


fsdp_gather.defvjp(_fsdp_gather_fwd, _fsdp_gather_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def tensor_gather(w: jax.Array, dim: int) -> jax.Array:
    """All-gather a table split on `tensor` (the vocab) whole: each tensor rank then computes the
    same thing, so the backward keeps this rank's slice of the (identical) gradient, no sum."""
    return jax.lax.all_gather(w, "tensor", axis=dim, tiled=True)


def _tensor_gather_fwd(w, dim):
    return tensor_gather(w, dim), w.shape[dim]


def _tensor_gather_bwd(dim, size, g):
    start = jax.lax.axis_index("tensor") * size
    return (jax.lax.dynamic_slice_in_dim(g, start, size, axis=dim),)


tensor_gather.defvjp(_tensor_gather_fwd, _tensor_gather_bwd)


@jax.custom_vjp
def tp_enter(x: jax.Array) -> jax.Array:
    """Megatron's f: identity forward; backward all-reduces the input's gradient over tensor
    (each rank's heads / MLP columns contributed part of it)."""
    return x


tp_enter.defvjp(lambda x: (x, None), lambda _, g: (jax.lax.psum(g, "tensor"),))


@jax.custom_vjp
def tp_leave(x: jax.Array) -> jax.Array:
    """Megatron's g: all-reduce the row-split projection's partial sums over tensor; backward is
    the identity (every rank needs the same full gradient)."""
    return jax.lax.psum(x, "tensor")


tp_leave.defvjp(lambda x: (tp_leave(x), None), lambda _, g: (g,))

TENSOR_COMMS = BlockComms(enter=tp_enter, leave=tp_leave)


def gather_leaf(w: jax.Array, spec: P, *, whole: bool = False) -> jax.Array:
    """w's fsdp-split dims gathered (and, with whole=True, its tensor-split dims too)."""
    for dim, axis in enumerate(spec):
        if axis == "fsdp":
            w = fsdp_gather(w, dim)
        elif axis == "tensor" and whole:
            w = tensor_gather(w, dim)
    return w


def _spec_axes(spec: P) -> tuple[str, ...]:
    return tuple(a for part in spec if part for a in ((part,) if isinstance(part, str) else part))


# ----------------------------------------------------------------------------------------------
# The per-device program.


def local_config(cfg: ModelConfig, tensor: int) -> ModelConfig:
    """cfg as one tensor rank sees a block: N / t query heads, K / t kv heads, F / t MLP width."""
    if tensor == 1:
        return cfg
    return cfg.replace(n_head=cfg.n_head // tensor, n_kv_head=cfg.kv_heads // tensor,
                       head_dim=cfg.resolved_head_dim, d_ff=cfg.ff_dim // tensor)


def local_loss_sum(params: Params, specs: Params, x: jax.Array, y: jax.Array, cfg: ModelConfig,
                   mesh_shape: dict[str, int]) -> jax.Array:
    """Sum of next-token losses (nats) over this device's tokens. x, y: int32 (B/dp, T/sp), this
    device's rows and token range; params: its shards; specs: their PartitionSpecs."""
    B, T = x.shape
    tensor, seq = mesh_shape["tensor"], mesh_shape["sequence"]
    if T * seq > cfg.max_seq_len:
        raise ValueError(f"sequence length {T * seq} exceeds max_seq_len={cfg.max_seq_len}")
    start = jax.lax.axis_index("sequence") * T if seq > 1 else 0
    positions = jnp.broadcast_to(start + jnp.arange(T, dtype=jnp.int32), (B, T))  # global positions
    top = {k: gather_leaf(v, specs[k], whole=True) if not isinstance(v, dict) else
           {n: gather_leaf(a, specs[k][n], whole=True) for n, a in v.items()}
           for k, v in params.items() if k != "layers"}
    h = embed(top, x, positions, cfg)  # (B*T, D)

    lcfg = local_config(cfg, tensor)
    attend = ring_attend() if seq > 1 else causal_attend(lcfg)
    comms = TENSOR_COMMS if tensor > 1 else None
    layer_specs = specs["layers"][0]  # every layer has the same layout

    def layer(shards, h):
        # FSDP: this layer's weights are whole only from here to the end of the block.
        p = jax.tree.map(gather_leaf, shards, layer_specs)
        h, _ = block(p, h, lcfg, positions, attend, comms=comms)
        return h

    layer = remat_block(layer, cfg)  # with remat, the backward gathers the layer again
    if cfg.scan_layers:
        stacked = jax.tree.map(lambda *a: jnp.stack(a), *params["layers"])  # (L, ...) shards
        h, _ = jax.lax.scan(lambda h, shards: (layer(shards, h), None), h, stacked)
    else:
        for shards in params["layers"]:
            h = layer(shards, h)
    logits = unembed(top, h, cfg)  # (B*T, V) float32: the whole vocab on every tensor rank
    return optax.softmax_cross_entropy_with_integer_labels(logits, y.reshape(-1)).sum()


def make_manual_train_step(cfg: ModelConfig, optimizer: optax.GradientTransformation, grad_clip: float,
                           mesh: jax.sharding.Mesh, param_specs: Params, opt_specs: Any,
                           schedule: optax.Schedule | None = None) -> Callable:
    """The step `(params, opt_state, x, y, step) -> (params, opt_state, metrics)` as a shard_map
    over `mesh`; jit it (the specs are those of the auto step's shardings, so state moves freely
    between the modes). x, y: int32 (A, B, T) global, split (None, (data, fsdp), sequence).

    optimizer: the update WITHOUT global-norm clipping (grad_clip=0 in make_optimizer; its state
    has the same structure); the clip at `grad_clip` happens here with the all-reduced norm.
    Dropout is not supported here (validate_config refuses it)."""
    sizes = dict(mesh.shape)
    batch_spec = P(None, ("data", "fsdp"), "sequence")
    flat_specs, treedef = jax.tree.flatten(param_specs, is_leaf=lambda s: isinstance(s, P))

    def step_fn(params, opt_state, x, y, step):
        A, B, T = x.shape  # local: this device's micro-batches, rows and tokens
        n_tokens = A * B * T * math.prod(sizes[a] for a in TOKEN_AXES)  # in the global batch
        grad_fn = jax.value_and_grad(local_loss_sum)

        def micro(carry, inputs):
            loss_sum, grad_sum = carry
            li, gi = grad_fn(params, param_specs, inputs[0], inputs[1], cfg, sizes)
            return (loss_sum + li, jax.tree.map(jnp.add, grad_sum, gi)), None

        zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
        (loss_sum, grads), _ = jax.lax.scan(micro, zeros, (x, y))

        # Data parallelism: every device's gradient is of its own tokens; sum them over each
        # token-splitting axis this leaf is not already reduced over (fsdp_gather's backward
        # summed over fsdp). One psum per group of leaves.
        flat = treedef.flatten_up_to(grads)
        groups: dict[tuple[str, ...], list[int]] = {}
        for n, spec in enumerate(flat_specs):
            axes = tuple(a for a in TOKEN_AXES if sizes[a] > 1 and a not in _spec_axes(spec))
            groups.setdefault(axes, []).append(n)
        for axes, idx in groups.items():
            if axes:
                summed = jax.lax.psum([flat[n] for n in idx], axes)
                for n, g in zip(idx, summed, strict=True):
                    flat[n] = g
        flat = [g / n_tokens for g in flat]  # the gradient of the mean loss
        grads = treedef.unflatten(flat)
        loss = jax.lax.psum(loss_sum, [a for a in TOKEN_AXES if sizes[a] > 1]) / n_tokens

        # Global gradient norm: each leaf's squares summed over the axes that split it (its other
        # axes hold copies), one psum per distinct set of axes.
        sq: dict[tuple[str, ...], jax.Array] = {}
        for g, spec in zip(flat, flat_specs, strict=True):
            axes = tuple(a for a in _spec_axes(spec) if sizes[a] > 1)
            sq[axes] = sq.get(axes, 0.0) + jnp.sum(jnp.square(g.astype(jnp.float32)))
        grad_norm = jnp.sqrt(sum(jax.lax.psum(s, axes) if axes else s for axes, s in sq.items()))
        if grad_clip and grad_clip > 0:  # optax.clip_by_global_norm's rule, with the global norm
            grads = jax.tree.map(lambda g: jax.lax.select(grad_norm < grad_clip, g,
                                                          (g / grad_norm.astype(g.dtype)) * grad_clip), grads)

        # the update, skipped whole on a non-finite loss or norm, as in the jit step
        return guarded_update(optimizer, schedule, params, opt_state, grads, loss, grad_norm, step)

    metric_specs = {"loss": P(), "grad_norm": P(), "ok": P()} | ({"lr": P()} if schedule is not None else {})
    return jax.shard_map(step_fn, mesh=mesh,
                         in_specs=(param_specs, opt_specs, batch_spec, batch_spec, P()),
                         out_specs=(param_specs, opt_specs, metric_specs), check_vma=False)


def specs_of(shardings: Any) -> Any:
    """The PartitionSpec of every NamedSharding in a pytree."""
    return jax.tree.map(lambda s: s.spec, shardings, is_leaf=lambda s: isinstance(s, jax.sharding.Sharding))


def manual_batch_sharding(mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
    """(A, B, T) batches for the manual step: B split like the auto step's, T over `sequence`."""
    return jax.sharding.NamedSharding(mesh, P(None, shd.RULES["batch"], "sequence"))


__all__ = ["fsdp_gather", "tensor_gather", "tp_enter", "tp_leave", "gather_leaf", "local_config",
           "local_loss_sum", "make_manual_train_step", "specs_of", "manual_batch_sharding"]
