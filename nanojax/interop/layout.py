"""The name/shape layout table: every HF tensor, its shape, and the nanojax leaves it fills.

`_layout(cfg, arch)` lists one `_Entry` per HF tensor with the two conversions (HF array ->
nanojax leaves, and back); the helpers below it flatten and rebuild nanojax param trees by path.

Layout mapping (HF -> nanojax; D model, N heads, K kv heads, H head dim, F mlp, V vocab):

    GPT-2 (Conv1D weights are stored (in, out), so no transpose)
      transformer.wte / wpe            (V, D) / (T, D)  -> wte / wpe
      h.i.ln_1, ln_2, ln_f {weight, bias}               -> ln1, ln2, ln_f {scale, bias}
      h.i.attn.c_attn.weight (D, 3D) = q | k | v        -> wq, wk, wv (D, N, H)
      h.i.attn.c_attn.bias (3D)                         -> bq, bk, bv (N, H)
      h.i.attn.c_proj (D, D), (D)                       -> wo (N, H, D), bo
      h.i.mlp.c_fc (D, F), (F); c_proj (F, D), (D)      -> w_in, b_in; w_out, b_out
    Llama (nn.Linear weights are stored (out, in): transposed)
      model.embed_tokens (V, D)                         -> wte
      layers.i.self_attn.q_proj (N*H, D), k/v (K*H, D)  -> wq (D, N, H), wk/wv (D, K, H)
      layers.i.self_attn.o_proj (D, N*H)                -> wo (N, H, D)
      layers.i.mlp.gate/up_proj (F, D), down (D, F)     -> w_gate, w_up (D, F), w_down (F, D)
      input_layernorm, post_attention_layernorm, norm   -> ln1, ln2, ln_f {scale}
      lm_head (V, D)                                    -> lm_head (D, V), absent when tied

RoPE needs no q/k permutation: nanojax rotates the two halves of each head (HF's rotate_half).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np

from nanojax.config import ModelConfig
from nanojax.interop.hf_config import _Arch
from nanojax.model import Params, ParamSpec, param_specs

PathT = tuple[str | int, ...]


@dataclasses.dataclass(frozen=True)
class _Entry:
    name: str  # full HF name, e.g. "model.layers.0.self_attn.q_proj.weight"
    shape: tuple[int, ...]  # HF shape
    paths: tuple[PathT, ...]  # nanojax leaves it fills
    nj_shapes: tuple[tuple[int, ...], ...]
    to_nj: Callable[[np.ndarray], list[np.ndarray]]  # HF array -> one array per path
    to_hf: Callable[[list[np.ndarray]], np.ndarray]  # arrays per path -> HF array


def _same(name: str, path: PathT, shape: tuple[int, ...]) -> _Entry:
    return _Entry(name, shape, (path,), (shape,), lambda a: [a], lambda xs: xs[0])


def _reshaped(name: str, path: PathT, hf_shape: tuple[int, ...], nj_shape: tuple[int, ...]) -> _Entry:
    return _Entry(name, hf_shape, (path,), (nj_shape,),
                  lambda a: [a.reshape(nj_shape)], lambda xs: xs[0].reshape(hf_shape))


def _linear(name: str, path: PathT, hf_shape: tuple[int, ...], nj_shape: tuple[int, ...]) -> _Entry:
    """An nn.Linear weight, (out, in) in HF: transpose to (in, out), then split heads."""
    flipped = hf_shape[::-1]
    return _Entry(name, hf_shape, (path,), (nj_shape,),
                  lambda a: [a.T.reshape(nj_shape)], lambda xs: xs[0].reshape(flipped).T)


def _fused(name: str, paths: tuple[PathT, ...], hf_shape: tuple[int, ...],
           nj_shape: tuple[int, ...], axis: int) -> _Entry:
    """GPT-2's c_attn: q | k | v concatenated along `axis`, each then split into heads."""
    n = len(paths)
    flat = tuple(s // n if i == axis else s for i, s in enumerate(hf_shape))
    return _Entry(name, hf_shape, paths, (nj_shape,) * n,
                  lambda a: [p.reshape(nj_shape) for p in np.split(a, n, axis=axis)],
                  lambda xs: np.concatenate([x.reshape(flat) for x in xs], axis=axis))


def _layout(cfg: ModelConfig, arch: _Arch) -> list[_Entry]:
    D, N, K, H = cfg.d_model, cfg.n_head, cfg.kv_heads, cfg.resolved_head_dim
    F, V, P = cfg.ff_dim, cfg.vocab_size, arch.prefix
    out: list[_Entry] = []
    if arch.family == "gpt2":
        out += [_same(P + "wte.weight", ("wte",), (V, D)),
                _same(P + "wpe.weight", ("wpe",), (cfg.max_seq_len, D))]
        for i in range(cfg.n_layer):
            h, L = f"{P}h.{i}.", ("layers", i)
            for hf_ln, nj_ln in (("ln_1", "ln1"), ("ln_2", "ln2")):
                out += [_same(f"{h}{hf_ln}.weight", (*L, nj_ln, "scale"), (D,)),
                        _same(f"{h}{hf_ln}.bias", (*L, nj_ln, "bias"), (D,))]
            qkv = tuple((*L, "attn", w) for w in ("wq", "wk", "wv"))
            qkv_b = tuple((*L, "attn", b) for b in ("bq", "bk", "bv"))
            out += [
                _fused(f"{h}attn.c_attn.weight", qkv, (D, 3 * D), (D, N, H), axis=1),
                _fused(f"{h}attn.c_attn.bias", qkv_b, (3 * D,), (N, H), axis=0),
                _reshaped(f"{h}attn.c_proj.weight", (*L, "attn", "wo"), (D, D), (N, H, D)),
                _same(f"{h}attn.c_proj.bias", (*L, "attn", "bo"), (D,)),
                _same(f"{h}mlp.c_fc.weight", (*L, "mlp", "w_in"), (D, F)),
                _same(f"{h}mlp.c_fc.bias", (*L, "mlp", "b_in"), (F,)),
                _same(f"{h}mlp.c_proj.weight", (*L, "mlp", "w_out"), (F, D)),
                _same(f"{h}mlp.c_proj.bias", (*L, "mlp", "b_out"), (D,)),
            ]
        out += [_same(P + "ln_f.weight", ("ln_f", "scale"), (D,)),
                _same(P + "ln_f.bias", ("ln_f", "bias"), (D,))]
    else:
        out.append(_same(P + "embed_tokens.weight", ("wte",), (V, D)))
        for i in range(cfg.n_layer):
            h, L = f"{P}layers.{i}.", ("layers", i)
            a, m = f"{h}self_attn.", f"{h}mlp."
            out += [
                _same(f"{h}input_layernorm.weight", (*L, "ln1", "scale"), (D,)),
                _same(f"{h}post_attention_layernorm.weight", (*L, "ln2", "scale"), (D,)),
                _linear(f"{a}q_proj.weight", (*L, "attn", "wq"), (N * H, D), (D, N, H)),
                _linear(f"{a}k_proj.weight", (*L, "attn", "wk"), (K * H, D), (D, K, H)),
                _linear(f"{a}v_proj.weight", (*L, "attn", "wv"), (K * H, D), (D, K, H)),
                _linear(f"{a}o_proj.weight", (*L, "attn", "wo"), (D, N * H), (N, H, D)),
                _linear(f"{m}gate_proj.weight", (*L, "mlp", "w_gate"), (F, D), (D, F)),
                _linear(f"{m}up_proj.weight", (*L, "mlp", "w_up"), (F, D), (D, F)),
                _linear(f"{m}down_proj.weight", (*L, "mlp", "w_down"), (D, F), (F, D)),
            ]
            if arch.qkv_bias:
                out += [_reshaped(f"{a}q_proj.bias", (*L, "attn", "bq"), (N * H,), (N, H)),
                        _reshaped(f"{a}k_proj.bias", (*L, "attn", "bk"), (K * H,), (K, H)),
                        _reshaped(f"{a}v_proj.bias", (*L, "attn", "bv"), (K * H,), (K, H))]
            if arch.o_bias:
                out.append(_same(f"{a}o_proj.bias", (*L, "attn", "bo"), (D,)))
            if arch.mlp_bias:
                out += [_same(f"{m}gate_proj.bias", (*L, "mlp", "b_gate"), (F,)),
                        _same(f"{m}up_proj.bias", (*L, "mlp", "b_up"), (F,)),
                        _same(f"{m}down_proj.bias", (*L, "mlp", "b_down"), (D,))]
        out.append(_same(P + "norm.weight", ("ln_f", "scale"), (D,)))
    if not arch.tied:
        out.append(_linear("lm_head.weight", ("lm_head",), (V, D), (D, V)))
    return out


def _ignorable(arch: _Arch, name: str) -> bool:
    """Non-parameter tensors some checkpoints carry: causal-mask and RoPE-frequency buffers."""
    if arch.family == "gpt2":
        return name.endswith((".attn.bias", ".attn.masked_bias")) and ".c_" not in name
    return name.endswith("rotary_emb.inv_freq")


def _flat_specs(cfg: ModelConfig) -> dict[PathT, ParamSpec]:
    flat, _ = jax.tree_util.tree_flatten_with_path(param_specs(cfg), is_leaf=_is_spec)
    return {_path(kp): spec for kp, spec in flat}


def _is_spec(x: Any) -> bool:
    return isinstance(x, ParamSpec)


def _path(keypath: Any) -> PathT:
    return tuple(getattr(k, "key", getattr(k, "idx", None)) for k in keypath)


def _unflatten(cfg: ModelConfig, leaves: dict[PathT, Any]) -> Params:
    flat, treedef = jax.tree_util.tree_flatten_with_path(param_specs(cfg), is_leaf=_is_spec)
    return jax.tree_util.tree_unflatten(treedef, [leaves[_path(kp)] for kp, _ in flat])


def _iter_leaves(params: Params) -> Iterator[tuple[PathT, Any]]:
    for kp, x in jax.tree_util.tree_flatten_with_path(params)[0]:
        yield _path(kp), x
