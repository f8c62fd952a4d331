"""Many adapters in one batch: each row of a batch uses its own adapter (or none), in one call.

`stack_adapters([a, b, None, a], cfg)` stacks the distinct adapters on a leading axis, zero-padding
ranks to the largest (a zero column of A and zero row of B add exactly nothing), plus one all-zero
slot for rows without an adapter, and records which slot each row uses. Its `wrap` puts a
`RowLoraWeight` at every module any of them targets; that weight gathers each row's A and B and
applies them as a batched low-rank product (Punica / S-LoRA's BGMV, arXiv:2310.18547), so one
compiled prefill and decode serve every mix of adapters, not one call per adapter.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from nanojax.config import ModelConfig
from nanojax.lora.adapter import LoraAdapter, LoraError, RowLoraWeight, check_adapter, modules

Params = dict[str, Any]


@struct.dataclass
class StackedLora:
    """n adapter slots (the last all zeros) and each batch row's slot.

    weights: per layer {module key: {"a": (n, I, R), "b": (n, R, O)}}, R the largest rank;
    scaling: float32 (n,); ids: int32 (B,), row b uses slot ids[b].
    """

    weights: list[dict[str, dict[str, jax.Array]]]
    scaling: jax.Array
    ids: jax.Array

    def wrap(self, params: Params, cfg: ModelConfig, rng: jax.Array | None = None) -> Params:
        """params with every module any adapter targets replaced by a RowLoraWeight (rng unused:
        serving has no dropout)."""
        mods = modules(cfg)
        layers = []
        for p, w in zip(params["layers"], self.weights, strict=True):
            p = {k: dict(v) if isinstance(v, dict) else v for k, v in p.items()}
            for key, ab in w.items():
                for sub, leaf, lo, hi in mods[key].parts:
                    p[sub][leaf] = RowLoraWeight(p[sub][leaf], ab["a"], ab["b"][:, :, lo:hi],
                                                 self.scaling, self.ids)
            layers.append(p)
        return {**params, "layers": layers}

    def rows(self, rows: Sequence[int]) -> StackedLora:
        """The same stack for a subset of the batch's rows (in that order)."""
        return self.replace(ids=self.ids[np.asarray(rows, np.int32)])


def stack_adapters(per_row: Sequence[LoraAdapter | None], cfg: ModelConfig) -> StackedLora:
    """One StackedLora for a batch whose row b uses per_row[b] (None: no adapter).

    Distinct adapters are found by identity, so passing the same object for several rows stores
    it once. Every adapter is checked against cfg (another base's adapter is refused by name)."""
    slots: list[LoraAdapter] = []
    ids = []
    for b, a in enumerate(per_row):
        if a is None:
            ids.append(-1)
            continue
        if not isinstance(a, LoraAdapter):
            raise LoraError(f"lora[{b}] is a {type(a).__name__}; expected a LoraAdapter or None per row")
        check_adapter(a, cfg)
        for j, s in enumerate(slots):
            if s is a:
                ids.append(j)
                break
        else:
            slots.append(a)
            ids.append(len(slots) - 1)
    n = len(slots) + 1  # + the zero slot
    ids = [n - 1 if i < 0 else i for i in ids]
    R = max((a.rank for a in slots), default=1)
    mods = modules(cfg)
    keys = [k for k in mods if any(k in a.targets for a in slots)]
    weights = []
    for i in range(cfg.n_layer):
        layer = {}
        for k in keys:
            m = mods[k]
            A = np.zeros((n, m.in_dim, R), np.float32)
            Bm = np.zeros((n, R, m.out_dim), np.float32)
            for j, a in enumerate(slots):
                if k in a.weights[i]:
                    A[j, :, : a.rank] = np.asarray(a.weights[i][k]["a"], np.float32)
                    Bm[j, : a.rank] = np.asarray(a.weights[i][k]["b"], np.float32)
            layer[k] = {"a": jnp.asarray(A), "b": jnp.asarray(Bm)}
        weights.append(layer)
    scaling = jnp.asarray([a.scaling for a in slots] + [0.0], jnp.float32)
    return StackedLora(weights, scaling, jnp.asarray(ids, jnp.int32))
