"""The CPU training attention kernel (nanojax/quant/csrc/fattn.cc, nanojax.kernels.cpu_attention):
forward, logsumexp and gradients against a float64 numpy oracle and XLA's path, on both ISA paths,
grouped-query heads, a length that is no multiple of the kernel's blocks, head sizes 32 and 64;
the vectorised exp's error; where impl="auto" takes it and where it must not; jit, vmap, remat and
scan over layers; and one training loss and gradient equal to XLA's attention path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_kernel_step_equals_xla
from conftest import fresh_hlo as hlo

import nanojax as nj
from nanojax import attention as attn_mod
from nanojax.kernels import cpu_attention as ca
from nanojax.model import ACTIVATION_CONSTRAINT

FWD, BWD = "nanojax_causal_attention_fwd", "nanojax_causal_attention_bwd"


def oracle(q, k, v, dout):
    """float64 causal attention, its row logsumexp and its analytic gradients (softmax backward in
    the rowsum(P * dP) form, not the kernel's rowsum(dO * O)). q (B, T, N, H), k, v (B, T, K, H)."""
    q, k, v, dout = (x.astype(np.float64) for x in (q, k, v, dout))
    B, T, N, H = q.shape
    G = N // k.shape[2]
    kk, vv = np.repeat(k, G, axis=2), np.repeat(v, G, axis=2)  # (B, T, N, H): head n uses kv head n // G
    s = np.einsum("btnh,bsnh->bnts", q, kk) / np.sqrt(H)
    s = np.where(np.tril(np.ones((T, T), bool)), s, -np.inf)
    m = s.max(-1, keepdims=True)
    lse = (m + np.log(np.exp(s - m).sum(-1, keepdims=True)))[..., 0]  # (B, N, T)
    p = np.exp(s - lse[..., None])
    out = np.einsum("bnts,bsnh->btnh", p, vv)
    dp = np.einsum("btnh,bsnh->bnts", dout, vv)
    ds = p * (dp - (p * dp).sum(-1, keepdims=True))
    dq = np.einsum("bnts,bsnh->btnh", ds, kk) / np.sqrt(H)
    dk = np.einsum("bnts,btnh->bsnh", ds, q) / np.sqrt(H)
    dv = np.einsum("bnts,btnh->bsnh", p, dout)
    fold = lambda x: x.reshape(B, T, -1, G, H).sum(3)  # noqa: E731 - sum a kv head's G query heads
    return out, lse, (dq, fold(dk), fold(dv))


def case(H, T=37, B=2, N=4, K=2, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, T, N, H)).astype(np.float32)
    k = rng.standard_normal((B, T, K, H)).astype(np.float32)
    v = rng.standard_normal((B, T, K, H)).astype(np.float32)
    dout = rng.standard_normal((B, T, N, H)).astype(np.float32)
    return q, k, v, dout


def xla(q, k, v):
    return attn_mod._xla_attention(q, k, v, None)


# T = 37: a 32-row block and a ragged 5-row one, key columns padded from 37 to 48; GQA (G = 2).
# H = 24 has no AVX-512 loop: the scalar path runs whatever NANOJAX_KERNEL_ISA says.
@pytest.mark.parametrize("isa,H", [("avx512", 32), ("avx512", 64), ("scalar", 32), ("scalar", 24)])
def test_forward_and_gradients_match_float64_numpy_and_xla(kernels, monkeypatch, isa, H):
    monkeypatch.setenv("NANOJAX_KERNEL_ISA", isa)  # read at each call of the custom call
    if isa == "avx512" and not ca.available(H):
        pytest.skip("no AVX-512 on this CPU")
    q, k, v, dout = case(H)
    out_ref, lse_ref, grads_ref = oracle(q, k, v, dout)
    out, vjp = jax.vjp(ca.causal_attention, q, k, v)
    np.testing.assert_allclose(np.asarray(out), out_ref, rtol=1e-5, atol=2e-6)
    np.testing.assert_allclose(ca.logsumexp(q, k, v), lse_ref, rtol=1e-5, atol=2e-6)
    grads = vjp(dout)
    _, xla_vjp = jax.vjp(xla, q, k, v)
    for name, g, ref, gx in zip("qkv", grads, grads_ref, xla_vjp(dout), strict=True):
        g = np.asarray(g)
        np.testing.assert_allclose(g, ref, rtol=1e-5, atol=1e-5, err_msg=f"d{name} vs float64")
        np.testing.assert_allclose(g, np.asarray(gx), rtol=1e-5, atol=1e-5, err_msg=f"d{name} vs XLA")


def test_vectorised_exp_within_one_ulp(kernels):
    if not ca.available(32):
        pytest.skip("no AVX-512 on this CPU")
    err = ca.exp_max_ulp_error(-87.0, 0.0, 1 << 18)
    assert 0 < err <= 1.0, err  # measured 0.92 ulp over 2^20 points (docs/attention.md)


