"""GPU-only checks: cuDNN attention against the XLA path, nanojax's Pallas kernels compiled for
the GPU, device memory stats, the MFU peak table, and GPU numbers against the CPU's for the same
model.

They skip on a machine without a GPU, with the reason printed (`-ra`). On a GPU machine run them
in one call with `JAX_PLATFORMS=cuda,cpu python -m pytest -m gpu tests/test_gpu.py` (CUDA) or
`JAX_PLATFORMS=rocm,cpu ...` (ROCm; the cuDNN checks skip there). The CPU backend must stay
enabled: the GPU results are compared with the CPU's.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nanojax as nj
from nanojax import metrics
from nanojax.attention import _xla_attention, attention


def _gpu() -> jax.Device | None:
    try:
        return jax.devices("gpu")[0]
    except RuntimeError:
        return None


GPU = _gpu()
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        GPU is None,
        reason="no GPU backend: run `JAX_PLATFORMS=cuda,cpu python -m pytest -m gpu tests/test_gpu.py` "
        "on a GPU machine (scripts/bench_gpu.sh does, with the GPU benchmarks)",
    ),
]


def _is_nvidia() -> bool:
    version = getattr(GPU.client, "platform_version", "") or ""
    return "rocm" not in version.lower()


def _qkv(key, B=2, T=256, N=8, K=2, H=64, dtype=jnp.bfloat16):
    kq, kk, kv = jax.random.split(key, 3)
    q = jax.random.normal(kq, (B, T, N, H), jnp.float32)
    k = jax.random.normal(kk, (B, T, K, H), jnp.float32)
    v = jax.random.normal(kv, (B, T, K, H), jnp.float32)
    return [jax.device_put(a.astype(dtype), GPU) for a in (q, k, v)]


def _reference_attention(q, k, v) -> np.ndarray:
    """Causal GQA attention in float64 numpy, written out from the definition."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    B, T, N, H = q.shape
    G = N // k.shape[2]
    k = np.repeat(k, G, axis=2)
    v = np.repeat(v, G, axis=2)
    s = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(H)
    s = np.where(np.tril(np.ones((T, T), bool)), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bnts,bsnh->btnh", p, v)


def test_cudnn_attention_matches_xla_and_the_definition():
    """cuDNN flash attention (bf16, GQA, causal) equals the XLA path and a float64 reference to
    bf16 rounding, forward and gradients; `auto` picks cuDNN on NVIDIA."""
    if not _is_nvidia():
        pytest.skip("cuDNN attention is NVIDIA-only; this GPU is ROCm")
    q, k, v = _qkv(jax.random.key(0))
    ref = _reference_attention(q, k, v)
    out_cudnn = jax.jit(lambda q, k, v: attention(q, k, v, impl="cudnn"))(q, k, v)
    out_xla = jax.jit(lambda q, k, v: attention(q, k, v, impl="xla"))(q, k, v)
    for out in (out_cudnn, out_xla):
        np.testing.assert_allclose(np.asarray(out, np.float64), ref, atol=3e-2, rtol=3e-2)
    np.testing.assert_allclose(np.asarray(out_cudnn, np.float32), np.asarray(out_xla, np.float32),
                               atol=3e-2, rtol=3e-2)

    def loss(impl):
        return lambda q, k, v: (attention(q, k, v, impl=impl).astype(jnp.float32) ** 2).sum()

    g_cudnn = jax.jit(jax.grad(loss("cudnn"), argnums=(0, 1, 2)))(q, k, v)
    g_xla = jax.jit(jax.grad(loss("xla"), argnums=(0, 1, 2)))(q, k, v)
    for a, b in zip(g_cudnn, g_xla, strict=True):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        assert np.abs(a - b).max() <= 0.05 * np.abs(b).max() + 1e-2

    hlo = jax.jit(lambda q, k, v: attention(q, k, v, impl="auto")).lower(q, k, v).compile().as_text()
    assert "cudnn" in hlo.lower(), "attn_impl='auto' did not pick the cuDNN kernel on an NVIDIA GPU"
    hlo_xla = jax.jit(lambda q, k, v: _xla_attention(q, k, v, None)).lower(q, k, v).compile().as_text()
    assert "__cudnn$fmha" not in hlo_xla


@pytest.mark.parametrize("T,H", [(256, 64), (200, 80)], ids=["T256-H64", "T200-H80-padded"])
def test_pallas_flash_attention_compiles_and_matches_on_the_gpu(T, H):
    """nanojax's FlashAttention kernels through Pallas' Triton lowering (CUDA or ROCm; no
    interpret mode): bf16 GQA causal forward against the float64 definition, gradients against
    the XLA path; a length off the block grid and a head dim padded to a power of two."""
    from nanojax.kernels import backend

    assert not backend.interpret_default(), "the kernels would run interpreted on this GPU machine"
    q, k, v = _qkv(jax.random.key(1), T=T, H=H)
    out = jax.jit(lambda q, k, v: attention(q, k, v, impl="pallas"))(q, k, v)
    ref = _reference_attention(q, k, v)
    np.testing.assert_allclose(np.asarray(out, np.float64), ref, atol=3e-2, rtol=3e-2)

    def loss(impl):
        return lambda q, k, v: (attention(q, k, v, impl=impl).astype(jnp.float32) ** 2).sum()

    g_pallas = jax.jit(jax.grad(loss("pallas"), argnums=(0, 1, 2)))(q, k, v)
    g_xla = jax.jit(jax.grad(loss("xla"), argnums=(0, 1, 2)))(q, k, v)
    for a, b in zip(g_pallas, g_xla, strict=True):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        assert np.abs(a - b).max() <= 0.05 * np.abs(b).max() + 1e-2


def test_pallas_decode_attention_matches_on_the_gpu():
    """The split-K decode kernel compiled for the GPU, ragged rows, against the default decode."""
    from nanojax.infer.engine import _decode_attention
    from nanojax.kernels import decode_attention

    B, N, K, W, H = 3, 8, 2, 512, 64
    ks = jax.random.split(jax.random.key(2), 3)
    q = jax.device_put(jax.random.normal(ks[0], (B, 1, N, H), jnp.bfloat16), GPU)
    kc = jax.device_put(jax.random.normal(ks[1], (B * K, W, H), jnp.bfloat16), GPU)
    vc = jax.device_put(jax.random.normal(ks[2], (B * K, W, H), jnp.bfloat16), GPU)
    pad, slot = jnp.array([0, 7, 300]), jnp.int32(450)
    ref = jax.jit(_decode_attention)(q, kc, vc, slot, pad)[:, 0]
    out = jax.jit(lambda q, kc, vc, lengths, starts: decode_attention(
        q, kc.reshape(B, K, W, H), vc.reshape(B, K, W, H), lengths, starts=starts))(
        q[:, 0], kc, vc, jnp.full((B,), slot + 1), pad)
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), atol=3e-2, rtol=3e-2)


