"""Pallas kernels behind nanojax.attention: FlashAttention-2 forward/backward for training and
prefill, and split-K decode attention over a ragged KV cache. On CPU they run in Pallas
interpret mode (for the tests); see backend.py for what is decided per backend.

The CPU training step's C++ kernels (nanojax/quant/csrc) have their Python sides here too:
cpu_attention (causal attention), cpu_norm (LayerNorm / RMSNorm) and cpu_gemm (the products)."""

from nanojax.kernels.decode_attention import decode_attention
from nanojax.kernels.flash_attention import flash_attention

__all__ = ["decode_attention", "flash_attention"]
