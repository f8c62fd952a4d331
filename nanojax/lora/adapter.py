"""LoRA adapters: the record, the modules they can target, the seam weight, merge and unmerge.

LoRA (Hu et al. 2021, arXiv:2106.09685) adds a trainable low-rank update to a frozen matrix:
y = x W + s (x A) B, A (I, r), B (r, O), s = alpha / r (rsLoRA, Kalajdzievski 2023,
arXiv:2312.03732: s = alpha / sqrt(r)). PEFT applies dropout to the input of the low-rank path
only: y = x W + s (dropout(x) A) B.

An adapter is its own pytree (`LoraAdapter`): per layer, per targeted *HF module*, {"a", "b"}.
Modules are keyed the way PEFT names them, so an adapter maps one to one onto
`adapter_model.safetensors`: Llama's q, k, v, o, gate, up, down (q_proj ... down_proj) and
GPT-2's c_attn, attn.c_proj, c_fc, mlp.c_proj. nanojax stores GPT-2's fused c_attn as three
weights (wq, wk, wv); its adapter stays fused, one A (D, r) and one B (r, 3D), and each of the
three weights takes its column slice of B (layout.py's q | k | v order), exactly PEFT's product.

It is applied through the model's one matmul seam (nanojax/dense.py): `adapter.wrap(params, cfg)`
returns the params with each targeted weight replaced by a `LoraWeight` record holding the base
weight (a plain array, or any other `Weight` record such as a quantized one: that is QLoRA) and
its A and B slices. The model itself has no LoRA code beyond passing `lora=` to `wrap`.
"""

from __future__ import annotations

import dataclasses
import math
import weakref
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from nanojax.config import ModelConfig
from nanojax.dense import dense, matmul

Params = dict[str, Any]


class LoraError(ValueError):
    """A LoRA adapter, config or request nanojax cannot apply (the message says why and what to do)."""


# ----------------------------------------------------------------------------------------------
# The modules an adapter can target, per family.


@dataclasses.dataclass(frozen=True)
class Module:
    """One HF module an adapter can target: its name inside a layer, its (I, O) and the nanojax
    leaves it covers, each (sub-dict, leaf, first output column, end column) of the module's O."""

    hf: str  # e.g. "self_attn.q_proj" or "attn.c_attn"
    in_dim: int
    out_dim: int
    parts: tuple[tuple[str, str, int, int], ...]


def family(cfg: ModelConfig) -> str:
    """'gpt2' (learned positions, GELU MLP: HF GPT2LMHeadModel names) or 'llama'."""
    from nanojax.interop.hf_config import _arch_for

    return _arch_for(cfg).family


def modules(cfg: ModelConfig) -> dict[str, Module]:
    """Every module key an adapter of this model may hold -> its Module."""
    D, N, K, H, F = cfg.d_model, cfg.n_head, cfg.kv_heads, cfg.resolved_head_dim, cfg.ff_dim
    if family(cfg) == "gpt2":
        return {
            "c_attn": Module("attn.c_attn", D, N * H + 2 * K * H,
                             (("attn", "wq", 0, N * H), ("attn", "wk", N * H, N * H + K * H),
                              ("attn", "wv", N * H + K * H, N * H + 2 * K * H))),
            "attn.c_proj": Module("attn.c_proj", N * H, D, (("attn", "wo", 0, D),)),
            "c_fc": Module("mlp.c_fc", D, F, (("mlp", "w_in", 0, F),)),
            "mlp.c_proj": Module("mlp.c_proj", F, D, (("mlp", "w_out", 0, D),)),
        }
    return {
        "q": Module("self_attn.q_proj", D, N * H, (("attn", "wq", 0, N * H),)),
        "k": Module("self_attn.k_proj", D, K * H, (("attn", "wk", 0, K * H),)),
        "v": Module("self_attn.v_proj", D, K * H, (("attn", "wv", 0, K * H),)),
        "o": Module("self_attn.o_proj", N * H, D, (("attn", "wo", 0, D),)),
        "gate": Module("mlp.gate_proj", D, F, (("mlp", "w_gate", 0, F),)),
        "up": Module("mlp.up_proj", D, F, (("mlp", "w_up", 0, F),)),
        "down": Module("mlp.down_proj", F, D, (("mlp", "w_down", 0, D),)),
    }


# Names a user may give for GPT-2 (PEFT's "c_proj" matches both c_proj modules, as in PEFT).
_GPT2_ALIASES = {"c_attn": ("c_attn",), "qkv": ("c_attn",), "c_proj": ("attn.c_proj", "mlp.c_proj"),
                 "attn.c_proj": ("attn.c_proj",), "o": ("attn.c_proj",), "c_fc": ("c_fc",),
                 "up": ("c_fc",), "mlp.c_proj": ("mlp.c_proj",), "down": ("mlp.c_proj",)}
