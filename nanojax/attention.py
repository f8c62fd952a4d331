"""Attention behind one function: a portable XLA path, cuDNN flash attention where it runs, and
nanojax's own FlashAttention-2 Pallas kernels (nanojax/kernels/, docs/attention.md).

Which path "auto" takes, per backend, and why (measured-fastest correct path):
- CPU, float32 causal self-attention (no mask, T == S) on one device with AVX-512: nanojax's C++
  kernel (nanojax.kernels.cpu_attention; ~2x XLA's fwd+bwd, docs/attention.md), unless switched off
  (NANOJAX_TRAIN_ATTN_KERNEL=0 or `cpu_attention.train_attention_kernel(False)`).
- Other CPU cases: XLA. The Pallas kernels run there only in interpret mode, which checks them but
  is slow (2-5x the XLA path's time in docs/attention.md's CPU table), so auto never picks them.
- NVIDIA GPU, bf16/fp16: cuDNN's fused kernel. The Pallas kernel's GPU numbers are not yet
  measured (docs/attention.md); until they beat cuDNN there, "pallas" is opt-in.
- Anything else (ROCm, fp32 on GPU): XLA; "pallas" is opt-in through Pallas' Triton lowering.

Shapes (JAX scaling-book letters): B batch, T query length, S key length, N query heads,
K kv heads (N % K == 0; G = N // K queries share one kv head), H head dim.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from nanojax.kernels import flash_attention

IMPLS = ("auto", "xla", "cudnn", "pallas")


@functools.cache
def _cudnn_available() -> bool:
    """cuDNN attention needs an NVIDIA GPU backend (not ROCm, not CPU)."""
    try:
        dev = jax.devices()[0]
    except RuntimeError:
        return False
    if dev.platform != "gpu":
        return False
    version = getattr(dev.client, "platform_version", "") or ""
    return "rocm" not in version.lower()


def _use_cudnn(impl: str, q: jax.Array, mask: jax.Array | None) -> bool:
    if impl == "xla":
        return False
    ok = (
        _cudnn_available()
        and q.dtype in (jnp.bfloat16, jnp.float16)
        and mask is None
        and q.shape[-1] % 8 == 0
        and q.shape[-1] <= 128
    )
    if impl == "cudnn" and not ok:
        raise ValueError(
            "attn_impl='cudnn' needs an NVIDIA GPU, bf16/fp16 compute, head_dim a multiple of 8 "
            "and <= 128, and no explicit mask; use attn_impl='auto' to fall back to XLA."
        )
    return ok


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    mask: jax.Array | None = None,
    impl: str = "auto",
) -> jax.Array:
    """Scaled dot-product attention.

    Args:
      q: (B, T, N, H) queries. k, v: (B, S, K, H) keys and values.
      mask: optional bool (B, T, S), True where query t may attend to key s. None means causal
        with the queries aligned to the end of the keys (query t sees keys s <= t + S - T).
      impl: "auto" (cuDNN or the CPU kernel where they run, else XLA; module docstring), "xla",
        "cudnn", or "pallas" (nanojax.kernels.flash_attention; causal only, no explicit mask).
    Returns:
      (B, T, N, H) in q's dtype. Softmax is computed in float32.
    """
    if impl not in IMPLS:
        raise ValueError(f"attention impl={impl!r}; expected one of {IMPLS}")
    if impl == "pallas":
        if mask is not None:
            raise ValueError("attention impl='pallas' is causal only and takes no explicit mask (the "
                             "FlashAttention kernel masks by position); pass impl='xla' for a custom mask")
        return flash_attention(q, k, v, causal=True)
    if _use_cudnn(impl, q, mask):
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
    if impl == "auto" and mask is None and use_cpu_kernel(q, k, v):
        from nanojax.kernels import cpu_attention

        if q.dtype == jnp.float32:
            return cpu_attention.causal_attention(q, k, v)
        # bf16 compute: the kernel is fp32 inside (as XLA's softmax is); the casts are cheap next to
        # XLA's bf16 attention (docs/performance/training.md, "Training GEMMs on MKL": bf16)
        f32 = [t.astype(jnp.float32) for t in (q, k, v)]
        return cpu_attention.causal_attention(*f32).astype(q.dtype)
    return _xla_attention(q, k, v, mask)


def use_cpu_kernel(q: jax.Array, k: jax.Array, v: jax.Array) -> bool:
    """Whether impl="auto" with no mask runs the CPU training kernel (nanojax.kernels.cpu_attention).

    Yes for q (B, T, N, H), k, v (B, T, K, H) float32 (or bfloat16, run in fp32) with T == S and K
    dividing N, the CPU backend
    with the kernels built and AVX-512 for H, not under a sharded trace (nanojax.sharding's
    activation constraint) and q, k, v on one device: the custom call sees each array whole, so it
    cannot run on a sharded operand (dense.py's fp32 kernel has the same conditions). Inside
    jax.shard_map (train/manual.py) the arrays are the local shards, which it may take.
    """
    from nanojax.dense import whole_on_one_device
    from nanojax.kernels import cpu_attention

    if q.ndim != 4 or k.ndim != 4 or k.shape != v.shape:
        return False
    B, T, N, H = q.shape
    return (k.shape[:2] == (B, T) and k.shape[3] == H and N % k.shape[2] == 0 and T > 0
            and q.dtype == k.dtype == v.dtype and q.dtype in (jnp.float32, jnp.bfloat16)
            and whole_on_one_device(q, k, v) and cpu_attention.enabled(H))


def _xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None) -> jax.Array:
    # Heads-first and 4-D: the G query heads sharing a kv head are stacked along the query axis,
    # (B, K, G*T, H), so GQA is a reshape rather than a repeat of k and v, and plain multi-head
    # (G = 1) pays no extra unit axis (on XLA:CPU a 5-D layout cost extra transposing copies).
    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    G = N // K
    q = q.reshape(B, T, K, G, H).transpose(0, 2, 3, 1, 4).reshape(B, K, G * T, H)
    k = k.transpose(0, 2, 1, 3)  # (B, K, S, H)
    v = v.transpose(0, 2, 1, 3)  # (B, K, S, H)
    scores = jnp.einsum("bkqh,bksh->bkqs", q, k, preferred_element_type=jnp.float32)
    scores = scores * (H**-0.5)
    if mask is None:
        mask = jnp.tril(jnp.ones((T, S), dtype=bool), k=S - T)[None]  # (1, T, S)
    mask = jnp.broadcast_to(mask[:, None], (mask.shape[0], G, T, S)).reshape(-1, 1, G * T, S)
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkqs,bksh->bkqh", probs, v)  # (B, K, G*T, H)
    return out.reshape(B, K, G, T, H).transpose(0, 3, 1, 2, 4).reshape(B, T, N, H)
