"""Pallas kernels behind nanojax.attention: FlashAttention-2 forward/backward for training and
prefill, and split-K decode attention over a ragged KV cache. On CPU they run in Pallas
interpret mode (for the tests); see backend.py for what is decided per backend."""

from nanojax.kernels.decode_attention import decode_attention
from nanojax.kernels.flash_attention import flash_attention

__all__ = ["decode_attention", "flash_attention"]