_LLAMA_ALIASES = {k: (k,) for k in ("q", "k", "v", "o", "gate", "up", "down")} | {
    f"{k}_proj": (k,) for k in ("q", "k", "v", "o", "gate", "up", "down")}


def resolve_targets(targets: str | list[str] | tuple[str, ...], cfg: ModelConfig) -> tuple[str, ...]:
    """User target names ("q,v", ["c_attn", "c_proj"], ...) -> module keys in `modules(cfg)` order."""
    names = [t.strip() for t in targets.split(",")] if isinstance(targets, str) else list(targets)
    names = [t for t in names if t]
    fam = family(cfg)
    aliases = _GPT2_ALIASES if fam == "gpt2" else _LLAMA_ALIASES
    if not names:
        raise LoraError(f"no LoRA targets given; expected some of {sorted(aliases)} for this {fam} model, "
                        "e.g. targets='q,v' (Llama) or 'c_attn' (GPT-2)")
    keys: set[str] = set()
    for t in names:
        if t not in aliases:
            hint = (" GPT-2 fuses q, k and v into one module: target 'c_attn'."
                    if fam == "gpt2" and t in ("q", "k", "v", "q_proj", "k_proj", "v_proj") else "")
            raise LoraError(f"unknown LoRA target {t!r} for a {fam} model; expected some of "
                            f"{sorted(aliases)}.{hint}")
        keys.update(aliases[t])
    return tuple(k for k in modules(cfg) if k in keys)


# ----------------------------------------------------------------------------------------------
# The seam weights.


@struct.dataclass
class LoraWeight:
    """A base weight plus a low-rank update, as one matrix for nanojax.dense.

    base: the stored weight (any shape whose leading dims give I) or a `Weight` record;
    a (I, r), b (r, O); scaling: alpha / r (or / sqrt(r)); dropout on the low-rank input only.
    """

    base: Any
    a: jax.Array
    b: jax.Array
    rng: jax.Array | None = None
    scaling: float = struct.field(pytree_node=False, default=1.0)
    dropout: float = struct.field(pytree_node=False, default=0.0)

    def matmul(self, x: jax.Array, dtype: jnp.dtype) -> jax.Array:
        """x (M, I) -> (M, O): x W + scaling * (dropout(x) A) B, in `dtype`."""
        y = dense(x, self.base, dtype)
        xa = x
        if self.rng is not None and self.dropout > 0:
            keep = jax.random.bernoulli(self.rng, 1.0 - self.dropout, x.shape)
            xa = jnp.where(keep, x / (1.0 - self.dropout), 0).astype(x.dtype)
        low = matmul(matmul(xa.astype(dtype), self.a.astype(dtype)), self.b.astype(dtype))  # (M, O)
        return y + (low * self.scaling).astype(y.dtype)


@struct.dataclass
class RowLoraWeight:
    """A base weight plus one of n stacked low-rank updates per batch row (multi-LoRA serving).

    a (n, I, r), b (n, r, O), scaling (n,) float32, ids (B,) int32: row b of the batch uses
    adapter ids[b]. x (M, I) holds the B rows' tokens row-major (M = B * T). Each row gets its
    own low-rank update in one batched product (the job of Punica's / S-LoRA's BGMV kernels,
    Chen et al. 2023, arXiv:2310.18547), so one compiled call serves every mix of adapters.
    """

    base: Any
    a: jax.Array
    b: jax.Array
    scaling: jax.Array
    ids: jax.Array

    def matmul(self, x: jax.Array, dtype: jnp.dtype) -> jax.Array:
        """x (M, I) -> (M, O) in `dtype`.

        Every row goes through all n slots' A at once, (M, I) @ (I, n*R), the slots it does not
        use are zeroed, and one (M, n*R) @ (n*R, O) product adds its own B: two plain 2-D matmuls
        (the fast path of XLA:CPU) instead of per-row gathers and tiny batched matvecs. The extra
        work is n*R columns, small beside the base matmul's O (docs/lora.md has the measured
        cost). Zeroed slots add exact zeros, so a row's result is its own adapter's product.
        """
        y = dense(x, self.base, dtype)
        n, I, R = self.a.shape
        B = self.ids.shape[0]
        a_cat = self.a.astype(dtype).transpose(1, 0, 2).reshape(I, n * R)  # (I, n*R), slot-major
        h = matmul(x.astype(dtype), a_cat).reshape(B, -1, n, R)  # (B, T, n, R)
        own = jax.nn.one_hot(self.ids, n, dtype=dtype)  # (B, n): 1 at the row's slot
        h = (h * own[:, None, :, None]).reshape(-1, n * R)  # (M, n*R)
        low = matmul(h, self.b.astype(dtype).reshape(n * R, -1))  # (M, O)
        low = low.reshape(B, -1, y.shape[-1])  # (B, T, O)
        low = low * self.scaling[self.ids].astype(dtype)[:, None, None]
        return y + low.reshape(y.shape).astype(y.dtype)


