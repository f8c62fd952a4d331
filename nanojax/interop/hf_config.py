"""Hugging Face config.json <-> ModelConfig: which HF class a config is, and which it can become.

`_config_from_hf` reads an HF config dict into a ModelConfig plus an `_Arch` (the HF class and
which optional tensors it carries), refusing what nanojax cannot compute exactly; `_arch_for`
and `_config_to_hf` go the other way. Also here, as the module the other interop modules build
on: HFFormatError (the error they all raise) and the JSON reader for config.json and the index.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from nanojax.config import DTYPES, ModelConfig

SUPPORTED = ("GPT2LMHeadModel", "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
_MODEL_TYPES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM",
                "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}

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
            "Other models need their own mapping in nanojax/interop/ (hf_config.py and layout.py)."
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
# Reading config.json (and other JSON files of an HF directory).


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
