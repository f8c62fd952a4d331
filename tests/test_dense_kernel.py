"""The fp32 small-M CPU kernel (nanojax/quant/csrc/fmatmul.cc) behind `nanojax.dense.matmul`.

Oracles: a float64 numpy product, and a numpy emulation of the summation order the kernel promises
(per output, an fp32 fma chain over each block of CHUNK input rows in order, the blocks' sums then
added in order), which it must match bit for bit on every ISA; that order is what makes a row's
result independent of M, the batch it is in and the thread count, which the serving engine's
batch-vs-single greedy comparison relies on.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import np_params

import nanojax as nj
from nanojax import dense
from nanojax.model import ACTIVATION_CONSTRAINT
from nanojax.quant import ffi

TARGET = "nanojax_fp32_matmul"


def make(M, I, O, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((M, I)).astype(np.float32), rng.standard_normal((I, O)).astype(np.float32))


CHUNK = 128  # csrc/fmatmul.cc kChunk: input rows per summation block


def sequential_fma(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """(M, I) @ (I, O) as the kernel sums: per block of CHUNK input rows, c = fp32(c + x_i * w_i) for
    i in order from c = 0; then y = fp32(y + c) block after block.

    x_i * w_i of two fp32 values is exact in float64 and the one rounding to fp32 after the add is
    then an fma (a float64 add rounds first; a double rounding that changes the fp32 result needs a
    float64 sum lying exactly on an fp32 tie, which these random inputs do not produce)."""
    x64, w64 = x.astype(np.float64), w.astype(np.float64)
    y = None
    for i0 in range(0, x.shape[1], CHUNK):
        acc = np.zeros((x.shape[0], w.shape[1]), np.float32)
        for i in range(i0, min(i0 + CHUNK, x.shape[1])):
            acc = (acc.astype(np.float64) + x64[:, i:i + 1] * w64[i]).astype(np.float32)
        y = acc if y is None else y + acc  # fp32 + fp32 in numpy: one rounding, as the kernel
    return y


def hlo(fn, *args) -> str:
    return jax.jit(fn).lower(*args).as_text()


# (M, I, O): O below one register block, O not a multiple of 16 or 8, I odd; M = 1 (decode), 2, 3
# (a block of 2 + 1), 7 (4 + 2 + 1, or AVX-512 4 + 2 + 1 too), 13 (8 + 4 + 1), 32 (4 blocks of 8);
# several summation chunks (I > 128, ragged last chunk) with M = 1 and 5 (row split, partial sums)
# and M = 32 over a wide O (column split: partials above 2 MiB); a wide O at M = 1 (two slabs).
SHAPES = [(1, 37, 45), (2, 64, 7), (3, 19, 130), (7, 100, 300), (13, 33, 77), (32, 40, 200),
          (1, 300, 250), (5, 290, 97), (32, 260, 8300), (1, 130, 4200)]


@pytest.mark.parametrize("isa", ["avx512", "avx2", "scalar"])
@pytest.mark.parametrize("M,I,O", SHAPES)
def test_kernel_matches_numpy_and_its_summation_order(kernels, monkeypatch, isa, M, I, O):
    assert kernels.kernels_info()["fp32_vector_bits"] in (0, 256, 512)
    monkeypatch.setenv("NANOJAX_KERNEL_ISA", isa)  # read by the kernel at each call
    x, w = make(M, I, O)
    assert TARGET in hlo(dense.matmul, x, w)
    got = np.asarray(jax.jit(dense.matmul)(x, w))
    assert got.shape == (M, O) and got.dtype == np.float32
    want = x.astype(np.float64) @ w.astype(np.float64)
    scale = np.abs(x).astype(np.float64) @ np.abs(w).astype(np.float64)  # sum_i |x_i w_i|
    np.testing.assert_allclose(got, want, rtol=0, atol=float(1e-5 * scale.max()))
    np.testing.assert_array_equal(got, sequential_fma(x, w))


def test_rows_bit_identical_across_batch_and_threads(kernels, monkeypatch):
    """A row's output is the same bits at M = 1, inside M = 3 / 8 / 16 / 32 batches, and with 1 or 2
    threads, over three summation chunks (I = 300). At O = 9000, M = 32 takes the column split (its
    partial sums would be 2.2 MB) and M <= 16 the row split; the thread count changes the column
    split's slab width."""
    x, w = make(32, 300, 9000, seed=1)
    f = jax.jit(ffi.fp32_matmul)
    outs = {}
    for threads in ("1", "2"):
        monkeypatch.setenv("NANOJAX_KERNEL_THREADS", threads)
        outs[threads, 32] = np.asarray(f(x, w))
        outs[threads, 16] = np.concatenate([np.asarray(f(x[i:i + 16], w)) for i in (0, 16)])
        outs[threads, 8] = np.concatenate([np.asarray(f(x[i:i + 8], w)) for i in range(0, 32, 8)])
        outs[threads, 3] = np.concatenate([np.asarray(f(x[i:i + 3], w)) for i in range(0, 30, 3)]
                                          + [np.asarray(f(x[30:], w))])
        outs[threads, 1] = np.concatenate([np.asarray(f(x[i:i + 1], w)) for i in range(32)])
    ref = outs["1", 1]
    for key, got in outs.items():
        np.testing.assert_array_equal(got, ref, err_msg=f"threads, M = {key}")


