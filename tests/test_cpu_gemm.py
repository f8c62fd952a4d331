"""The training gemm kernel (nanojax/quant/csrc/gemm.cc: MKL's sgemm) behind `nanojax.dense`.

Oracles: float64 numpy products; for the model, the same loss and gradients through XLA's dots.
"""

import ctypes

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import np_params

import nanojax as nj
from nanojax import dense
from nanojax.kernels import cpu_gemm
from nanojax.model import ACTIVATION_CONSTRAINT
from nanojax.quant import ffi

TARGET = ffi.GEMM_TARGET


@pytest.fixture(scope="module")
def gemm(kernels):
    """The kernel library built with MKL: where the mkl-static package is installed (the test extra
    installs it) it must be; elsewhere these tests skip."""
    if ffi.mkl_static_dir() is None:
        pytest.skip("mkl-static is not installed (pip install 'nanojax[mkl]'): no gemm kernel to test")
    assert cpu_gemm.available(), ffi.kernels_info()
    return cpu_gemm


def operands(M, K, N, ta, tb, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((K, M) if ta else (M, K)).astype(np.float32)
    b = rng.standard_normal((N, K) if tb else (K, N)).astype(np.float32)
    return a, b


def product64(a, b, ta, tb):
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    return (a64.T if ta else a64) @ (b64.T if tb else b64)


def hlo(fn, *args) -> str:
    return jax.jit(fn).lower(*args).as_text()


# (M, K, N): blocks by rows (M >= N) and by columns (N > M); extents not multiples of the 16-row
# alignment; one block (under 64 rows) and several; K = 1.
@pytest.mark.parametrize("M,K,N", [(70, 33, 45), (37, 130, 300), (200, 1, 9), (129, 64, 129)])
@pytest.mark.parametrize("ta,tb", [(False, False), (False, True), (True, False), (True, True)])
def test_products_match_float64_numpy(gemm, monkeypatch, M, K, N, ta, tb):
    a, b = operands(M, K, N, ta, tb)
    ref = product64(a, b, ta, tb)
    scale = np.abs(a).max() * np.abs(b).max() * K
    for threads in ("1", "2", "3"):  # the split follows the thread count (read at each call)
        monkeypatch.setenv("NANOJAX_KERNEL_THREADS", threads)
        got = np.asarray(gemm.gemm(jnp.asarray(a), jnp.asarray(b), transpose_a=ta, transpose_b=tb))
        assert got.shape == (M, N)
        np.testing.assert_allclose(got, ref, rtol=0, atol=2e-6 * scale, err_msg=f"threads {threads}")


def test_bf16_products_sum_in_fp32(gemm):
    """bf16 operands: every form against float64 products of the same bf16 values (the sums in
    fp32, so within fp32 rounding of K terms, far inside bf16's own spacing)."""
    if not gemm.bf16_available():
        pytest.skip("no AVX512_BF16 on this CPU: bf16 products stay on XLA")
    for ta, tb in [(False, False), (False, True), (True, False)]:
        a, b = operands(150, 96, 70, ta, tb, seed=5)
        a16, b16 = jnp.asarray(a, jnp.bfloat16), jnp.asarray(b, jnp.bfloat16)
        ref = product64(np.asarray(a16, np.float64), np.asarray(b16, np.float64), ta, tb)
        got = gemm.gemm(a16, b16, transpose_a=ta, transpose_b=tb)
        assert got.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(got), ref, rtol=0, atol=1e-5 * np.abs(ref).max())


