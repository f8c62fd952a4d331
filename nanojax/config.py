"""ModelConfig: every shape and switch of the transformer, frozen and hashable.

GPT-2 and Llama are two settings of the same fields, not two models:

    GPT-2: learned positions, LayerNorm, GELU MLP, biases, tied embeddings.
    Llama: RoPE, RMSNorm, SwiGLU MLP, grouped-query attention, untied head, no biases.

Because the config is hashable it can be a static argument of `jax.jit`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import jax.numpy as jnp

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# Gradient-checkpointing policies, each a jax.checkpoint_policies policy applied per block
# (nanojax.model.remat_policy): none, full (nothing saved), dots (matmul outputs saved),
# dots_no_batch (matmuls without batch dims saved: the dense layers, not attention's scores),
# names (only the tensors the block names with checkpoint_name: attention and MLP outputs).
REMAT = ("none", "full", "dots", "dots_no_batch", "names")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and architecture of a decoder-only transformer.

    Units: sizes are element counts; `max_seq_len` is in tokens.
    """

    vocab_size: int = 50257  # V: rows of the token embedding
    n_layer: int = 12  # L: transformer blocks
    n_head: int = 12  # N: query heads
    d_model: int = 768  # D: residual stream width
    n_kv_head: int | None = None  # K: key/value heads (GQA); None means K = N (plain multi-head)
    head_dim: int | None = None  # H: None means D // N; set it when N * H != D (e.g. some Qwen/Gemma)
    d_ff: int | None = None  # F: MLP hidden width; None means 4 * D (GELU) or Llama's 8/3 * D rounded
    max_seq_len: int = 1024  # context length; learned position table size
    pos_emb: Literal["learned", "rope"] = "learned"  # GPT-2 learns positions; Llama rotates q/k
    rope_theta: float = 10000.0  # RoPE base; Llama-3 uses 500000 for longer contexts
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    norm_eps: float = 1e-5
    mlp: Literal["gelu", "swiglu"] = "gelu"
    bias: bool = True  # biases on every dense layer and LayerNorm (GPT-2); Llama has none
    qkv_bias: bool | None = None  # None follows `bias`; Qwen2 has q/k/v biases but no others
    tie_embeddings: bool = True  # lm_head = wte.T (GPT-2); Llama-2 keeps a separate head
    dropout: float = 0.0  # on attention output, MLP output and embeddings, training only
    dtype: str = "float32"  # compute dtype of activations and matmuls
    param_dtype: str = "float32"  # storage dtype of params (optimizer moments follow it)
    scan_layers: bool = False  # stack layers inside the jit and lax.scan them (deep models, compile time)
    # Which activations each block keeps for the backward pass; the rest are recomputed (REMAT).
    # "none" keeps all; "full" keeps only the block's input. Old configs' true/false mean full/none.
    remat: str = "none"
    # auto: cuDNN where it runs, else XLA; "pallas": nanojax's FlashAttention kernels (attention.py)
    attn_impl: Literal["auto", "xla", "cudnn", "pallas"] = "auto"
    init_std: float = 0.02  # normal init of weights; residual projections are scaled by 1/sqrt(2L)
    # std of the learned position table's init: 0.01 in OpenAI's GPT-2 code, 0.02 in nanoGPT
    pos_init_std: float = 0.01

    def __post_init__(self) -> None:
        if isinstance(self.remat, bool):  # config.json files written before remat took a policy name
            object.__setattr__(self, "remat", "full" if self.remat else "none")
        errors = []
        for name in ("vocab_size", "n_layer", "n_head", "d_model", "max_seq_len"):
            if getattr(self, name) <= 0:
                errors.append(f"{name} must be positive, got {getattr(self, name)}")
        if self.n_head > 0 and self.n_kv_head is not None and (
            self.n_kv_head <= 0 or self.n_head % self.n_kv_head
        ):
            errors.append(f"n_kv_head={self.n_kv_head} must divide n_head={self.n_head}")
        if self.head_dim is None and self.n_head > 0 and self.d_model % self.n_head:
            errors.append(
                f"d_model={self.d_model} is not divisible by n_head={self.n_head}; set head_dim"
            )
        if self.pos_emb == "rope" and self.resolved_head_dim % 2:
            errors.append(f"RoPE needs an even head_dim, got {self.resolved_head_dim}")
        for name, allowed in (
            ("pos_emb", ("learned", "rope")),
            ("norm", ("layernorm", "rmsnorm")),
            ("mlp", ("gelu", "swiglu")),
            ("attn_impl", ("auto", "xla", "cudnn", "pallas")),
            ("remat", REMAT),
        ):
            if getattr(self, name) not in allowed:
                errors.append(f"{name}={getattr(self, name)!r}; expected one of {allowed}")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in DTYPES:
                errors.append(f"{name}={getattr(self, name)!r}; expected one of {tuple(DTYPES)}")
        if not 0.0 <= self.dropout < 1.0:
            errors.append(f"dropout must be in [0, 1), got {self.dropout}")
        if errors:
            raise ValueError("Invalid ModelConfig: " + "; ".join(errors))

    # Resolved sizes: the None defaults above, made concrete.
    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.d_model // self.n_head

    @property
    def ff_dim(self) -> int:
        if self.d_ff:
            return self.d_ff
        if self.mlp == "swiglu":  # Llama: 2/3 of 4D, rounded up to a multiple of 256
            return 256 * ((8 * self.d_model // 3 + 255) // 256)
        return 4 * self.d_model

    @property
    def use_qkv_bias(self) -> bool:
        return self.bias if self.qkv_bias is None else self.qkv_bias

    @property
    def compute_dtype(self) -> Any:
        return DTYPES[self.dtype]

    @property
    def weight_dtype(self) -> Any:
        return DTYPES[self.param_dtype]

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Builds a config from a dict, naming any key that is not a field."""
        d = dict(d)
        preset = d.pop("preset", None)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(
                f"Unknown ModelConfig field(s) {unknown}. Known fields: {sorted(known)}."
            )
        if preset:
            return cls.preset(preset, **d)
        return cls(**d)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> ModelConfig:
        """A named shape, e.g. `ModelConfig.preset("gpt2-small", dropout=0.1)`."""
        if name not in PRESETS:
            raise ValueError(f"Unknown preset {name!r}; choose one of {sorted(PRESETS)}.")
        return cls(**{**PRESETS[name], **overrides})

    def num_params(self, include_embeddings: bool = True) -> int:
        """Parameter count. Without embeddings it is the N of the 6N FLOPs rule (Kaplan 2020)."""
        D, H, F, L = self.d_model, self.resolved_head_dim, self.ff_dim, self.n_layer
        N, K, V = self.n_head, self.kv_heads, self.vocab_size
        norm = D * (2 if self.norm == "layernorm" and self.bias else 1)
        attn = D * N * H + 2 * D * K * H + N * H * D
        if self.use_qkv_bias:
            attn += N * H + 2 * K * H
        if self.bias:
            attn += D
        mlp = (3 if self.mlp == "swiglu" else 2) * D * F
        if self.bias:
            mlp += F * (2 if self.mlp == "swiglu" else 1) + D
        total = L * (attn + mlp + 2 * norm) + norm
        if include_embeddings:
            total += V * D
            if self.pos_emb == "learned":
                total += self.max_seq_len * D
            if not self.tie_embeddings:
                total += D * V
        elif not self.tie_embeddings:
            total += D * V  # an untied head is a real matmul and counts in the 6N compute
        return total


_GPT2 = dict(vocab_size=50257, max_seq_len=1024, pos_emb="learned", norm="layernorm", mlp="gelu",
             bias=True, tie_embeddings=True)
_LLAMA = dict(pos_emb="rope", norm="rmsnorm", mlp="swiglu", bias=False, tie_embeddings=False,
              norm_eps=1e-5)

PRESETS: dict[str, dict[str, Any]] = {
    "gpt2-small": dict(_GPT2, n_layer=12, n_head=12, d_model=768),
    "gpt2-medium": dict(_GPT2, n_layer=24, n_head=16, d_model=1024),
    "gpt2-large": dict(_GPT2, n_layer=36, n_head=20, d_model=1280),
    "gpt2-xl": dict(_GPT2, n_layer=48, n_head=25, d_model=1600),
    # nanoGPT's CPU quickstart shape (vocab: the 65 characters of Tiny Shakespeare).
    "shakespeare-char-cpu": dict(_GPT2, vocab_size=65, n_layer=4, n_head=4, d_model=128,
                                 max_seq_len=64, bias=False, dropout=0.0),
    "shakespeare-char": dict(_GPT2, vocab_size=65, n_layer=6, n_head=6, d_model=384,
                             max_seq_len=256, bias=False, dropout=0.2),
    # A tiny Llama for tests and CPU experiments: GQA 4 query heads over 2 kv heads.
    "llama-tiny": dict(_LLAMA, vocab_size=512, n_layer=2, n_head=4, n_kv_head=2, d_model=64,
                       d_ff=176, max_seq_len=256),
    # ~134M Llama shape used by the CPU decode benchmark (DESIGN.md performance notes).
    "llama-134m": dict(_LLAMA, vocab_size=32000, n_layer=12, n_head=12, d_model=768, d_ff=2048,
                       max_seq_len=2048),
    "llama2-7b": dict(_LLAMA, vocab_size=32000, n_layer=32, n_head=32, d_model=4096, d_ff=11008,
                      max_seq_len=4096),
}
