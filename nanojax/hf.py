"""Hugging Face interop: GPT-2 and Llama-family checkpoints in and out, with the same logits.

    cfg, params = nj.load_hf("path/to/hf_dir")              # config.json + *.safetensors
    nj.save_hf(params, cfg, "out_dir", tokenizer=tok)        # AutoModelForCausalLM loads it

Supported: GPT2LMHeadModel, LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM. The last two
are Llama with a switch: Mistral is Llama (its sliding window must be inactive: nanojax has no
sliding-window attention), Qwen2 is Llama with biases on q, k and v only.

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

Loading reads one tensor at a time (safetensors, never pickle), converts it on the host to the
requested dtype and places it on the default device before reading the next, so the host never
holds more than one tensor of the checkpoint at a time.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import ml_dtypes
import numpy as np

from nanojax.config import DTYPES, ModelConfig
from nanojax.model import Params, ParamSpec, param_specs
from nanojax.outdir import check_target, replace_dir

SUPPORTED = ("GPT2LMHeadModel", "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
_MODEL_TYPES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM",
                "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
_NP_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
_TOKENIZER_AUX = ("tokenizer_config.json", "special_tokens_map.json")
_CONVERT_FIX = (
    "Convert it to safetensors with transformers, in a trusted environment: "
    "`AutoModelForCausalLM.from_pretrained(d).save_pretrained(d, safe_serialization=True)`."
)

Path_ = str | Path


class HFFormatError(ValueError):
    """A Hugging Face directory nanojax cannot map exactly (config, tensors or format)."""


# ----------------------------------------------------------------------------------------------
# Architecture: which HF class, and which of its optional tensors exist.


@dataclasses.dataclass(frozen=True)
class _Arch:
    hf_class: str  # e.g. "LlamaForCausalLM"
    family: str  # "gpt2" or "llama": the tensor names and layouts
    qkv_bias: bool  # q/k/v projections carry biases
    o_bias: bool  # the attention output projection carries a bias
    mlp_bias: bool  # the MLP projections carry biases
    tied: bool  # lm_head is the token embedding

    @property
    def prefix(self) -> str:  # base-model prefix of every name but lm_head
        return "transformer." if self.family == "gpt2" else "model."


def _get(hf: dict[str, Any], key: str, default: Any = None, *, required: bool = False) -> Any:
    if key in hf and hf[key] is not None:
        return hf[key]
    if required:
        raise HFFormatError(f"config.json has no {key!r}; it is required for {hf.get('architectures')}.")
    return default


def _architecture(hf: dict[str, Any]) -> str:
    archs = hf.get("architectures") or []
    name = archs[0] if archs else _MODEL_TYPES.get(hf.get("model_type", ""), hf.get("model_type"))
    if name not in SUPPORTED:
        raise HFFormatError(
            f"unsupported architecture {name!r} (config.json architectures={archs}, "
            f"model_type={hf.get('model_type')!r}); nanojax maps exactly these: {', '.join(SUPPORTED)}. "
            "Other models need their own mapping in nanojax/hf.py."
        )
    return name


def _rope_theta(hf: dict[str, Any]) -> float:
    """RoPE base from `rope_parameters` (transformers >= 5) or `rope_theta` + `rope_scaling` (4.x)."""
    rp = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if rp and not ("rope_type" in rp or "type" in rp or "rope_theta" in rp):
        raise HFFormatError(
            f"rope_parameters={rp!r} are per layer type; nanojax has one RoPE for all layers."
        )
    kind = rp.get("rope_type", rp.get("type", "default"))
    if kind not in (None, "default"):
        raise HFFormatError(
            f"rope scaling {kind!r} ({rp}) is not supported: nanojax implements plain RoPE only. "
            "Expected rope_scaling/rope_parameters to be null or of type 'default'."
        )
    partial = rp.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise HFFormatError(f"partial_rotary_factor={partial}: nanojax rotates the whole head (1.0).")
    return float(rp.get("rope_theta") or hf.get("rope_theta") or 10000.0)


def _check_sliding_window(hf: dict[str, Any], name: str, max_pos: int, n_layer: int) -> None:
    """Refuses a sliding window that changes attention (window < context on some layer)."""
    window = hf.get("sliding_window")
    if name == "Qwen2ForCausalLM":
        if not hf.get("use_sliding_window", False):
            return
        types = hf.get("layer_types") or [
            "sliding_attention" if i >= hf.get("max_window_layers", 28) else "full_attention"
            for i in range(n_layer)
        ]
        if "sliding_attention" not in types:
            return
    elif name != "MistralForCausalLM":
        return
    # HF's mask keeps key s for query t when s > t - window: a window >= the context never bites.
    if window is not None and window < max_pos:
        raise HFFormatError(
            f"{name} has an active sliding window (sliding_window={window} < "
            f"max_position_embeddings={max_pos}); nanojax has no sliding-window attention, so its "
            "logits would differ past the window. Expected sliding_window null or >= "
            "max_position_embeddings (or use_sliding_window false for Qwen2)."
        )


def _config_from_hf(hf: dict[str, Any], dtype: str | None = None) -> tuple[ModelConfig, _Arch]:
    """ModelConfig for an HF config.json dict, refusing what nanojax cannot compute exactly.

    dtype: param and compute dtype ("float32", "bfloat16", "float16"); None takes the checkpoint's
    `dtype`/`torch_dtype`, else float32.
    """
    name = _architecture(hf)
    if dtype is None:
        dtype = hf.get("dtype") or hf.get("torch_dtype") or "float32"
        dtype = dtype if dtype in DTYPES else "float32"
    if dtype not in DTYPES:
        raise HFFormatError(f"dtype={dtype!r}; expected one of {tuple(DTYPES)}.")
    V = _get(hf, "vocab_size", required=True)
    common = dict(dtype=dtype, param_dtype=dtype, dropout=0.0, vocab_size=V)

    if name == "GPT2LMHeadModel":
        act = hf.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh"):
            raise HFFormatError(
                f"GPT-2 activation_function={act!r}; nanojax's GELU MLP is the tanh approximation, so "
                "only 'gelu_new' or 'gelu_pytorch_tanh' give the same logits."
            )
        bad = [k for k, want in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                                 ("add_cross_attention", False)) if hf.get(k, want) != want]
        if bad:
            raise HFFormatError(
                f"GPT-2 config sets {', '.join(f'{k}={hf[k]}' for k in bad)}; nanojax's attention is "
                "scaled by 1/sqrt(head_dim) in every layer, with no cross-attention. Expected "
                "scale_attn_weights=true, scale_attn_by_inverse_layer_idx=false, add_cross_attention=false."
            )
        # reorder_and_upcast_attn only changes the precision of the scores; nanojax already
        # computes them and the softmax in float32, so it is accepted.
        D = _get(hf, "n_embd", required=True)
        tied = bool(hf.get("tie_word_embeddings", True))
        cfg = ModelConfig(
            **common, n_layer=_get(hf, "n_layer", required=True), n_head=_get(hf, "n_head", required=True),
            d_model=D, d_ff=_get(hf, "n_inner"), max_seq_len=_get(hf, "n_positions", 1024),
            pos_emb="learned", norm="layernorm", mlp="gelu", bias=True, qkv_bias=None,
            tie_embeddings=tied, norm_eps=float(_get(hf, "layer_norm_epsilon", 1e-5)),
        )
        return cfg, _Arch(name, "gpt2", True, True, True, tied)

    act = hf.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise HFFormatError(f"{name} hidden_act={act!r}; nanojax's SwiGLU MLP uses 'silu'.")
    if name == "LlamaForCausalLM":
        attn_bias, mlp_bias = bool(hf.get("attention_bias", False)), bool(hf.get("mlp_bias", False))
        if attn_bias != mlp_bias:
            raise HFFormatError(
                f"LlamaForCausalLM with attention_bias={attn_bias}, mlp_bias={mlp_bias} cannot be "
                "represented: nanojax's `bias` switch puts biases on the attention output (o_proj) and "
                "the MLP together (and `qkv_bias` on q/k/v). Expected both false, or both true."
            )
        qkv_bias = o_bias = mlp_b = attn_bias
    elif name == "Qwen2ForCausalLM":
        qkv_bias, o_bias, mlp_b = True, False, False
    else:  # Mistral
        qkv_bias = o_bias = mlp_b = False
    D = _get(hf, "hidden_size", required=True)
    N = _get(hf, "num_attention_heads", required=True)
    L = _get(hf, "num_hidden_layers", required=True)
    H = _get(hf, "head_dim", D // N)
    max_pos = _get(hf, "max_position_embeddings", required=True)
    _check_sliding_window(hf, name, max_pos, L)
    tied = bool(hf.get("tie_word_embeddings", False))
    cfg = ModelConfig(
        **common, n_layer=L, n_head=N, d_model=D, n_kv_head=_get(hf, "num_key_value_heads", N),
        head_dim=None if N * H == D else H, d_ff=_get(hf, "intermediate_size", required=True),
        max_seq_len=max_pos, pos_emb="rope", rope_theta=_rope_theta(hf), norm="rmsnorm",
        norm_eps=float(_get(hf, "rms_norm_eps", 1e-6)), mlp="swiglu", bias=o_bias,
        qkv_bias=qkv_bias if qkv_bias != o_bias else None, tie_embeddings=tied,
    )
    return cfg, _Arch(name, "llama", qkv_bias, o_bias, mlp_b, tied)


def _arch_for(cfg: ModelConfig) -> _Arch:
    """The HF class that expresses `cfg`, or an error naming the switches that none can."""
    switches = (cfg.pos_emb, cfg.norm, cfg.mlp)
    if switches == ("learned", "layernorm", "gelu"):
        bad = []
        if cfg.kv_heads != cfg.n_head:
            bad.append(f"n_kv_head={cfg.n_kv_head} (GPT-2 has no grouped-query attention)")
        if cfg.resolved_head_dim * cfg.n_head != cfg.d_model:
            bad.append(f"head_dim={cfg.head_dim} (GPT-2 needs n_head * head_dim == d_model)")
        if bad:
            raise HFFormatError(f"GPT2LMHeadModel cannot express {'; '.join(bad)}.")
        # HF GPT-2 always has every bias; absent nanojax biases are written as zeros (exact).
        return _Arch("GPT2LMHeadModel", "gpt2", True, True, True, cfg.tie_embeddings)
    if switches == ("rope", "rmsnorm", "swiglu"):
        if cfg.use_qkv_bias and not cfg.bias:
            return _Arch("Qwen2ForCausalLM", "llama", True, False, False, cfg.tie_embeddings)
        # Llama's attention_bias covers q, k, v and o: absent q/k/v biases are written as zeros.
        return _Arch("LlamaForCausalLM", "llama", cfg.bias, cfg.bias, cfg.bias, cfg.tie_embeddings)
    raise HFFormatError(
        f"no Hugging Face class matches pos_emb={cfg.pos_emb!r}, norm={cfg.norm!r}, mlp={cfg.mlp!r}. "
        "Expected the GPT-2 family (pos_emb='learned', norm='layernorm', mlp='gelu') or the Llama "
        "family (pos_emb='rope', norm='rmsnorm', mlp='swiglu')."
    )


def _config_to_hf(cfg: ModelConfig, arch: _Arch, dtype: str) -> dict[str, Any]:
    """The config.json dict for `cfg` (transformers 5 names, plus the 4.x aliases it still reads)."""
    common = {"architectures": [arch.hf_class], "vocab_size": cfg.vocab_size,
              "tie_word_embeddings": cfg.tie_embeddings, "dtype": dtype, "torch_dtype": dtype,
              "bos_token_id": None, "eos_token_id": None, "pad_token_id": None, "use_cache": True}
    if arch.family == "gpt2":
        return {**common, "model_type": "gpt2", "n_embd": cfg.d_model, "n_layer": cfg.n_layer,
                "n_head": cfg.n_head, "n_inner": cfg.d_ff, "n_positions": cfg.max_seq_len,
                "activation_function": "gelu_new", "layer_norm_epsilon": cfg.norm_eps,
                "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": 0.0,
                "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
                "reorder_and_upcast_attn": False, "initializer_range": cfg.init_std}
    out = {**common, "model_type": "qwen2" if arch.hf_class == "Qwen2ForCausalLM" else "llama",
           "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layer,
           "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.kv_heads,
           "head_dim": cfg.resolved_head_dim, "intermediate_size": cfg.ff_dim, "hidden_act": "silu",
           "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
           "rope_theta": cfg.rope_theta, "rope_scaling": None,
           "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
           "attention_dropout": 0.0, "initializer_range": cfg.init_std}
    if arch.hf_class == "Qwen2ForCausalLM":
        out.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.n_layer,
                   layer_types=["full_attention"] * cfg.n_layer)
    else:
        out.update(attention_bias=arch.o_bias, mlp_bias=arch.mlp_bias)
    return out


# ----------------------------------------------------------------------------------------------
# Tensor layout: every HF tensor, its shape, and the nanojax leaves it fills.

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


# ----------------------------------------------------------------------------------------------
# Reading safetensors: one tensor at a time, bf16 included.


class _SafetensorsReader:
    """Tensor name -> array over a single or sharded safetensors checkpoint, read lazily.

    numpy has no bfloat16, so safetensors' numpy framework cannot return BF16 tensors; those are
    read straight from the file (memory-mapped) and viewed as ml_dtypes.bfloat16.
    """

    def __init__(self, directory: Path):
        single, index = directory / "model.safetensors", directory / "model.safetensors.index.json"
        if single.exists():
            files = {single}
            self.where: dict[str, Path] = {}
        elif index.exists():
            weight_map = _read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise HFFormatError(f"{index} has no \"weight_map\" object (tensor name -> shard "
                                    "file); the index is damaged. Download or save the model again.")
            self.where = {k: directory / f for k, f in weight_map.items()}
            files = set(self.where.values())
            missing = sorted(str(f.name) for f in files if not f.exists())
            if missing:
                raise HFFormatError(f"{index} names shard file(s) that are not there: {missing}.")
        else:
            pickles = sorted(p.name for pat in ("pytorch_model*.bin", "*.pt", "*.pth")
                             for p in directory.glob(pat))
            if pickles:
                raise HFFormatError(
                    f"{directory} has only PyTorch pickle weights ({', '.join(pickles)}), no "
                    "model.safetensors. nanojax does not load pickles: unpickling runs arbitrary code "
                    f"from the file. {_CONVERT_FIX}"
                )
            raise HFFormatError(
                f"no weights in {directory}: expected model.safetensors or model.safetensors.index.json."
            )
        from safetensors import safe_open

        self._handles = {}
        for f in sorted(files):
            try:
                self._handles[f] = safe_open(str(f), framework="numpy")
            except Exception as e:  # SafetensorError names no file
                raise HFFormatError(
                    f"{f} is not a readable safetensors file ({e}; {f.stat().st_size:,} bytes): it is "
                    "truncated or damaged, e.g. by an interrupted download. Download or save it again."
                ) from None
        if not self.where:
            self.where = {k: single for k in self._handles[single].keys()}
        self._headers: dict[Path, tuple[int, dict]] = {}

    def names(self) -> list[str]:
        return list(self.where)

    def dtype_shape(self, name: str) -> tuple[str, tuple[int, ...]]:
        sl = self._handles[self.where[name]].get_slice(name)
        return sl.get_dtype(), tuple(sl.get_shape())

    def read(self, name: str) -> np.ndarray:
        path = self.where[name]
        dtype, shape = self.dtype_shape(name)
        if dtype != "BF16":
            return self._handles[path].get_tensor(name)
        if path not in self._headers:
            with open(path, "rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                self._headers[path] = (8 + n, json.loads(fh.read(n)))
        base, header = self._headers[path]
        start, end = header[name]["data_offsets"]
        raw = np.memmap(path, dtype=np.uint8, mode="r", offset=base + start, shape=(end - start,))
        return np.array(raw.view(ml_dtypes.bfloat16).reshape(shape))  # a copy: the file stays unmapped


# ----------------------------------------------------------------------------------------------
# Public API.


def _read_hf_config(path: Path_) -> dict[str, Any]:
    """The config.json of an HF model directory, as a dict."""
    path = Path(path)
    cfg_path = path / "config.json"
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a directory; expected a Hugging Face model directory.")
    if not cfg_path.exists():
        raise FileNotFoundError(
            f"{cfg_path} not found: {path} is not a Hugging Face model directory (it needs config.json "
            "next to model.safetensors). Save the model with transformers' save_pretrained()."
        )
    return _read_json(cfg_path)


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON object from `path`; a malformed file is named with the line and column."""
    try:
        out = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise HFFormatError(f"{path} is not UTF-8 text (byte offset {e.start}); expected JSON.") from None
    except json.JSONDecodeError as e:
        raise HFFormatError(
            f"{path} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}. The file is "
            "damaged or truncated; download or save the model again.") from None
    if not isinstance(out, dict):
        raise HFFormatError(f"{path} holds a JSON {type(out).__name__}; expected an object {{...}}.")
    return out


