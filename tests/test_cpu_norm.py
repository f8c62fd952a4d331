"""The CPU norm kernel (nanojax/quant/csrc/norm.cc, nanojax.kernels.cpu_norm): LayerNorm with and
without bias and RMSNorm, forward and gradients against a float64 numpy oracle and XLA's
nanojax.model.norm, on both ISA paths, a row count that is no multiple of the kernel's units and a
width with no vector loop; constant rows (eps alone keeps them finite); bf16 in and out; the same
scale gradient whatever the thread count; where nanojax.model.norm takes it and where it must
not; and one training loss and gradient equal to XLA's norm."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_kernel_step_equals_xla
from conftest import fresh_hlo as hlo

import nanojax as nj
from nanojax import model as model_mod
from nanojax.kernels import cpu_norm as cn
from nanojax.model import ACTIVATION_CONSTRAINT

FWD, BWD = "nanojax_norm_fwd", "nanojax_norm_bwd"
EPS = 1e-5


def oracle(x, scale, bias, dy, rms, eps=EPS):
    """float64 LayerNorm / RMSNorm of x's rows and its analytic gradients (dx, dscale, dbias)."""
    x, scale, dy = (a.astype(np.float64) for a in (x, scale, dy))
    mean = 0.0 if rms else x.mean(-1, keepdims=True)
    xc = x - mean
    rstd = 1.0 / np.sqrt((xc * xc).mean(-1, keepdims=True) + eps)
    xhat = xc * rstd
    y = xhat * scale + (0.0 if bias is None else bias.astype(np.float64))
    g = dy * scale
    dx = rstd * (g - (0.0 if rms else g.mean(-1, keepdims=True)) - xhat * (g * xhat).mean(-1, keepdims=True))
    return y, (dx, (dy * xhat).sum(0), dy.sum(0))


def case(M=100, D=128, seed=0):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((M, D)) * 2 + 0.5).astype(np.float32)
    scale = (1 + 0.3 * rng.standard_normal(D)).astype(np.float32)
    bias = (0.2 * rng.standard_normal(D)).astype(np.float32)
    dy = rng.standard_normal((M, D)).astype(np.float32)
    return x, scale, bias, dy


def xla_norm(x, scale, bias, rms):
    cfg = nj.ModelConfig.preset("llama-tiny" if rms else "gpt2-small", d_model=x.shape[1], n_head=1,
                                n_kv_head=1)
    p = {"scale": scale} | ({} if bias is None else {"bias": bias})
    with cn.norm_kernel(False):
        return model_mod.norm(p, x, cfg)


def grads(fn, x, scale, bias, dy):
    if bias is None:
        y, vjp = jax.vjp(lambda x, s: fn(x, s, None), x, scale)
        return y, (*vjp(dy), None)
    y, vjp = jax.vjp(fn, x, scale, bias)
    return y, vjp(dy)


# M = 100: a 64-row unit and a ragged 36-row one; D = 24 has no AVX-512 loop (scalar whatever the ISA).
@pytest.mark.parametrize("isa,D", [("avx512", 128), ("scalar", 128), ("scalar", 24)])
@pytest.mark.parametrize("kind", ["layernorm", "layernorm-nobias", "rmsnorm"])
def test_forward_and_gradients_match_float64_numpy_and_xla(kernels, monkeypatch, isa, D, kind):
    monkeypatch.setenv("NANOJAX_KERNEL_ISA", isa)  # read at each call of the custom call
    if isa == "avx512" and not cn.available(D):
        pytest.skip("no AVX-512 on this CPU")
    x, scale, bias, dy = case(D=D)
    rms = kind == "rmsnorm"
    bias = bias if kind == "layernorm" else None
    y_ref, grads_ref = oracle(x, scale, bias, dy, rms)
    y, got = grads(lambda x, s, b: cn.layer_norm(x, s, b, rms=rms, eps=EPS), x, scale, bias, dy)
    np.testing.assert_allclose(np.asarray(y), y_ref, rtol=1e-5, atol=2e-6)
    y_x, got_x = grads(lambda x, s, b: xla_norm(x, s, b, rms), x, scale, bias, dy)
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_x), rtol=1e-5, atol=2e-6)
    for name, g, ref, gx in zip(("x", "scale", "bias"), got, grads_ref, got_x, strict=True):
        if bias is None and name == "bias":
            continue
        g = np.asarray(g)
        np.testing.assert_allclose(g, ref, rtol=1e-4, atol=1e-4, err_msg=f"d{name} vs float64")
        np.testing.assert_allclose(g, np.asarray(gx), rtol=1e-4, atol=1e-4, err_msg=f"d{name} vs XLA")