def test_dense_gradients_through_the_kernel_match_float64(gemm):
    """dense.matmul and dense_transposed (the tied head): value and both gradients on the kernel."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((50, 24)).astype(np.float32)
    w = rng.standard_normal((24, 40)).astype(np.float32)
    t = rng.standard_normal((40, 24)).astype(np.float32)  # a table (O, I)
    g = rng.standard_normal((50, 40)).astype(np.float32)
    x64, w64, t64, g64 = (v.astype(np.float64) for v in (x, w, t, g))
    with gemm.gemm_kernel(True):
        for fn, wt, want in ((dense.matmul, w, (g64 @ w64.T, x64.T @ g64)),
                             (lambda x, t: dense.dense_transposed(x, t, jnp.float32), t,
                              (g64 @ t64, g64.T @ x64))):
            y, vjp = jax.vjp(fn, jnp.asarray(x), jnp.asarray(wt))
            assert TARGET in hlo(lambda x, w, fn=fn: jax.vjp(fn, x, w)[1](g), x, wt)
            w_used = w64 if wt is w else t64.T
            np.testing.assert_allclose(np.asarray(y), x64 @ w_used, rtol=1e-5, atol=1e-5)
            for got, ref in zip(vjp(jnp.asarray(g)), want, strict=True):
                np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-5, atol=1e-4)


def test_routing(gemm, monkeypatch):
    """Training-sized fp32 products only, on one device, unless switched off; the head transposes
    nothing on the kernel."""
    x, w = (jnp.ones((40, 16)), jnp.ones((16, 8)))
    mm = lambda: lambda x, w: dense.matmul(x, w)  # noqa: E731 - a new function each time: jit's cache
    # does not key on the environment or the sharding constraint, which are read while tracing
    grad = jax.grad(lambda x, w: dense.matmul(x, w).sum(), argnums=(0, 1))
    with gemm.gemm_kernel(True):
        assert TARGET in hlo(mm(), x, w) and hlo(grad, x, w).count(TARGET) == 2
        assert TARGET not in hlo(mm(), x[:32], w)  # decode-sized: the small-M kernel's
        bf16 = hlo(mm(), x.astype(jnp.bfloat16), w.astype(jnp.bfloat16))  # native bf16 only
        assert (ffi.GEMM_BF16_TARGET in bf16) == gemm.bf16_available()
        assert TARGET not in hlo(mm(), x.astype(jnp.bfloat16), w)  # mixed dtypes: XLA's
        head = jax.grad(lambda x, t: dense.dense_transposed(x, t, jnp.float32).sum(), argnums=(0, 1))
        assert "stablehlo.transpose" not in hlo(head, x, w.T) and hlo(head, x, w.T).count(TARGET) == 2
        token = ACTIVATION_CONSTRAINT.set(lambda x, axes: x)  # a sharded step is being traced
        try:
            assert TARGET not in hlo(mm(), x, w)
        finally:
            ACTIVATION_CONSTRAINT.reset(token)
    with gemm.gemm_kernel(False):
        assert TARGET not in hlo(mm(), x, w)
    monkeypatch.setenv("NANOJAX_GEMM_KERNEL", "0")
    assert TARGET not in hlo(mm(), x, w)
    monkeypatch.setenv("NANOJAX_GEMM_KERNEL", "1")  # on whatever the CPU family
    assert TARGET in hlo(mm(), x, w)
    monkeypatch.delenv("NANOJAX_GEMM_KERNEL")
    expected = cpu_gemm._family() in cpu_gemm.MEASURED_FAMILIES  # the default: measured families only
    assert (TARGET in hlo(mm(), x, w)) == expected


def kernel_and_xla_loss_and_grads(gemm, dtype):
    """A one-layer tied-head GPT (biases on) loss and gradients traced with the gemm kernel on and
    off: ((kernel calls, loss, grads) on, (kernel calls, loss, grads) off)."""
    from nanojax.train.step import loss_fn

    cfg = nj.ModelConfig.preset("shakespeare-char-cpu", vocab_size=61, max_seq_len=40, n_layer=1,
                                d_model=32, n_head=2, bias=True, dtype=dtype)
    assert cfg.tie_embeddings
    params = np_params(cfg, 0)
    x = jnp.asarray(np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 37)), jnp.int32)
    y = jnp.roll(x, -1, axis=1)
    target = TARGET if dtype == "float32" else ffi.GEMM_BF16_TARGET

    def run():
        lowered = jax.jit(lambda p: jax.value_and_grad(loss_fn)(p, x, y, cfg)).lower(params)
        return (lowered.as_text().count(target), *lowered.compile()(params))

    with gemm.gemm_kernel(True):
        on = run()
    with gemm.gemm_kernel(False):
        off = run()
    return on, off


def test_training_loss_and_grads_equal_the_xla_path(gemm):
    """A tied-head GPT loss and gradients (every dense product and the head on the kernel) against
    the same loss with XLA's dots."""
    (calls, loss, grads), (calls_x, loss_x, grads_x) = kernel_and_xla_loss_and_grads(gemm, "float32")
    assert calls == 3 * 7  # q, k, v, o, in, out and the head: the forward and two backward products
    assert calls_x == 0
    np.testing.assert_allclose(float(loss), float(loss_x), rtol=1e-6)
    flat_x = dict(jax.tree_util.tree_leaves_with_path(grads_x))
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        np.testing.assert_allclose(np.asarray(g), np.asarray(flat_x[path]), rtol=1e-4, atol=1e-6,
                                   err_msg=jax.tree_util.keystr(path))


def test_bf16_training_loss_and_grads_close_to_the_xla_path(gemm):
    """Mixed precision (bf16 compute, fp32 params): the loss and gradients with every product on
    the bf16 kernel against XLA's bf16 dots, within bf16 rounding."""
    if not gemm.bf16_available():
        pytest.skip("no AVX512_BF16 on this CPU: bf16 products stay on XLA")
    (calls, loss, grads), (calls_x, loss_x, grads_x) = kernel_and_xla_loss_and_grads(gemm, "bfloat16")
    assert calls == 3 * 7
    assert calls_x == 0
    np.testing.assert_allclose(float(loss), float(loss_x), rtol=1e-2)
    flat_x = dict(jax.tree_util.tree_leaves_with_path(grads_x))
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        ref = np.asarray(flat_x[path], np.float32)
        assert g.dtype == jnp.float32  # the master copy's dtype
        np.testing.assert_allclose(np.asarray(g), ref, atol=0.05 * np.abs(ref).max() + 1e-6,
                                   err_msg=jax.tree_util.keystr(path))


def test_mkl_stays_inside_the_library(gemm):
    """MKL is linked with its symbols hidden: a PyTorch (its own MKL) loaded in the same process
    must not bind to this copy's sequential layer, nor this one to PyTorch's threaded one."""
    lib = ctypes.CDLL(str(ffi.build()))
    assert hasattr(lib, "NjGemm")
    for name in ("cblas_sgemm", "sgemm_", "MKL_Set_Num_Threads", "mkl_serv_malloc"):
        assert not hasattr(lib, name), f"{name} is exported from the kernel library"


def test_bad_inputs_are_refused(gemm):
    a, b = jnp.ones((8, 4)), jnp.ones((4, 6))
    with pytest.raises(ValueError, match="inner sizes differ"):
        gemm.gemm(a, b, transpose_b=True)
    with pytest.raises(ValueError, match="both float32 or both bfloat16"):
        gemm.gemm(a.astype(jnp.bfloat16), b)
    with pytest.raises(ValueError, match="both float32 or both bfloat16"):
        gemm.gemm(a.astype(jnp.float16), b.astype(jnp.float16))
    with pytest.raises(ValueError, match="2-D"):
        gemm.gemm(a[None], b)
    with pytest.raises(TypeError, match="True, False or None"):
        gemm.gemm_kernel("yes")