def load_hf(path: Path_, dtype: str | None = None) -> tuple[ModelConfig, Params]:
    """(ModelConfig, params) from a Hugging Face model directory.

    Reads config.json and model.safetensors (or a sharded model.safetensors.index.json). Each
    tensor is converted on the host to `dtype` and placed on the default device before the next
    is read. The returned config has `dtype` and `param_dtype` both set to `dtype` (None: the
    checkpoint's own dtype from config.json, else float32) and dropout 0.

    Returns params shaped like `nj.init_params(cfg, key)`: e.g. wq (D, N, H), wte (V, D).
    Raises HFFormatError for anything that cannot be mapped exactly (naming what and why).
    """
    path = Path(path)
    hf = _read_hf_config(path)
    cfg, arch = _config_from_hf(hf, dtype)
    reader = _SafetensorsReader(path)
    layout = _layout(cfg, arch)
    expected = {e.name: e for e in layout}

    found: dict[str, str] = {}  # layout name -> name in the file
    extra = []
    for name in reader.names():
        if name in expected:
            found[name] = name
        elif arch.prefix + name in expected:  # saved from the base model, without the prefix
            found[arch.prefix + name] = name
        elif _ignorable(arch, name) or (name == "lm_head.weight" and arch.tied):
            continue  # buffers, or a tied head written out anyway (transformers ignores it too)
        else:
            extra.append(name)
    missing = [n for n in expected if n not in found]
    where = f"{path} ({arch.hf_class}, {cfg.n_layer} layers, tie_word_embeddings={arch.tied})"
    if missing:
        raise HFFormatError(
            f"{len(missing)} tensor(s) missing from {where}: {_few(missing)}. The weights do not match "
            "config.json; check that both come from the same model."
        )
    if extra:
        raise HFFormatError(
            f"{len(extra)} unexpected tensor(s) in {where}: {_few(extra)}. nanojax would silently drop "
            "them; the weights do not match config.json (e.g. a bias or layer count it does not declare)."
        )
    for e in layout:
        _, shape = reader.dtype_shape(found[e.name])
        if shape != e.shape:
            raise HFFormatError(
                f"tensor {found[e.name]!r} in {path} has shape {list(shape)}; expected {list(e.shape)} "
                f"from config.json. The weights do not match config.json."
            )

    specs = _flat_specs(cfg)
    target = _NP_DTYPES[cfg.param_dtype]
    leaves: dict[PathT, jax.Array] = {}
    for e in layout:  # one tensor on the host at a time
        parts = e.to_nj(reader.read(found[e.name]))
        for p, x in zip(e.paths, parts, strict=True):
            assert x.shape == specs[p].shape, (p, x.shape, specs[p].shape)
            leaves[p] = jax.device_put(np.ascontiguousarray(x, dtype=target))
    assert set(leaves) == set(specs), set(specs) ^ set(leaves)
    return cfg, _unflatten(cfg, leaves)


