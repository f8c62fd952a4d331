"""The training gemm kernel (nanojax/quant/csrc/gemm.cc: MKL's sgemm and bf16 gemm, oneDNN's bf16
matmul) behind `nanojax.dense`.

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
from nanojax.quant import blas, ffi

TARGET = ffi.GEMM_TARGET


@pytest.fixture(scope="module")
def gemm(kernels):
    """The kernel library built with MKL: where the mkl-static package is installed (the test extra
    installs it) it must be; elsewhere these tests skip."""
    if blas.mkl_static_dir() is None:
        pytest.skip("mkl-static is not installed (pip install 'nanojax[mkl]'): no gemm kernel to test")
    assert "mkl" in cpu_gemm.built(), ffi.kernels_info()
    return cpu_gemm


@pytest.fixture(scope="module", params=["mkl", "onednn"])
def bf16_lib(request, gemm):
    """Each library with a bf16 handler: where its package is installed (the test extra installs
    both) it must be built in; skips on a CPU without AVX512_BF16."""
    if "avx512_bf16" not in (cpu_gemm._cpu().flags or ()):
        pytest.skip("no AVX512_BF16 on this CPU: bf16 products stay on XLA")
    if request.param == "onednn" and blas.onednn_dirs() is None:
        pytest.skip("onednn-cpu-gomp is not installed (pip install 'nanojax[onednn]')")
    assert request.param in cpu_gemm.built(), ffi.kernels_info()
    return request.param


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


# By rows (M >= N) and by columns; several blocks and one; a transposed a with M >= 128 goes by
# rows even where N > M, each block of 16k rows copied row by row first (oneDNN: gemm.cc's Plan,
# transpose_bf16: tiles of 32 rows of a by 16 columns, then the ragged rows; K = 20 has no tile).
@pytest.mark.parametrize("M,K,N", [(150, 96, 70), (40, 33, 130), (144, 40, 200), (256, 70, 48),
                                   (160, 20, 300)])
def test_bf16_products_sum_in_fp32(bf16_lib, monkeypatch, M, K, N):
    """bf16 operands on each library: every form and thread count against float64 products of
    the same bf16 values (the sums in fp32, so within fp32 rounding of K terms, far inside bf16's
    own spacing)."""
    for ta, tb in [(False, False), (False, True), (True, False), (True, True)]:
        a, b = operands(M, K, N, ta, tb, seed=5)
        a16, b16 = jnp.asarray(a, jnp.bfloat16), jnp.asarray(b, jnp.bfloat16)
        ref = product64(np.asarray(a16, np.float64), np.asarray(b16, np.float64), ta, tb)
        for threads in ("1", "2"):
            monkeypatch.setenv("NANOJAX_KERNEL_THREADS", threads)
            got = cpu_gemm.gemm(a16, b16, transpose_a=ta, transpose_b=tb, lib=bf16_lib)
            assert got.dtype == jnp.float32 and got.shape == (M, N)
            np.testing.assert_allclose(np.asarray(got), ref, rtol=0, atol=1e-5 * np.abs(ref).max(),
                                       err_msg=f"{ta=} {tb=} threads {threads}")
            # A bf16 result: those sums rounded once (by oneDNN as it stores them, MKL by a cast).
            got16 = cpu_gemm.gemm(a16, b16, transpose_a=ta, transpose_b=tb, lib=bf16_lib,
                                  out_dtype=jnp.bfloat16)
            assert got16.dtype == jnp.bfloat16
            np.testing.assert_allclose(np.asarray(got16, np.float64), ref, rtol=2.0**-8,
                                       atol=1e-5 * np.abs(ref).max(), err_msg=f"bf16 {ta=} {tb=} {threads=}")


def test_bf16_repeated_calls_read_their_own_operands(bf16_lib, monkeypatch):
    """One product shape called again and again with new operands (and new result buffers): each
    call's result is its own operands' product. oneDNN's memory objects are made once per thread
    and shape and only re-pointed at each call's buffers (gemm.cc's Bound)."""
    M, K, N = 96, 32, 48
    for threads in ("1", "2"):
        monkeypatch.setenv("NANOJAX_KERNEL_THREADS", threads)
        for seed in range(4):
            for ta in (False, True):
                a, b = operands(M, K, N, ta, False, seed=10 + seed)
                a16, b16 = jnp.asarray(a, jnp.bfloat16), jnp.asarray(b, jnp.bfloat16)
                ref = product64(np.asarray(a16, np.float64), np.asarray(b16, np.float64), ta, False)
                got = cpu_gemm.gemm(a16, b16, transpose_a=ta, lib=bf16_lib)
                np.testing.assert_allclose(np.asarray(got), ref, rtol=0, atol=1e-5 * np.abs(ref).max(),
                                           err_msg=f"{threads=} {seed=} {ta=}")


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
        lib = gemm.library("bfloat16")  # the family's measured choice, else oneDNN, else MKL
        assert lib == (None if "avx512_bf16" not in (gemm._cpu().flags or ()) else
                       gemm.MEASURED.get(gemm._family(), {}).get("bfloat16") or gemm.built()[-1])
        assert (ffi.GEMM_BF16_TARGET in bf16) == (lib == "mkl")
        assert (ffi.GEMM_BF16_DNNL_TARGET in bf16) == (lib == "onednn")
        mixed = hlo(mm(), x.astype(jnp.bfloat16), w)  # bf16 x, fp32 master w: w cast for the kernel
        bf16_targets = (ffi.GEMM_BF16_TARGET, ffi.GEMM_BF16_DNNL_TARGET)
        assert f"@{TARGET}(" not in mixed
        assert any(f"@{t}(" in mixed for t in bf16_targets) == (lib is not None)
        other = hlo(mm(), x, w.astype(jnp.bfloat16))  # fp32 x, bf16 w: XLA's
        assert not any(f"@{t}(" in other for t in (TARGET, *bf16_targets))
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
    off16 = hlo(mm(), x.astype(jnp.bfloat16), w.astype(jnp.bfloat16))  # also where bf16 is routed by default
    assert not any(f"@{t}(" in off16 for t in (ffi.GEMM_BF16_TARGET, ffi.GEMM_BF16_DNNL_TARGET))
    monkeypatch.setenv("NANOJAX_GEMM_KERNEL", "1")  # on whatever the CPU family
    assert TARGET in hlo(mm(), x, w)
    monkeypatch.delenv("NANOJAX_GEMM_KERNEL")
    measured = cpu_gemm.MEASURED.get(cpu_gemm._family(), {})  # the default: measured choices only
    assert (TARGET in hlo(mm(), x, w)) == (measured.get("float32") == "mkl")
    bf16 = hlo(mm(), x.astype(jnp.bfloat16), w.astype(jnp.bfloat16))
    default = measured.get("bfloat16") if "avx512_bf16" in (gemm._cpu().flags or ()) else None
    assert (ffi.GEMM_BF16_DNNL_TARGET in bf16) == (default == "onednn")
    assert (ffi.GEMM_BF16_TARGET in bf16) == (default == "mkl")


def test_bf16_library_chosen_by_the_user(bf16_lib, monkeypatch):
    """NANOJAX_GEMM_BF16_LIB or bf16_library(name) puts bf16 products on that library whatever the
    CPU family's measured choice (the context over the environment); gemm_kernel(False) still wins;
    a name that is no library is refused."""
    x, w = jnp.ones((40, 16), jnp.bfloat16), jnp.ones((16, 8), jnp.bfloat16)
    mm = lambda: lambda x, w: dense.matmul(x, w)  # noqa: E731 - a new function: a fresh trace
    target = {"mkl": ffi.GEMM_BF16_TARGET, "onednn": ffi.GEMM_BF16_DNNL_TARGET}
    other = "mkl" if bf16_lib == "onednn" else "onednn"
    monkeypatch.setenv("NANOJAX_GEMM_BF16_LIB", bf16_lib)
    assert cpu_gemm.library("bfloat16") == bf16_lib
    text = hlo(mm(), x, w)
    assert f"@{target[bf16_lib]}(" in text and f"@{target[other]}(" not in text
    assert cpu_gemm.library("float32") == cpu_gemm.MEASURED.get(cpu_gemm._family(), {}).get("float32")
    with cpu_gemm.gemm_kernel(False):
        assert cpu_gemm.library("bfloat16") is None
    monkeypatch.delenv("NANOJAX_GEMM_BF16_LIB")
    with cpu_gemm.bf16_library(bf16_lib):
        assert cpu_gemm.library("bfloat16") == bf16_lib
        monkeypatch.setenv("NANOJAX_GEMM_BF16_LIB", other)
        assert cpu_gemm.library("bfloat16") == bf16_lib  # the context over the environment
    monkeypatch.setenv("NANOJAX_GEMM_BF16_LIB", "openblas")
    with pytest.raises(ValueError, match="NANOJAX_GEMM_BF16_LIB='openblas'"):
        cpu_gemm.library("bfloat16")
    with pytest.raises(ValueError, match="one of"):
        cpu_gemm.bf16_library("openblas")


def kernel_and_xla_loss_and_grads(gemm, dtype, target=TARGET):
    """A one-layer tied-head GPT (biases on) loss and gradients traced with the gemm kernel on and
    off: ((kernel calls, loss, grads) on, (kernel calls, loss, grads) off)."""
    from nanojax.train.step import loss_fn

    cfg = nj.ModelConfig.preset("shakespeare-char-cpu", vocab_size=61, max_seq_len=40, n_layer=1,
                                d_model=32, n_head=2, bias=True, dtype=dtype)
    assert cfg.tie_embeddings
    params = np_params(cfg, 0)
    x = jnp.asarray(np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 37)), jnp.int32)
    y = jnp.roll(x, -1, axis=1)

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


def test_bf16_training_loss_and_grads_close_to_the_xla_path(gemm, bf16_lib, monkeypatch):
    """Mixed precision (bf16 compute, fp32 params): the loss and gradients with every product on
    each library's bf16 kernel against XLA's bf16 dots, within bf16 rounding."""
    monkeypatch.setitem(gemm.MEASURED, gemm._family(), {"bfloat16": bf16_lib})
    target = {"mkl": ffi.GEMM_BF16_TARGET, "onednn": ffi.GEMM_BF16_DNNL_TARGET}[bf16_lib]
    (calls, loss, grads), (calls_x, loss_x, grads_x) = kernel_and_xla_loss_and_grads(gemm, "bfloat16", target)
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


def test_mixed_precision_weight_gradients_stay_fp32(bf16_lib, monkeypatch):
    """bf16 x with fp32 master weights (dense and the tied head): the products run on the bf16
    kernel, and each weight's gradient leaves it in fp32, the float64 sum of the bf16 products to
    fp32 rounding: not rounded to bf16 on the way (which would miss by ~1e-3 relative)."""
    monkeypatch.setitem(cpu_gemm.MEASURED, cpu_gemm._family(), {"bfloat16": bf16_lib})
    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.standard_normal((48, 24)), jnp.bfloat16)
    g = jnp.asarray(rng.standard_normal((48, 40)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((24, 40)), jnp.float32)  # (I, O); the table is w.T (O, I)
    x64, g64 = np.asarray(x, np.float64), np.asarray(g, np.float64)
    w16 = np.asarray(w.astype(jnp.bfloat16), np.float64)
    for fn, wt, dw_ref in ((dense.dense, w, x64.T @ g64), (dense.dense_transposed, w.T, g64.T @ x64)):
        y, vjp = jax.vjp(lambda x, w, fn=fn: fn(x, w, jnp.bfloat16), x, wt)
        assert y.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(y, np.float64), x64 @ w16, rtol=1e-2, atol=1e-2)
        dx, dw = vjp(g)
        assert dx.dtype == jnp.bfloat16 and dw.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(dx, np.float64), g64 @ w16.T, rtol=1e-2, atol=1e-2)
        np.testing.assert_allclose(np.asarray(dw), dw_ref, rtol=0, atol=1e-5 * np.abs(dw_ref).max())


def test_onednn_leaves_the_callers_openmp_thread_count(bf16_lib, monkeypatch):
    """Each library leaves the calling thread's OpenMP thread count as it found it, so a PyTorch on
    that thread keeps its parallelism: oneDNN runs each block at one thread and puts the count
    back; MKL's sequential layer never touches it."""
    gomp = ctypes.CDLL("libgomp.so.1")
    before = gomp.omp_get_max_threads()
    gomp.omp_set_num_threads(3)
    try:
        monkeypatch.setenv("NANOJAX_KERNEL_THREADS", "1")  # every block on the calling thread
        a = jnp.ones((80, 16), jnp.bfloat16)
        got = cpu_gemm.gemm(a, a, transpose_b=True, lib=bf16_lib)
        np.testing.assert_array_equal(np.asarray(got), 16.0)
        assert gomp.omp_get_max_threads() == 3
    finally:
        gomp.omp_set_num_threads(before)