def test_memory_stats_see_an_allocation():
    """metrics.memory_stats reports bytes in use on a GPU, and a 1 GiB array moves it by ~1 GiB."""
    before = metrics.memory_stats(GPU)
    assert "mem_in_use_gib" in before and "mem_peak_gib" in before
    x = jax.device_put(jnp.zeros((2**28,), jnp.float32), GPU)  # 1 GiB
    x.block_until_ready()
    after = metrics.memory_stats(GPU)
    assert 0.9 <= after["mem_in_use_gib"] - before["mem_in_use_gib"] <= 1.2
    assert after["mem_peak_gib"] >= after["mem_in_use_gib"]
    del x


def test_mfu_peak_is_the_device_table_and_a_matmul_stays_under_it():
    """The device kind is found in the peak table (no None), and a large bf16 matmul timed here
    reaches 30-100% of that peak: a table entry off by 2x or more in either direction fails."""
    peak = metrics.device_peak_flops("bfloat16", GPU)
    assert peak is not None, f"no peak-FLOPs entry matches device kind {GPU.device_kind!r}"
    n = 8192
    a = jax.device_put(jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16), GPU)
    mm = jax.jit(lambda a: a @ a)
    mm(a).block_until_ready()
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(10):
            out = mm(a)
        out.block_until_ready()
        times.append((time.perf_counter() - t0) / 10)
    achieved = 2 * n**3 / min(times)
    assert 0.3 * peak <= achieved <= 1.0 * peak, (achieved / 1e12, peak / 1e12)
    cfg = nj.ModelConfig.preset("gpt2-small").replace(dtype="bfloat16")
    expected = metrics.flops_per_token(cfg, 1024) * 1000.0 / peak
    assert metrics.mfu(1000.0, cfg, 1024, device=GPU) == pytest.approx(expected, rel=1e-6)