# ----------------------------------------------------------------------------------------------
# The adapter.


def lora_scaling(rank: int, alpha: float, rslora: bool) -> float:
    """alpha / r, or alpha / sqrt(r) with rsLoRA (arXiv:2312.03732)."""
    return float(alpha) / (math.sqrt(rank) if rslora else rank)


@struct.dataclass
class LoraAdapter:
    """A LoRA adapter for one base model.

    weights: per layer, {module key: {"a": (I, r), "b": (r, O)}} (keys from `modules(cfg)`; the
      trainable pytree: training differentiates, optimizes and checkpoints exactly this).
    targets: the module keys it holds; rank r; alpha; rslora; dropout (training only).
    """

    weights: list[dict[str, dict[str, jax.Array]]]
    targets: tuple[str, ...] = struct.field(pytree_node=False)
    rank: int = struct.field(pytree_node=False)
    alpha: float = struct.field(pytree_node=False)
    rslora: bool = struct.field(pytree_node=False, default=False)
    dropout: float = struct.field(pytree_node=False, default=0.0)

    @property
    def scaling(self) -> float:
        return lora_scaling(self.rank, self.alpha, self.rslora)

    def wrap(self, params: Params, cfg: ModelConfig, rng: jax.Array | None = None) -> Params:
        """params with every targeted weight replaced by a LoraWeight (the forward's view; the
        params themselves are untouched). rng: dropout key (training), None for none."""
        check_adapter(self, cfg)
        mods = modules(cfg)
        layers = []
        for i, (p, w) in enumerate(zip(params["layers"], self.weights, strict=True)):
            p = {k: dict(v) if isinstance(v, dict) else v for k, v in p.items()}
            for key, ab in w.items():
                r = None if rng is None else jax.random.fold_in(rng, i * 64 + list(mods).index(key))
                for sub, leaf, lo, hi in mods[key].parts:
                    p[sub][leaf] = LoraWeight(p[sub][leaf], ab["a"], ab["b"][:, lo:hi], r,
                                              self.scaling, self.dropout)
            layers.append(p)
        return {**params, "layers": layers}


def init_lora(cfg: ModelConfig, key: jax.Array, *, rank: int, targets: str | list[str] | tuple[str, ...],
              alpha: float | None = None, dropout: float = 0.0, rslora: bool = False,
              dtype: str = "float32") -> LoraAdapter:
    """A fresh adapter as PEFT initialises one: A ~ U(-1/sqrt(I), 1/sqrt(I)) (PyTorch's Linear
    default, kaiming_uniform with a=sqrt(5)), B = 0, so the adapted model starts as the base.
    alpha defaults to rank (scaling 1)."""
    check_hparams(rank, alpha if alpha is not None else rank, dropout)
    keys = resolve_targets(targets, cfg)
    mods = modules(cfg)
    weights = []
    for i in range(cfg.n_layer):
        layer = {}
        for j, k in enumerate(keys):
            m = mods[k]
            bound = 1.0 / math.sqrt(m.in_dim)
            a = jax.random.uniform(jax.random.fold_in(key, i * 64 + j), (m.in_dim, rank), jnp.float32,
                                   -bound, bound)
            layer[k] = {"a": a.astype(dtype), "b": jnp.zeros((rank, m.out_dim), dtype)}
        weights.append(layer)
    return LoraAdapter(weights, keys, int(rank), float(alpha if alpha is not None else rank),
                       bool(rslora), float(dropout))


def check_hparams(rank: Any, alpha: Any, dropout: Any) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise LoraError(f"LoRA rank must be an int > 0, got {rank!r} (e.g. rank=8)")
    if not isinstance(alpha, int | float) or not alpha > 0:
        raise LoraError(f"LoRA alpha must be a number > 0, got {alpha!r} (e.g. alpha=16, or the rank)")
    if not isinstance(dropout, int | float) or not 0 <= dropout < 1:
        raise LoraError(f"LoRA dropout must be in [0, 1), got {dropout!r}")


