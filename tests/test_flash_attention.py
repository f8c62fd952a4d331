"""The Pallas attention kernels (nanojax/kernels/), run in Pallas interpret mode on CPU.

Oracles: the XLA reference attention (nanojax.attention._xla_attention, itself checked against
HF in test_hf/test_generate) for the forward and its autodiff gradients; a numpy float64
softmax for the decode kernel; the default decode path's greedy tokens; the XLA run's losses.
Shapes are small and blocks smaller still, so every length spans several blocks and ends
inside one (interpret mode walks the grid in a loop).
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import nanojax as nj
from nanojax.attention import _xla_attention, attention
from nanojax.kernels import decode_attention, flash_attention
from nanojax.train.step import loss_fn

REPO = Path(__file__).resolve().parent.parent

# (B, T, S, N, K, H, causal, dtype, block_q, block_k): GQA and MQA, lengths that are not a
# multiple of either block, causal queries aligned to the end of longer keys, and head dims
# of the presets (16 llama-tiny, 64 GPT-2 / llama-134m, 128 llama2-7b). Each case costs ~5 s
# of XLA:CPU compile (interpret mode), so the cases are few and each covers several things.
CASES = {
    "gqa-odd-causal-f32": (2, 37, 37, 4, 2, 16, True, jnp.float32, 8, 16),
    "mqa-T<S-causal-f32": (1, 20, 45, 3, 1, 64, True, jnp.float32, 16, 8),
    "gqa-full-bf16": (1, 33, 27, 4, 2, 128, False, jnp.bfloat16, 16, 8),
}
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}


def _qkv_do(B, T, S, N, K, H, dtype, seed=0):
    ks = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(ks[0], (B, T, N, H), jnp.float32)
    k = jax.random.normal(ks[1], (B, S, K, H), jnp.float32)
    v = jax.random.normal(ks[2], (B, S, K, H), jnp.float32)
    do = jax.random.normal(ks[3], (B, T, N, H), jnp.float32)
    return [x.astype(dtype) for x in (q, k, v, do)]


def _reference(q, k, v, causal):
    """The XLA path in float32 (on the same, possibly bf16-rounded, inputs)."""
    q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    mask = None if causal else jnp.ones((1, q.shape[1], k.shape[1]), bool)
    return _xla_attention(q, k, v, mask)


@pytest.mark.parametrize("case", list(CASES))
def test_forward_and_gradients_match_the_reference(case):
    B, T, S, N, K, H, causal, dtype, bq, bk = CASES[case]
    q, k, v, do = _qkv_do(B, T, S, N, K, H, dtype)

    @jax.jit
    def flash_and_grads(q, k, v, do):  # one compile: forward and backward kernels together
        out, vjp = jax.vjp(lambda q, k, v: flash_attention(q, k, v, causal=causal, block_q=bq,
                                                           block_k=bk), q, k, v)
        return out, vjp(do)

    out, grads = flash_and_grads(q, k, v, do)
    ref, ref_vjp = jax.vjp(lambda q, k, v: _reference(q, k, v, causal), q, k, v)
    assert out.dtype == dtype and out.shape == (B, T, N, H)
    tol = TOL[dtype]
    np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=tol, rtol=tol)
    ref_grads = ref_vjp(do.astype(jnp.float32))
    for name, g, r in zip("qkv", grads, ref_grads, strict=True):
        assert g.dtype == dtype and g.shape == r.shape, name
        # fp32: 1e-5 absolute; bf16: 2e-2 of the gradient's largest entry (bf16 keeps ~3 digits).
        atol = tol if dtype == jnp.float32 else tol * max(1.0, float(jnp.abs(r).max()))
        np.testing.assert_allclose(np.asarray(g, np.float32), r, atol=atol, rtol=tol, err_msg=f"d{name}")


def test_gpu_tile_padding_is_exact(monkeypatch):
    """The GPU wrappers' padding for Triton (head dim 80 -> 128, a group of 3 query heads -> 16
    rows, blocks >= 16), switched on here and run in interpret mode: results unchanged. (The
    backward kernels see the same padded arrays as the forward; their gradients are sliced by
    autodiff of the pad.)"""
    from nanojax.kernels import backend

    monkeypatch.setattr(backend, "pads_tiles", lambda: True)
    B, T, N, K, H = 1, 37, 3, 1, 80
    q, k, v, _ = _qkv_do(B, T, T, N, K, H, jnp.float32)
    out = jax.jit(flash_attention)(q, k, v)
    np.testing.assert_allclose(out, _reference(q, k, v, True), atol=1e-5, rtol=1e-5)
    lengths, starts = np.array([37]), np.array([4])
    dec = decode_attention(q[:, -1], k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), jnp.asarray(lengths),
                           starts=jnp.asarray(starts), interpret=True)
    ref = _decode_reference(q[:, -1], k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), starts, lengths)
    np.testing.assert_allclose(dec, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("platform", ["cuda", "rocm"])
def test_kernels_lower_through_triton_for_cuda_and_rocm(platform, monkeypatch):
    """Without a GPU: with the GPU tile choices on, jax lowers every kernel (forward, both
    backward kernels, decode) for CUDA and ROCm to Triton calls. This runs Pallas' Triton
    lowering (op support, block shapes); Triton's own compile to GPU code needs the GPU."""
    from nanojax.kernels import backend

    monkeypatch.setattr(backend, "interpret_default", lambda: False)
    B, T, N, K, H = 1, 1000, 8, 2, 80  # T off the 128 x 64 grid, head dim padded to 128
    q = jax.ShapeDtypeStruct((B, T, N, H), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((B, T, K, H), jnp.bfloat16)

    def fwd_bwd(q, k, v):
        o, vjp = jax.vjp(flash_attention, q, k, v)
        return vjp(o)

    def lowered(f, *args):
        return jax.jit(f).trace(*args).lower(lowering_platforms=(platform,)).as_text()

    hlo = lowered(fwd_bwd, q, kv, kv)
    calls = re.findall(r'custom_call @(\S+)\(', hlo)
    assert calls == ["__gpu$xla.gpu.triton"] * 3, calls
    names = set(re.findall(r'name = "(\w+)"', hlo))
    assert {"flash_attention_fwd", "flash_attention_dkv", "flash_attention_dq"} <= names
    cache = jax.ShapeDtypeStruct((B, K, 512, H), jnp.bfloat16)
    rows = jax.ShapeDtypeStruct((B,), jnp.int32)
    q1 = jax.ShapeDtypeStruct((B, N, H), jnp.bfloat16)
    hlo = lowered(lambda q, k, v, n: decode_attention(q, k, v, n), q1, cache, cache, rows)
    assert re.findall(r'custom_call @(\S+)\(', hlo) == ["__gpu$xla.gpu.triton"]


def _big_square_shapes(hlo: str, T: int) -> list[str]:
    """Tensor types in a StableHLO text with two dimensions both >= T: a (T, S) score matrix."""
    found = []
    for m in re.finditer(r"tensor<((?:\d+x)+)[a-z]+\d*>", hlo):
        dims = [int(d) for d in m.group(1).rstrip("x").split("x")]
        if sum(d >= T for d in dims) >= 2:
            found.append(m.group(0))
    return found


def test_no_t_by_t_array_in_the_lowered_program():
    """Forward and backward of the kernel path build nothing of size T x T (T = 512, eight blocks
    of 64); the same check on the XLA path finds its (T, T) scores, so the check can fail."""
    B, T, N, K, H = 1, 512, 2, 1, 16
    q, k, v, _ = _qkv_do(B, T, T, N, K, H, jnp.float32)

    def lowered(impl):
        loss = lambda q, k, v: (attention(q, k, v, impl=impl) ** 2).sum()  # noqa: E731
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).lower(q, k, v).as_text()

    pallas_hlo = lowered("pallas")
    assert "stablehlo.while" in pallas_hlo  # the interpreted kernels' grid loops: not the XLA path
    assert _big_square_shapes(pallas_hlo, T) == []
    assert _big_square_shapes(lowered("xla"), T), "the check missed the XLA path's (T, T) scores"