@pytest.mark.parametrize("isa", ["avx512", "scalar"])
def test_constant_rows_are_held_finite_by_eps(kernels, monkeypatch, isa):
    """A constant row has variance 0: y = bias exactly and dx = 0, only eps keeps rstd finite."""
    monkeypatch.setenv("NANOJAX_KERNEL_ISA", isa)
    if isa == "avx512" and not cn.available(32):
        pytest.skip("no AVX-512 on this CPU")
    x, scale, bias, dy = case(M=40, D=32)
    x[3] = 7.0
    y, (dx, _, _) = grads(lambda x, s, b: cn.layer_norm(x, s, b, eps=0.1), x, scale, bias, dy)
    y_ref, (dx_ref, _, _) = oracle(x, scale, bias, dy, False, eps=0.1)
    np.testing.assert_allclose(np.asarray(y)[3], bias, rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(y), y_ref, rtol=1e-5, atol=2e-6)
    np.testing.assert_allclose(np.asarray(dx), dx_ref, rtol=1e-4, atol=1e-4)


def test_bf16_in_and_out(kernels):
    """bf16 x and out_dtype: y is the float64 result rounded to nearest even once (within one bf16
    step where the fp32 value sits on a rounding boundary); a bf16 dy is read exactly; x's gradient
    comes back bf16, scale's and bias's in float32."""
    x, scale, bias, dy = case(M=70, D=64)
    xb, dyb = jnp.asarray(x, jnp.bfloat16), jnp.asarray(dy, jnp.bfloat16)
    y, vjp = jax.vjp(lambda x, s, b: cn.layer_norm(x, s, b, out_dtype=jnp.bfloat16), xb, scale, bias)
    assert y.dtype == jnp.bfloat16
    y_ref, grads_ref = oracle(np.asarray(xb, np.float32), scale, bias, np.asarray(dyb, np.float32), False)
    rounded = np.asarray(jnp.asarray(y_ref, jnp.float32).astype(jnp.bfloat16), np.float32)
    y32 = np.asarray(y, np.float32)
    assert (y32 == rounded).mean() > 0.999
    np.testing.assert_allclose(y32, rounded, rtol=2 ** -7, atol=0)
    dx, dscale, dbias = vjp(dyb)
    assert dx.dtype == jnp.bfloat16 and dscale.dtype == dbias.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(dscale), grads_ref[1], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(dbias), grads_ref[2], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(dx, np.float32), grads_ref[0], rtol=2 ** -7, atol=1e-3)


