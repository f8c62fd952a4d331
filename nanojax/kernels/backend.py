"""Where the Pallas kernels run, and with which tile sizes: decided here, once, from the backend.

- CPU: Pallas has no CPU compiler, so the kernels run in *interpret mode*: the kernel body is
  traced as ordinary JAX ops and XLA:CPU runs it grid step by grid step. That is for checking
  correctness (the tests), not for speed; `attn_impl="auto"` never picks it on CPU.
- GPU (CUDA or ROCm): Pallas lowers the kernels through Triton, chosen by passing Triton
  compiler params (`compiler_params`; without them jax >= 0.10 picks Mosaic GPU on CUDA, which
  these kernels do not target, and ROCm has only Triton). Triton wants power-of-two tile
  shapes of at least 16 along every matmul dimension, so the wrappers pad the head dim and the
  decode kernel's query-head group up to that (padding with zeros changes no result).
"""

from __future__ import annotations

from typing import Any

import jax
from jax.experimental.pallas import triton as pltriton


def backend() -> str:
    """"cpu", "gpu" or "tpu": the platform the kernels will run on (JAX's default backend)."""
    return jax.default_backend()


def interpret_default() -> bool:
    """True where Pallas must interpret the kernels (no kernel compiler for this backend)."""
    return backend() == "cpu"


def pads_tiles() -> bool:
    """Whether the wrappers pad tiles to Triton's rules (powers of two, >= 16): on GPUs. A
    function of its own so a CPU test can switch it on and check the padding in interpret mode."""
    return not interpret_default()


def min_tile() -> int:
    """Smallest matmul tile side the lowering accepts: Triton's tl.dot needs >= 16; the
    interpreter takes anything, so CPU tests can use tiny blocks and short sequences."""
    return 16 if pads_tiles() else 1


def flash_blocks(head_dim: int) -> tuple[int, int]:
    """Default (block_q, block_k) of the flash attention kernels for this backend.

    GPU: 128 x 64 query x key tiles for head_dim <= 128 (the FlashAttention-2 paper's choice
    for A100/H100-class SRAM, Sec. 3.3; a 128 x 128 fp32 score tile plus the output
    accumulator would spill registers at 4-8 warps), 64 x 64 above that. CPU (interpret mode):
    64 x 64, which keeps the interpreted loops short; speed there is not the point.
    """
    if interpret_default():
        return 64, 64
    return (128, 64) if head_dim <= 128 else (64, 64)


def decode_blocks() -> tuple[int, int]:
    """Default (block_k, num_splits) of the decode kernel: keys per inner step, and how many
    programs share one sequence's cache (split-K, so a long cache keeps the GPU busy at batch 1)."""
    if interpret_default():
        return 64, 2
    return 64, 8


def compiler_params(head_dim: int, *, decode: bool = False) -> Any:
    """Pallas compiler params selecting the Triton lowering (GPUs; interpret mode ignores them).
    4 warps for decode and small heads, 8 for head_dim > 64 (more threads to hold the wider
    accumulator tile); 2 pipeline stages (double-buffered K/V loads)."""
    warps = 4 if decode or head_dim <= 64 else 8
    return pltriton.CompilerParams(num_warps=warps, num_stages=2)