# ----------------------------------------------------------------------------------------------
# Decode attention.


def _decode_reference(q, kc, vc, starts, lengths):
    """numpy float64: row b's query heads over its slots [starts[b], lengths[b])."""
    q, kc, vc = (np.asarray(x, np.float64) for x in (q, kc, vc))
    B, N, H = q.shape
    K = kc.shape[1]
    out = np.zeros((B, N, H))
    for b in range(B):
        for n in range(N):
            keys = kc[b, n // (N // K), starts[b]:lengths[b]]
            vals = vc[b, n // (N // K), starts[b]:lengths[b]]
            s = keys @ q[b, n] / np.sqrt(H)
            p = np.exp(s - s.max())
            out[b, n] = (p / p.sum()) @ vals
    return out


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_decode_kernel_matches_the_reference_on_ragged_rows(dtype):
    """Rows of very different fill (one slot, a split boundary, the whole cache, a late start),
    GQA, several splits of several blocks: some splits of a row are empty, some partly filled."""
    B, N, K, S, H = 4, 6, 2, 80, 16
    ks = jax.random.split(jax.random.key(1), 3)
    q = jax.random.normal(ks[0], (B, N, H)).astype(dtype)
    kc = jax.random.normal(ks[1], (B, K, S, H)).astype(dtype)
    vc = jax.random.normal(ks[2], (B, K, S, H)).astype(dtype)
    starts = np.array([0, 3, 0, 50], np.int32)
    lengths = np.array([1, 27, 80, 61], np.int32)
    out = jax.jit(lambda *a: decode_attention(*a[:4], starts=a[4], block_k=8, num_splits=3))(
        q, kc, vc, jnp.asarray(lengths), jnp.asarray(starts))
    assert out.shape == (B, N, H) and out.dtype == dtype
    ref = _decode_reference(q.astype(jnp.float32), kc.astype(jnp.float32), vc.astype(jnp.float32),
                            starts, lengths)
    tol = TOL[dtype]
    np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=tol, rtol=tol)


TINY = nj.ModelConfig.preset("llama-tiny", vocab_size=97, max_seq_len=160, init_std=0.2)


def test_greedy_generate_with_pallas_decode_equals_the_default():
    """The compiled decode loop through the Pallas decode kernel: same greedy tokens on a ragged
    batch (pads of 1..7 slots, 50 tokens filling a 64-slot cache) and the same logits to 1e-5."""
    params = nj.init_params(TINY, jax.random.key(0))
    prompts = [[5, 17, 3, 9, 44, 2, 71], [8], [30, 31, 32, 33, 34]]
    kw = dict(max_new_tokens=50, return_logits=True)
    ref, ref_logits = nj.generate(params, TINY, prompts, **kw)
    out, logits = nj.generate(params, TINY.replace(attn_impl="pallas"), prompts, **kw)
    assert out == ref
    for a, b in zip(logits, ref_logits, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# Training through the kernels, and the entry point's checks.


def test_training_with_pallas_tracks_the_xla_losses():
    """Six Adam steps of a one-layer GQA Llama at T = 80 (two 64-row blocks, the second padded):
    the kernel run's losses equal the XLA run's to 1e-5, and the loss goes down."""
    cfg = TINY.replace(vocab_size=61, max_seq_len=80, n_layer=1)
    tokens = jax.random.randint(jax.random.key(3), (6, 2, 81), 0, 61)
    opt = optax.adam(1e-2)

    def run(impl):
        c = cfg.replace(attn_impl=impl)

        @jax.jit
        def step(params, state, batch):
            loss, grads = jax.value_and_grad(loss_fn)(params, batch[:, :-1], batch[:, 1:], c)
            updates, state = opt.update(grads, state, params)
            return optax.apply_updates(params, updates), state, loss

        params = nj.init_params(c, jax.random.key(0))
        state, losses = opt.init(params), []
        for batch in tokens:
            params, state, loss = step(params, state, batch)
            losses.append(float(loss))
        return np.array(losses)

    xla, pallas = run("xla"), run("pallas")
    np.testing.assert_allclose(pallas, xla, atol=1e-5, rtol=1e-5)
    assert xla[-1] < xla[0] - 0.1


def test_bad_inputs_are_refused_with_the_fix():
    q = jnp.zeros((1, 8, 2, 16))
    with pytest.raises(ValueError, match="no explicit mask"):
        attention(q, q, q, mask=jnp.ones((1, 8, 8), bool), impl="pallas")
    with pytest.raises(ValueError, match="expected one of"):
        attention(q, q, q, impl="flash")
    with pytest.raises(ValueError, match="kv heads"):
        flash_attention(q, jnp.zeros((1, 8, 3, 16)), jnp.zeros((1, 8, 3, 16)))
    with pytest.raises(ValueError, match="S >= T"):
        flash_attention(q, q[:, :4], q[:, :4])
    with pytest.raises(ValueError, match="one float dtype"):
        flash_attention(q, q.astype(jnp.bfloat16), q)
    with pytest.raises(ValueError, match="lengths and starts"):
        decode_attention(q[:, 0], jnp.zeros((1, 2, 8, 16)), jnp.zeros((1, 2, 8, 16)), jnp.zeros((2,), int))
    cfg = nj.ModelConfig(vocab_size=11, n_layer=1, n_head=2, d_model=16, attn_impl="pallas")
    assert nj.ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="attn_impl='triton'"):
        cfg.replace(attn_impl="triton")


def test_bench_attention_runs_on_cpu():
    """scripts/bench_attention.py end to end at a tiny shape: the XLA path timed forward and
    forward + backward, the interpreted kernels skipped past --pallas_cpu_max_len (their timing
    is the same `measure` call; timing them here would add a kernel compile), cuDNN unavailable."""
    cmd = [sys.executable, str(REPO / "scripts/bench_attention.py"), "--seq_lens=32", "--tokens=64",
           "--heads=2", "--head_dim=16", "--repeats=1", "--pallas_cpu_max_len=16", "--impls=xla,pallas,cudnn"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stderr[-2000:]
    cell = r"[\d.]+ / [\d.e+-]+ / [\d.]+"
    for row in ("fwd", "fwd\\+bwd"):
        pattern = rf"\| 32 \| {row} \| {cell} \| skipped \(interpret mode\) \| n/a"
        assert re.search(pattern, p.stdout), p.stdout