def test_scale_gradient_does_not_depend_on_the_thread_count(kernels, monkeypatch):
    """Each unit of rows sums its own part of dscale and the caller adds the parts in unit order.
    4096 rows: 64 units, so both threads are at work together for a while."""
    x, scale, bias, dy = case(M=4096, D=64)
    fn = jax.jit(lambda x, s, b: grads(lambda x, s, b: cn.layer_norm(x, s, b), x, s, b, dy)[1])
    monkeypatch.setenv("NANOJAX_KERNEL_THREADS", "1")
    one = fn(x, scale, bias)
    monkeypatch.setenv("NANOJAX_KERNEL_THREADS", "2")
    two = fn(x, scale, bias)
    for a, b in zip(one, two, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # The grouping itself, whatever the threads do: the same rows as calls of one 64-row unit each,
    # their sums added in order in float32, give the whole call's sums to the bit (one running sum
    # over all the rows rounds differently).
    unit = lambda u: grads(lambda x, s, b: cn.layer_norm(x, s, b), x[u:u + 64], scale, bias,  # noqa: E731
                           dy[u:u + 64])[1][1:]
    parts = [[np.asarray(g) for g in unit(u)] for u in range(0, 4096, 64)]
    for k in range(2):  # dscale, dbias
        total = parts[0][k].copy()
        for part in parts[1:]:
            total = (total + part[k]).astype(np.float32)
        np.testing.assert_array_equal(np.asarray(two[k + 1]), total)


def test_model_norm_routes_batches_only(kernels, monkeypatch):
    if not cn.available(64):
        pytest.skip("no AVX-512 on this CPU")
    cfg = nj.ModelConfig.preset("gpt2-small", d_model=64, n_head=1)
    x, scale, bias, _ = case(M=40, D=64)
    p = {"scale": scale, "bias": bias}
    norm = lambda x: model_mod.norm(p, x, cfg)  # noqa: E731
    assert FWD in hlo(norm, x) and BWD in hlo(jax.grad(lambda x: norm(x).sum()), x)
    out = norm(jnp.asarray(x, jnp.bfloat16))
    assert out.dtype == jnp.bfloat16 and FWD in hlo(norm, jnp.asarray(x, jnp.bfloat16))
    assert FWD not in hlo(norm, x[:32])  # a decode step's rows: XLA's fusion
    assert FWD not in hlo(norm, x[None])  # not (M, D)
    assert FWD not in hlo(norm, x.astype(jnp.float16))
    narrow = lambda x: model_mod.norm({"scale": scale[:24]}, x, cfg)  # noqa: E731
    assert FWD not in hlo(narrow, x[:, :24])  # D = 24: no vector loop
    with cn.norm_kernel(False):
        assert FWD not in hlo(norm, x)
    token = ACTIVATION_CONSTRAINT.set(lambda x, axes: x)  # a sharded step is being traced
    try:
        assert FWD not in hlo(norm, x)
    finally:
        ACTIVATION_CONSTRAINT.reset(token)
    monkeypatch.setenv("NANOJAX_NORM_KERNEL", "0")
    assert FWD not in hlo(norm, x)
    with cn.norm_kernel(True):
        assert FWD in hlo(norm, x)


def test_bad_inputs_are_refused(kernels):
    x, scale, bias, _ = case(M=8, D=32)
    with pytest.raises(ValueError, match=r"x \(M, D\)"):
        cn.layer_norm(x[None], scale, bias)
    with pytest.raises(ValueError, match=r"x \(M, D\)"):
        cn.layer_norm(x, scale[:16], bias)
    with pytest.raises(ValueError, match="no bias"):
        cn.layer_norm(x, scale, bias, rms=True)
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        cn.layer_norm(x, scale, bias, out_dtype=jnp.float16)
    with pytest.raises(TypeError, match="True, False or None"):
        cn.norm_kernel("yes")


def test_training_loss_and_grads_equal_the_xla_path(kernels):
    """A one-layer gpt2-shaped loss and gradients (LayerNorm with bias, 2 x 37 rows), layers scanned
    and remat'd: the kernel inside lax.scan and jax.checkpoint, against the same step with XLA's norm."""
    if not cn.available(32):
        pytest.skip("no AVX-512 on this CPU")
    cfg = nj.ModelConfig.preset("gpt2-small", vocab_size=61, max_seq_len=40, d_model=32, n_head=2, d_ff=64,
                                n_layer=1, remat="full", scan_layers=True)
    assert_kernel_step_equals_xla(cfg, FWD, BWD, lambda: cn.norm_kernel(False))