def test_inside_jit_while_loop_scan_and_vmap(kernels):
    x, w = make(6, 48, 40, seed=2)
    eager = np.concatenate([np.asarray(dense.matmul(x[i:i + 1], w)) for i in range(6)])

    @jax.jit
    def loop(x, w):
        def body(c):
            i, out = c
            y = dense.matmul(jax.lax.dynamic_slice_in_dim(x, i, 1), w)
            return i + 1, jax.lax.dynamic_update_slice_in_dim(out, y, i, 0)
        return jax.lax.while_loop(lambda c: c[0] < 6, body, (0, jnp.zeros((6, 40), jnp.float32)))[1]

    assert TARGET in loop.lower(x, w).as_text()
    np.testing.assert_array_equal(np.asarray(loop(x, w)), eager)
    scanned = jax.jit(lambda x, w: jax.lax.scan(lambda c, r: (c, dense.matmul(r[None], w)[0]), 0, x)[1])
    np.testing.assert_array_equal(np.asarray(scanned(x, w)), eager)
    vm = jax.jit(jax.vmap(lambda r: dense.matmul(r[None], w)[0]))
    assert TARGET in vm.lower(x).as_text()
    np.testing.assert_array_equal(np.asarray(vm(x)), eager)


def test_grad_uses_xla_backward_and_equals_xla(kernels):
    """The forward runs the kernel, the backward XLA's dots: the gradients equal the all-XLA ones."""
    x, w = make(4, 24, 36, seed=3)
    t = make(4, 24, 36, seed=4)[0] @ make(4, 24, 36, seed=5)[1]  # a target, so y enters the grad

    def loss(x, w):
        return jnp.sum((dense.matmul(x, w) - t) ** 2)

    g = jax.jit(jax.grad(loss, argnums=(0, 1)))
    assert hlo(jax.grad(loss, argnums=(0, 1)), x, w).count(TARGET) == 1  # forward only
    gx, gw = g(x, w)
    with dense.fp32_kernel(False):
        assert TARGET not in hlo(jax.grad(loss, argnums=(0, 1)), x, w)
        rx, rw = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, w)
    np.testing.assert_allclose(np.asarray(gx), np.asarray(rx), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(np.asarray(gw), np.asarray(rw), rtol=1e-5, atol=1e-4)
    # and against numpy: d/dx = 2 (y - t) w^T, d/dw = 2 x^T (y - t)
    r = 2 * (x.astype(np.float64) @ w - t)
    np.testing.assert_allclose(np.asarray(gx), r @ w.T.astype(np.float64), rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(np.asarray(gw), x.T.astype(np.float64) @ r, rtol=1e-4, atol=1e-3)


def test_when_xla_runs_instead(kernels, monkeypatch):
    """Large M, other dtypes, the switches and a sharded trace leave the product to XLA."""
    x, w = make(2, 16, 24)
    assert TARGET in hlo(dense.matmul, x, w)
    assert TARGET in hlo(dense.matmul, *make(ffi.FP32_KERNEL_MAX_ROWS, 16, 24))  # the engine's 32 slots
    assert TARGET not in hlo(dense.matmul, *make(ffi.FP32_KERNEL_MAX_ROWS + 1, 16, 24))  # prefill / training
    xb, wb = jnp.asarray(x, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16)
    assert TARGET not in hlo(dense.matmul, xb, wb)
    with dense.fp32_kernel(False):
        assert TARGET not in hlo(dense.matmul, x, w)
    # The variable is read when a function is traced (jit's cache keeps earlier traces), so a
    # function traced for the first time here.
    monkeypatch.setenv("NANOJAX_FP32_KERNEL", "0")
    assert TARGET not in hlo(lambda a, b: dense.matmul(a, b), x, w)
    with dense.fp32_kernel(True):  # the context wins over the environment (A/B runs)
        assert TARGET in hlo(lambda a, b: dense.matmul(a, b), x, w)
    monkeypatch.delenv("NANOJAX_FP32_KERNEL")
    # An automatic-sharding trace (nanojax.sharding.activation_sharding installs a constraint):
    # a per-device custom call would make the partitioner gather a sharded weight, so XLA's dot.
    token = ACTIVATION_CONSTRAINT.set(lambda a, axes: a)
    try:
        assert TARGET not in hlo(lambda a, b: dense.matmul(a, b), x, w)
    finally:
        ACTIVATION_CONSTRAINT.reset(token)
    np.testing.assert_allclose(np.asarray(dense.matmul(x, w)), x.astype(np.float64) @ w, rtol=1e-5, atol=1e-5)


def test_no_kernels_env_falls_back(monkeypatch, tmp_path):
    monkeypatch.setenv("NANOJAX_KERNEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("NANOJAX_NO_KERNELS", "1")
    ffi._reset_for_tests()
    try:
        x, w = make(3, 20, 30)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # the loader's one warning
            assert TARGET not in hlo(dense.matmul, x, w)
            got = np.asarray(dense.matmul(x, w))
        np.testing.assert_allclose(got, x.astype(np.float64) @ w, rtol=1e-5, atol=1e-5)
        with pytest.raises(RuntimeError, match="kernels are unavailable.*NANOJAX_NO_KERNELS"):
            ffi.fp32_matmul(x, w)
    finally:
        monkeypatch.undo()
        ffi._reset_for_tests()


def test_generate_greedy_tokens_unchanged(kernels):
    """A tiny Llama decodes the same greedy tokens with the kernel as with XLA's dots (decode steps
    have M = 3 rows: the kernel; the 15-token prefill: XLA). test_generate.py's batch-composition
    and HF-oracle tests run through the kernel too."""
    cfg = nj.ModelConfig.preset("llama-tiny", vocab_size=97, d_model=48, d_ff=80, max_seq_len=24, n_layer=1)
    params = np_params(cfg, seed=7)
    prompts = np.random.default_rng(8).integers(0, 97, (3, 5)).tolist()
    out = nj.generate(params, cfg, prompts, max_new_tokens=8)
    with dense.fp32_kernel(False):
        ref = nj.generate(params, cfg, prompts, max_new_tokens=8)
    assert out == ref


@pytest.mark.parametrize("args,exc,match", [
    ((np.ones((1, 8, 2), np.float32), np.ones((8, 4), np.float32)), ValueError, r"need x \(M, I\)"),
    ((np.ones((1, 8), np.float32), np.ones((7, 4), np.float32)), ValueError, r"need x \(M, I\)"),
    ((np.ones((1, 8), np.float16), np.ones((8, 4), np.float32)), ValueError, "must be float32"),
    ((np.ones((33, 8), np.float32), np.ones((8, 4), np.float32)), ValueError, "takes 1..32"),
    ((np.ones((0, 8), np.float32), np.ones((8, 4), np.float32)), ValueError, "takes 1..32"),
])
def test_bad_inputs(kernels, args, exc, match):
    with pytest.raises(exc, match=match):
        ffi.fp32_matmul(*args)
    with pytest.raises(TypeError, match="True, False or None"):
        dense.fp32_kernel("off")