def _tiny(family: str) -> nj.ModelConfig:
    preset = "llama-tiny" if family == "llama" else "shakespeare-char-cpu"
    return nj.ModelConfig.preset(preset)


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_forward_loss_and_grads_on_gpu_match_the_cpu(family):
    """fp32 logits and the gradient of the loss agree between the GPU and the CPU backends."""
    from nanojax.train import loss_fn

    cfg = _tiny(family)
    cpu = jax.devices("cpu")[0]
    params = nj.init_params(cfg, jax.random.key(0))
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 33), dtype=np.int32)
    x, y = tokens[:, :-1], tokens[:, 1:]

    def run(device):
        p, xd, yd = jax.device_put((params, x, y), device)
        logits = jax.jit(lambda p, x: nj.forward(p, x, cfg))(p, xd)
        grads = jax.jit(jax.grad(lambda p, x, y: loss_fn(p, x, y, cfg)))(p, xd, yd)
        return np.asarray(logits), jax.tree.map(np.asarray, grads)

    logits_cpu, grads_cpu = run(cpu)
    logits_gpu, grads_gpu = run(GPU)
    # TF32 may be used by default for fp32 GPU matmuls: a tolerance it meets, far below a bug.
    np.testing.assert_allclose(logits_gpu, logits_cpu, atol=2e-2, rtol=2e-2)
    for g_gpu, g_cpu in zip(jax.tree.leaves(grads_gpu), jax.tree.leaves(grads_cpu), strict=True):
        assert np.abs(g_gpu - g_cpu).max() <= 0.02 * np.abs(g_cpu).max() + 1e-6


def test_greedy_generate_on_gpu_matches_the_cpu():
    """Greedy tokens of the compiled decode loop are the same on the GPU as on the CPU."""
    cfg = _tiny("llama")
    params = nj.init_params(cfg, jax.random.key(3))
    prompts = [[1, 2, 3, 4, 5], [7, 8]]
    with jax.default_device(jax.devices("cpu")[0]):
        out_cpu = nj.generate(jax.device_put(params, jax.devices("cpu")[0]), cfg, prompts,
                              max_new_tokens=16, temperature=0.0)
    with jax.default_device(GPU):
        out_gpu = nj.generate(jax.device_put(params, GPU), cfg, prompts, max_new_tokens=16,
                              temperature=0.0)
    assert out_gpu == out_cpu


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("M", [1, 8])
def test_quantized_matmul_makes_no_full_width_weight_copy(bits, M):
    """On GPU the pure-JAX dequantize-then-dot of a quantized record is fused: XLA's compiled
    temp memory stays far below one bf16 copy of the weight (4096 x 4096 x 2 bytes = 32 MiB), and
    no HLO instruction outside a fusion produces a (4096, 4096) float array. The numbers match
    the dequantized weight's product."""
    from nanojax.dense import dense
    from nanojax.quant import quantize_matrix

    I = O = 4096
    w = (0.02 * np.random.default_rng(0).standard_normal((I, O))).astype(np.float32)
    rec = jax.device_put(quantize_matrix(w, bits, 32 if bits == 4 else None, jnp.bfloat16), GPU)
    x = jax.device_put(jnp.asarray(np.random.default_rng(1).standard_normal((M, I)), jnp.bfloat16), GPU)
    f = jax.jit(lambda x, r: dense(x, r, jnp.bfloat16))
    compiled = f.lower(x, rec).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    full = I * O * 2
    hlo = compiled.as_text()
    entry = hlo[hlo.index("ENTRY"):]  # top-level instructions: a fusion's insides are not listed here
    assert temp < full // 8, f"temp {temp:,} bytes vs a full bf16 copy {full:,}:\n{entry[:3000]}"
    assert "bf16[4096,4096]" not in entry and "f32[4096,4096]" not in entry, entry[:3000]
    got = np.asarray(f(x, rec), np.float32)
    want = np.asarray(x, np.float32) @ np.asarray(rec.dequantize(jnp.float32))
    np.testing.assert_allclose(got, want, atol=0.05 * np.abs(want).max(), rtol=0)