def _few(names: list[str], n: int = 8) -> str:
    return ", ".join(names[:n]) + (f", ... ({len(names) - n} more)" if len(names) > n else "")


def _unflatten(cfg: ModelConfig, leaves: dict[PathT, Any]) -> Params:
    flat, treedef = jax.tree_util.tree_flatten_with_path(param_specs(cfg), is_leaf=_is_spec)
    return jax.tree_util.tree_unflatten(treedef, [leaves[_path(kp)] for kp, _ in flat])


def _iter_leaves(params: Params) -> Iterator[tuple[PathT, Any]]:
    for kp, x in jax.tree_util.tree_flatten_with_path(params)[0]:
        yield _path(kp), x


def save_hf(params: Params, cfg: ModelConfig, path: Path_, tokenizer: Any = None, *,
            overwrite: bool = False) -> Path:
    """Writes `params` as a Hugging Face model directory that transformers loads with the same logits.

    Files: model.safetensors (tensors in `cfg.param_dtype`), config.json (GPT2LMHeadModel for the
    GPT-2 switches; LlamaForCausalLM, or Qwen2ForCausalLM for q/k/v-only biases, for the Llama
    switches), and tokenizer.json when `tokenizer` is given: an HFTokenizer, a CharTokenizer
    (written as a character-level WordLevel tokenizer.json), or a path to a tokenizer.json or a
    directory holding one. A tied head is not written (transformers ties it on load). Biases HF
    needs but `cfg` lacks (e.g. GPT-2 with bias=False) are written as zeros, which is exact.

    `path` must be absent or empty unless `overwrite`; then it is replaced whole (nothing of the
    old directory, e.g. a generation_config.json, survives) once the new files are complete.
    Returns the directory.
    """
    from safetensors.numpy import save_file

    arch = _arch_for(cfg)
    target = Path(path)
    check_target(target, overwrite=overwrite)  # refuse before converting any tensor
    specs = _flat_specs(cfg)
    given = dict(_iter_leaves(params))
    missing, extra = sorted(set(specs) - set(given), key=str), sorted(set(given) - set(specs), key=str)
    if missing or extra:
        raise HFFormatError(
            f"params do not match the config: missing {_few([_fmt(p) for p in missing])}; unexpected "
            f"{_few([_fmt(p) for p in extra])}. Expected the tree of nj.init_params(cfg, key)."
        )
    for p, spec in specs.items():
        if tuple(given[p].shape) != spec.shape:
            raise HFFormatError(f"param {_fmt(p)} has shape {list(given[p].shape)}; expected "
                                f"{list(spec.shape)} from the config.")
    dt = _NP_DTYPES[cfg.param_dtype]
    tensors = {}
    for e in _layout(cfg, arch):
        xs = [np.asarray(jax.device_get(given[p])) if p in given else np.zeros(s, dt)
              for p, s in zip(e.paths, e.nj_shapes, strict=True)]
        tensors[e.name] = np.ascontiguousarray(e.to_hf(xs), dtype=dt)
    with replace_dir(target, overwrite=overwrite) as out:
        save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
        hf_cfg = _config_to_hf(cfg, arch, cfg.param_dtype)
        if tokenizer is not None:
            eos = _copy_tokenizer(tokenizer, out)
            if eos is not None:
                hf_cfg.update(bos_token_id=eos, eos_token_id=eos)
        (out / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")
    return target


def _fmt(p: PathT) -> str:
    return "/".join(str(k) for k in p)


def _copy_tokenizer(tokenizer: Any, out: Path) -> int | None:
    """Writes tokenizer.json (+ a tokenizer_config.json) to `out`; returns the <|endoftext|> id if any."""
    from nanojax.tokenizer import CHAR_FILE, HF_FILE, CharTokenizer, HFTokenizer, load_tokenizer

    copied = False
    if isinstance(tokenizer, str | Path):
        src = Path(tokenizer)
        if src.is_dir() and (src / HF_FILE).exists():
            src = src / HF_FILE
        if src.is_file() and src.name != CHAR_FILE:  # a tokenizer.json: copy it and its HF companions
            if src.resolve() != (out / HF_FILE).resolve():
                shutil.copyfile(src, out / HF_FILE)
                for aux in _TOKENIZER_AUX:
                    if (src.parent / aux).exists():
                        shutil.copyfile(src.parent / aux, out / aux)
            tokenizer, copied = HFTokenizer.from_file(out / HF_FILE), True
        else:
            tokenizer = load_tokenizer(src)  # a char tokenizer; names what it expected if neither
    if isinstance(tokenizer, CharTokenizer):
        tokenizer = HFTokenizer(_char_to_tokenizers(tokenizer.chars))
    if not isinstance(tokenizer, HFTokenizer):
        raise TypeError(f"tokenizer: expected an HFTokenizer, CharTokenizer or path; got {type(tokenizer)}")
    if not copied:
        tokenizer.save(out)
    if not (out / "tokenizer_config.json").exists():  # lets AutoTokenizer.from_pretrained(out) load it
        (out / "tokenizer_config.json").write_text(
            json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}, indent=2) + "\n")
    return tokenizer.token_id("<|endoftext|>")


