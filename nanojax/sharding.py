"""Sharding by name: logical param axes -> mesh axes `data`, `fsdp`, `sequence`, `tensor`.

Model code never names a mesh axis. Every param leaf carries logical axes
(`nanojax.model.param_axes`); `RULES` maps each logical name to a mesh axis; the train step takes
its in/out shardings from here, so one device and many differ only in the mesh shape.
Activations are pinned the same way where the partitioner needs telling: the model calls
`nanojax.model.constrain(x, logical_axes)`, and `activation_sharding(mesh)` (active while the
train step is traced) maps those names through `RULES` too.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
import optax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from nanojax.config import ModelConfig
from nanojax.model import ACTIVATION_CONSTRAINT, ParamSpec, param_specs

# data: batch replicas; fsdp: batch replicas whose params are split too; sequence: the token axis
# T (context parallelism, manual mode's ring attention); tensor: heads and MLP width (Megatron).
# Tensor is innermost, so its ranks are neighbours: it talks twice per block.
MESH_AXES = ("data", "fsdp", "sequence", "tensor")

# logical axis -> mesh axis (or a tuple of mesh axes, or None for replicated)
RULES: dict[str, Any] = {
    "batch": ("data", "fsdp"),  # the batch is split over every data-parallel replica
    "vocab": "tensor",
    "embed": "fsdp",  # FSDP shards params (and optimizer state) along the residual width
    "heads": "tensor",  # Megatron-style: heads and MLP hidden split across tensor ranks
    "kv_heads": "tensor",
    "mlp": "tensor",
    "head_dim": None,
    "layers": None,
}


def mesh_sizes(data: int, fsdp: int, tensor: int, n_devices: int, sequence: int = 1) -> tuple[int, ...]:
    """The sizes of a mesh over n_devices, in MESH_AXES order (data, fsdp, sequence, tensor); one
    size may be -1 to take what the others leave. Raises ValueError naming the sizes and the
    device count when they don't fit (validate_config reports it as one of a config's problems;
    make_mesh raises it)."""
    given = {"data": data, "fsdp": fsdp, "sequence": sequence, "tensor": tensor}
    sizes = [given[a] for a in MESH_AXES]
    shown = " x ".join(f"mesh.{a}={s}" for a, s in zip(MESH_AXES, sizes, strict=True))
    fixed = math.prod(s for s in sizes if s != -1)
    if sizes.count(-1) > 1:
        raise ValueError(f"{shown}: at most one mesh size may be -1; set the others to numbers")
    if -1 in sizes:
        if n_devices % fixed:
            raise ValueError(f"{shown}: {n_devices} devices cannot be split with the fixed sizes "
                             f"(product {fixed}); choose sizes whose product divides {n_devices}")
        sizes[sizes.index(-1)] = n_devices // fixed
    elif fixed != n_devices:
        raise ValueError(f"{shown}: that is {fixed} devices, but {n_devices} are available (this run "
                         f"has {n_devices}); make the product {n_devices}, or set one size to -1")
    return tuple(sizes)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Any = None, *,
              sequence: int = 1) -> jax.sharding.Mesh:
    """A (data, fsdp, sequence, tensor) mesh over all devices; one size may be -1 to take the rest."""
    devices = list(devices if devices is not None else jax.devices())
    sizes = mesh_sizes(data, fsdp, tensor, len(devices), sequence)
    return jax.make_mesh(sizes, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def logical_to_spec(
    axes: tuple[str | None, ...], shape: tuple[int, ...], mesh: jax.sharding.Mesh, rules: dict | None = None
) -> P:
    """PartitionSpec for one array. A dim whose size the mesh axes do not divide is replicated,
    and a mesh axis is used at most once per array."""
    rules = RULES if rules is None else rules
    used: set[str] = set()
    spec = []
    for name, size in zip(axes, shape, strict=True):
        target = rules.get(name) if name is not None else None
        names = (target,) if isinstance(target, str) else tuple(target or ())
        names = tuple(n for n in names if mesh.shape[n] > 1 and n not in used)
        if names and size % math.prod(mesh.shape[n] for n in names) == 0:
            used.update(names)
            spec.append(names[0] if len(names) == 1 else names)
        else:
            spec.append(None)
    return P(*spec)


def param_shardings(cfg: ModelConfig, mesh: jax.sharding.Mesh, rules: dict | None = None) -> Any:
    """The params pytree with a NamedSharding at every leaf."""
    return jax.tree.map(
        lambda s: NamedSharding(mesh, logical_to_spec(s.axes, s.shape, mesh, rules)),
        param_specs(cfg),  # shapes and axes come from one place
        is_leaf=lambda x: isinstance(x, ParamSpec),
    )


def opt_state_shardings(optimizer: optax.GradientTransformation, params_abstract: Any, p_shardings: Any,
                        mesh: jax.sharding.Mesh) -> Any:
    """Optimizer state shards like the params it mirrors (Adam's mu and nu); counters replicate."""
    state = jax.eval_shape(optimizer.init, params_abstract)
    return optax.tree_map_params(
        optimizer,
        lambda _, s: s,
        state,
        p_shardings,
        transform_non_params=lambda _: replicated(mesh),
    )


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: jax.sharding.Mesh, ndim: int = 2) -> NamedSharding:
    """(B, T) batches split on B; with gradient accumulation (A, B, T) split on B."""
    lead = [None] * (ndim - 2)
    return NamedSharding(mesh, P(*lead, RULES["batch"], None))


@contextlib.contextmanager
def activation_sharding(mesh: jax.sharding.Mesh | None, rules: dict | None = None) -> Iterator[None]:
    """While active (around the tracing of a step), `nanojax.model.constrain` pins activations
    to `mesh` by the same rules as the params. A no-op without a mesh or on a one-device mesh."""
    if mesh is None or mesh.size == 1:
        yield
        return

    def fn(x: jax.Array, axes: tuple[str | None, ...]) -> jax.Array:
        spec = logical_to_spec(axes, x.shape, mesh, rules)
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))

    token = ACTIVATION_CONSTRAINT.set(fn)
    try:
        yield
    finally:
        ACTIVATION_CONSTRAINT.reset(token)


def put_batch(batch: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """Places a host batch; on several processes each passes its own rows of the global batch."""
    if jax.process_count() == 1:
        return jax.device_put(batch, sharding)
    return jax.make_array_from_process_local_data(sharding, batch)


__all__ = [
    "MESH_AXES", "RULES", "mesh_sizes", "make_mesh", "logical_to_spec", "param_shardings",
    "opt_state_shardings", "replicated", "batch_sharding", "activation_sharding", "put_batch",
]