def check_adapter(adapter: LoraAdapter, cfg: ModelConfig) -> None:
    """Refuses an adapter made for another base: layer count, module names and shapes."""
    if not isinstance(adapter, LoraAdapter):
        raise LoraError("lora must be a LoraAdapter (nj.load_lora / nj.init_lora), got "
                        f"{type(adapter).__name__}")
    if len(adapter.weights) != cfg.n_layer:
        raise LoraError(f"adapter has {len(adapter.weights)} layers; this model has {cfg.n_layer}. "
                        "It was made for another base model.")
    mods = modules(cfg)
    for i, w in enumerate(adapter.weights):
        for key, ab in w.items():
            if key not in mods:
                raise LoraError(f"adapter layer {i} targets {key!r}, not a module of this {family(cfg)} "
                                f"model (expected some of {list(mods)}); it was made for another base.")
            m = mods[key]
            want_a, want_b = (m.in_dim, adapter.rank), (adapter.rank, m.out_dim)
            if tuple(ab["a"].shape) != want_a or tuple(ab["b"].shape) != want_b:
                raise LoraError(
                    f"adapter layer {i} {key}: A {tuple(ab['a'].shape)}, B {tuple(ab['b'].shape)}; this "
                    f"model's {m.hf} needs A {want_a}, B {want_b}. It was made for another base model.")


def count_params(adapter: LoraAdapter) -> int:
    """Trainable parameters: sum over layers and modules of r * (I + O)."""
    return sum(int(x.size) for x in jax.tree.leaves(adapter.weights))


# ----------------------------------------------------------------------------------------------
# Merge and unmerge.

# Merged leaves, by id, so that merging twice (or unmerging what was never merged) is refused.
# Weak references: an entry goes when its array does.
_MERGED: dict[int, tuple[weakref.ref, int]] = {}


def _mark(x: jax.Array, tag: int) -> None:
    i = id(x)
    _MERGED[i] = (weakref.ref(x, lambda _, i=i: _MERGED.pop(i, None)), tag)


def _merged_tag(x: Any) -> int | None:
    entry = _MERGED.get(id(x))
    return entry[1] if entry is not None and entry[0]() is x else None


def _delta(adapter: LoraAdapter, key: str, layer: int, lo: int, hi: int) -> jax.Array:
    ab = adapter.weights[layer][key]
    a, b = ab["a"].astype(jnp.float32), ab["b"][:, lo:hi].astype(jnp.float32)
    return (a @ b) * adapter.scaling  # (I, hi - lo)


def _merge(params: Params, cfg: ModelConfig, adapter: LoraAdapter, sign: float) -> Params:
    check_adapter(adapter, cfg)
    mods = modules(cfg)
    tag = id(adapter)
    layers = []
    for i, (p, w) in enumerate(zip(params["layers"], adapter.weights, strict=True)):
        p = {k: dict(v) if isinstance(v, dict) else v for k, v in p.items()}
        for key in w:
            for sub, leaf, lo, hi in mods[key].parts:
                base = p[sub][leaf]
                if not isinstance(base, jax.Array):
                    raise LoraError(f"layer {i} {sub}.{leaf} is a {type(base).__name__}, not an array: "
                                    "merging needs plain weights. Serve a quantized base unmerged "
                                    "(forward(..., lora=)).")
                seen = _merged_tag(base)
                if sign > 0 and seen is not None:
                    raise LoraError(f"layer {i} {sub}.{leaf} already has an adapter merged in; merging "
                                    "twice would add it twice. Unmerge it first, or merge into the "
                                    "original params.")
                if sign < 0 and seen != tag:
                    raise LoraError(f"layer {i} {sub}.{leaf} does not hold this adapter merged "
                                    "(nj.merge_lora's result with this same adapter is expected).")
                new = (base.astype(jnp.float32)
                       + sign * _delta(adapter, key, i, lo, hi).reshape(base.shape)).astype(base.dtype)
                if sign > 0:
                    _mark(new, tag)
                p[sub][leaf] = new
        layers.append(p)
    return {**params, "layers": layers}


def merge_lora(params: Params, cfg: ModelConfig, adapter: LoraAdapter) -> Params:
    """params with W + scaling * A B folded into every targeted weight (a new tree; the input is
    untouched). The result runs with no adapter at plain-model speed. Merging into a weight that
    already holds a merged adapter is refused."""
    return _merge(params, cfg, adapter, 1.0)


def unmerge_lora(params: Params, cfg: ModelConfig, adapter: LoraAdapter) -> Params:
    """The inverse of merge_lora (W - scaling * A B), for params merge_lora returned with this
    adapter: equal to the original up to float rounding."""
    return _merge(params, cfg, adapter, -1.0)