def test_single_rows_and_extreme_scores(kernels):
    """T = 1 (a row that sees only itself), and scores of +-1e3 (the max subtraction must hold)."""
    q, k, v, dout = case(32, T=1, B=1)
    np.testing.assert_allclose(np.asarray(ca.causal_attention(q, k, v)), np.repeat(v, 2, axis=2), rtol=1e-6)
    q, k, v, dout = case(32, T=20, B=1, seed=3)
    q *= 30.0
    out_ref, _, grads_ref = oracle(q, k, v, dout)
    out, vjp = jax.vjp(ca.causal_attention, q, k, v)
    assert np.isfinite(np.asarray(out)).all()
    np.testing.assert_allclose(np.asarray(out), out_ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(vjp(dout)[2]), grads_ref[2], rtol=1e-4, atol=1e-4)


def test_auto_routes_causal_self_attention_only(kernels, monkeypatch):
    if not ca.available(32):
        pytest.skip("no AVX-512 on this CPU")
    q, k, v, _ = case(32, T=8, B=1)
    auto = lambda q, k, v: attn_mod.attention(q, k, v)  # noqa: E731
    grad = jax.grad(lambda q, k, v: attn_mod.attention(q, k, v).sum(), argnums=(0, 1, 2))
    assert FWD in hlo(auto, q, k, v) and BWD in hlo(grad, q, k, v)
    assert FWD not in hlo(lambda q, k, v: attn_mod.attention(q, k, v, impl="xla"), q, k, v)
    mask = jnp.ones((1, 8, 8), bool)
    assert FWD not in hlo(lambda q, k, v: attn_mod.attention(q, k, v, mask=mask), q, k, v)
    bf = [x.astype(jnp.bfloat16) for x in (q, k, v)]
    assert FWD in hlo(auto, *bf) and auto(*bf).dtype == jnp.bfloat16  # bf16 compute: fp32 inside
    np.testing.assert_allclose(np.asarray(auto(*bf), np.float32),
                               np.asarray(attn_mod.attention(*bf, impl="xla"), np.float32), atol=2e-2)
    assert FWD not in hlo(auto, *(x.astype(jnp.float16) for x in (q, k, v)))
    assert FWD not in hlo(auto, q, k[:, :4], v[:, :4])  # S != T: a cache, not self-attention
    assert FWD not in hlo(auto, *case(24, T=8, B=1)[:3])  # no AVX-512 loop for H = 24
    with ca.train_attention_kernel(False):
        assert FWD not in hlo(auto, q, k, v)
    token = ACTIVATION_CONSTRAINT.set(lambda x, axes: x)  # a sharded step is being traced
    try:
        assert FWD not in hlo(auto, q, k, v)
    finally:
        ACTIVATION_CONSTRAINT.reset(token)
    monkeypatch.setenv("NANOJAX_TRAIN_ATTN_KERNEL", "0")
    assert FWD not in hlo(auto, q, k, v)
    with ca.train_attention_kernel(True):
        assert FWD in hlo(auto, q, k, v)


def test_vmap_and_checkpoint(kernels):
    q, k, v, dout = case(32, T=9, B=1)
    stack = lambda x: jnp.stack([x, 2 * x])  # noqa: E731
    loss = lambda q, k, v: (ca.causal_attention(q, k, v) * dout).sum()  # noqa: E731
    got = jax.vmap(jax.grad(jax.checkpoint(loss), argnums=(0, 1, 2)))(stack(q), stack(k), stack(v))
    for i, s in enumerate((1, 2)):
        ref = oracle(s * q, s * k, s * v, dout)[2]
        for g, r in zip(got, ref, strict=True):
            np.testing.assert_allclose(np.asarray(g[i]), r, rtol=1e-5, atol=1e-5)


def test_bad_inputs_are_refused(kernels):
    q, k, v, _ = case(32, T=8, B=1)
    with pytest.raises(ValueError, match="multiple of K"):
        ca.causal_attention(q[:, :, :3], k, v)
    with pytest.raises(ValueError, match="T == S"):
        ca.causal_attention(q, k[:, :4], v[:, :4])
    with pytest.raises(ValueError, match="float32"):
        ca.causal_attention(q.astype(jnp.bfloat16), k, v)
    with pytest.raises(ValueError, match=r"\(B, T, N, H\)"):
        ca.causal_attention(q[0], k, v)
    with pytest.raises(TypeError, match="True, False or None"):
        ca.train_attention_kernel("yes")


def test_training_loss_and_grads_equal_the_xla_path(kernels):
    """A one-layer llama-tiny loss and gradients (N 4, K 2, H 16, T 37), layers scanned and remat'd:
    the kernel inside lax.scan and jax.checkpoint, against the same step with XLA's attention."""
    if not ca.available(16):
        pytest.skip("no AVX-512 on this CPU")
    cfg = nj.ModelConfig.preset("llama-tiny", vocab_size=61, max_seq_len=40, d_ff=64, n_layer=1, remat="full",
                                scan_layers=True)
    assert_kernel_step_equals_xla(cfg, FWD, BWD, lambda: ca.train_attention_kernel(False))