def _char_to_tokenizers(chars: str) -> Any:
    """A `tokenizers` Tokenizer with one token per character, in the CharTokenizer's id order."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({c: i for i, c in enumerate(chars)}, unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # every char
    tok.decoder = decoders.Fuse()  # join tokens without spaces
    return tok


# ----------------------------------------------------------------------------------------------
# Workdir conversion (scripts/convert.py).

# The optimizer state saved with imported params. Orbax refuses an empty tree, and an imported
# model has no optimizer state, so the checkpoint holds this one-scalar placeholder instead.
IMPORTED_OPT_STATE = {"imported_from_hf": np.zeros((), np.int32)}


def hf_to_workdir(hf_dir: Path_, workdir: Path_, dtype: str | None = None,
                  tokenizer: Path_ | None = None, *, overwrite: bool = False) -> Path:
    """Imports an HF model directory as a nanojax workdir that `nj.load_checkpoint` reads.

    Writes config.json ({"model": cfg.to_dict(), "train": {}}), tokenizer.json (from `tokenizer`
    or hf_dir) and an orbax checkpoint at step 0 holding the params and IMPORTED_OPT_STATE (a
    placeholder: there is no optimizer state to import). Refuses a workdir that is not empty
    unless `overwrite` (then it is replaced whole once the import is complete), and an HF dir
    without tokenizer.json (load_checkpoint needs one).
    """
    from nanojax.checkpoint import Checkpointer
    from nanojax.tokenizer import HF_FILE, HFTokenizer

    hf_dir, workdir = Path(hf_dir), Path(workdir)
    _config_from_hf(_read_hf_config(hf_dir), dtype)  # a bad config is named before anything else
    if not overwrite and ((workdir / "config.json").exists() or (workdir / "checkpoints").exists()):
        raise FileExistsError(f"{workdir} already holds a run (config.json or checkpoints/); nothing "
                              "was changed. Choose a new --workdir, or pass --overwrite to replace it.")
    tok_file = Path(tokenizer) if tokenizer else hf_dir / HF_FILE
    if tok_file.is_dir():
        tok_file = tok_file / HF_FILE
    if not tok_file.exists():
        raise FileNotFoundError(
            f"{tok_file} not found: a nanojax workdir needs a tokenizer.json for sampling. Write one "
            "with transformers (`AutoTokenizer.from_pretrained(d).save_pretrained(d)` saves "
            "tokenizer.json for fast tokenizers), or pass tokenizer=PATH (--tokenizer)."
        )
    HFTokenizer.from_file(tok_file)  # fail now, not at sampling time, if it does not parse
    check_target(workdir, overwrite=overwrite, inputs=(hf_dir, tok_file))
    cfg, params = load_hf(hf_dir, dtype)
    with replace_dir(workdir, overwrite=overwrite, inputs=(hf_dir, tok_file)) as out:
        shutil.copyfile(tok_file, out / HF_FILE)
        ckpt = Checkpointer(out / "checkpoints", save_every=1)
        ckpt.save(0, params, IMPORTED_OPT_STATE, force=True)
        ckpt.close()
        (out / "config.json").write_text(json.dumps({"model": cfg.to_dict(), "train": {}}, indent=2))
    return workdir


def workdir_to_hf(workdir: Path_, out_dir: Path_, step: int | None = None, *,
                  overwrite: bool = False) -> Path:
    """Exports a nanojax workdir's checkpoint (latest step by default) and tokenizer as an HF dir.
    out_dir must be absent or empty unless `overwrite` (see save_hf)."""
    from nanojax.checkpoint import load_checkpoint

    check_target(out_dir, overwrite=overwrite, inputs=(workdir,))  # before restoring anything
    cfg, params, tok = load_checkpoint(workdir, step)
    return save_hf(params, cfg, out_dir, tokenizer=tok, overwrite=overwrite)
