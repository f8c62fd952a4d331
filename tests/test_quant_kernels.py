"""The C++ quantized-matmul kernels (nanojax/quant/csrc) against a float64 numpy product of the
dequantized weights and against the pure-JAX path; the fallback when they cannot be built.

The numpy oracle unpacks the layout contract itself (out-major, low nibble = even element, value + 8),
so a kernel and a pure-JAX path that agree on a wrong layout still fail here.
"""

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nanojax.quant import ffi

HAVE_CXX = shutil.which("g++") is not None


def make(scheme, M, I, O, G, dtype, seed=0):
    """Random x, packed q, scales, and the float64 numpy product x @ W (the oracle)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((M, I)).astype(np.float32)
    scale = rng.uniform(0.005, 0.05, (O, I // G)).astype(np.float32)
    if scheme == "int8":
        q = rng.integers(-127, 128, (O, I), dtype=np.int8)
        vals = q.astype(np.float64)
    else:
        q = rng.integers(0, 256, (O, I // 2), dtype=np.uint8)
        vals = np.empty((O, I))
        vals[:, 0::2] = (q & 15).astype(np.float64) - 8  # element 2j: low nibble
        vals[:, 1::2] = (q >> 4).astype(np.float64) - 8  # element 2j+1: high nibble
    w = vals * np.repeat(scale.astype(np.float64), G, axis=1)  # (O, I)
    xj = jnp.asarray(x, dtype)
    want = np.asarray(xj, np.float64) @ w.T  # (M, O)
    return xj, jnp.asarray(q), jnp.asarray(scale), want


FNS = {"int8": (ffi.int8_matmul, ffi.int8_matmul_reference),
       "int4": (ffi.int4_matmul, ffi.int4_matmul_reference)}

# (scheme, M, I, O, G): odd O everywhere; I a multiple of the group but not of 64; per-channel int8
# with an odd I (masked tails); M = 1 (decode), 8 (a full block of rows), 11 (blocks of 8 + 2 + 1).
CASES = [
    ("int8", 1, 96, 33, 96),
    ("int8", 8, 160, 7, 32),
    ("int8", 11, 37, 9, 37),
    ("int8", 1, 1056, 65, 32),
    ("int4", 1, 96, 33, 32),
    ("int4", 8, 320, 17, 64),
    ("int4", 11, 384, 5, 128),
    ("int4", 1, 1056, 129, 32),
]


def round_x_q8(x: np.ndarray) -> np.ndarray:
    """x (M, I) float32 rounded as the VNNI loops do: per 32-block, scale amax / 127, round half even."""
    M, I = x.shape
    b = x.reshape(M, I // 32, 32)
    amax = np.abs(b).max(-1, keepdims=True)
    inv = np.where(amax > 0, np.float32(127) / amax, 0).astype(np.float32)
    return (np.rint(b * inv) * (amax / np.float32(127))).reshape(M, I).astype(np.float64)


def _uses_kernel(fn, *args) -> bool:
    return "nanojax_int" in jax.jit(fn, static_argnums=3).lower(*args).as_text()


@pytest.mark.parametrize("isa", ["avx512", "avx2", "scalar"])
@pytest.mark.parametrize("scheme,M,I,O,G", CASES)
def test_kernel_matches_numpy_and_pure_jax(kernels, monkeypatch, isa, scheme, M, I, O, G):
    monkeypatch.setenv("NANOJAX_KERNEL_ISA", isa)  # read by the kernel at each call
    fn, ref = FNS[scheme]
    x, q, scale, want = make(scheme, M, I, O, G, jnp.float32)
    assert _uses_kernel(fn, x, q, scale, G)
    got = np.asarray(fn(x, q, scale, G))
    assert got.shape == (M, O) and got.dtype == np.float32
    tol = 2e-6 * np.sqrt(I) * np.abs(want).max()  # fp32 sums of I terms
    np.testing.assert_allclose(got, want, rtol=0, atol=tol)
    np.testing.assert_allclose(got, np.asarray(ref(x, q, scale, G)), rtol=0, atol=tol)


@pytest.mark.parametrize("scheme,M,I,O,G", [c for c in CASES if c[2] % 32 == 0])
def test_int8_activations_vnni(kernels, scheme, M, I, O, G):
    """activations="int8": the product of the weights with x rounded to int8 per 32-block, exactly
    (to fp32 sums) where the CPU has VNNI, else the exact fp32 product; never worse than the bound."""
    fn, _ = FNS[scheme]
    x, q, scale, want = make(scheme, M, I, O, G, jnp.float32, seed=5)
    got = np.asarray(fn(x, q, scale, G, activations="int8"))
    w = _weights(scheme, q, scale, G)
    xq = round_x_q8(np.asarray(x))
    tol = 2e-6 * np.sqrt(I) * np.abs(want).max()
    if ffi.kernels_info()["vnni"]:
        np.testing.assert_allclose(got, xq @ w.T, rtol=0, atol=tol)
        assert np.abs(got - want).max() > tol  # the rounding is really there
    else:
        np.testing.assert_allclose(got, want, rtol=0, atol=tol)
    bound = np.abs(np.asarray(x, np.float64) - xq) @ np.abs(w).T  # (M, O): sum_i |dx_i| |w_i|
    assert np.all(np.abs(got - want) <= bound + tol)


def _weights(scheme, q, scale, G) -> np.ndarray:
    """W (O, I) float64 from packed q and scales, by the contract."""
    q, scale = np.asarray(q), np.asarray(scale, np.float64)
    if scheme == "int8":
        vals = q.astype(np.float64)
    else:
        vals = np.empty((q.shape[0], 2 * q.shape[1]))
        vals[:, 0::2] = (q & 15).astype(np.float64) - 8
        vals[:, 1::2] = (q >> 4).astype(np.float64) - 8
    return vals * np.repeat(scale, G, axis=1)


@pytest.mark.parametrize("scheme,M,I,O,G", [CASES[1], CASES[5]])
def test_kernel_bfloat16_x(kernels, scheme, M, I, O, G):
    """bf16 x: widened to fp32, accumulated in fp32, rounded once to bf16, like the pure-JAX path."""
    fn, ref = FNS[scheme]
    x, q, scale, want = make(scheme, M, I, O, G, jnp.bfloat16, seed=1)
    got = fn(x, q, scale, G)
    assert got.dtype == jnp.bfloat16 and _uses_kernel(fn, x, q, scale, G)
    got = np.asarray(got, np.float64)
    np.testing.assert_allclose(got, want, rtol=2 ** -8, atol=1e-6 * np.abs(want).max())
    # Same fp32 sum up to order, so at most one bf16 rounding step apart.
    np.testing.assert_allclose(got, np.asarray(ref(x, q, scale, G), np.float64), rtol=2 ** -7)
    # bf16 scales are read as stored
    got_bs = fn(x, q, scale.astype(jnp.bfloat16), G)
    np.testing.assert_allclose(np.asarray(got_bs, np.float64),
                               np.asarray(ref(x, q, scale.astype(jnp.bfloat16), G), np.float64), rtol=2 ** -7)


def test_kernel_inside_jit_while_loop_and_vmap(kernels):
    """The custom call gives the same bits eagerly, under jit, inside a while_loop and under vmap."""
    x, q, scale, _ = make("int4", 6, 128, 31, 32, jnp.float32, seed=2)
    eager = [ffi.int4_matmul(x[i:i + 1], q, scale, 32) for i in range(6)]

    @jax.jit
    def loop(x, q, scale):
        def body(c):
            i, out = c
            y = ffi.int4_matmul(jax.lax.dynamic_slice_in_dim(x, i, 1), q, scale, 32)
            return i + 1, jax.lax.dynamic_update_slice_in_dim(out, y, i, 0)
        return jax.lax.while_loop(lambda c: c[0] < 6, body, (0, jnp.zeros((6, 31), jnp.float32)))[1]

    assert "nanojax_int4" in loop.lower(x, q, scale).as_text()
    np.testing.assert_array_equal(np.asarray(loop(x, q, scale)), np.concatenate(eager))
    jitted = jax.jit(ffi.int4_matmul, static_argnums=3)(x[:1], q, scale, 32)
    np.testing.assert_array_equal(np.asarray(jitted), np.asarray(eager[0]))
    vm = jax.vmap(lambda r: ffi.int4_matmul(r[None], q, scale, 32)[0])(x)
    np.testing.assert_array_equal(np.asarray(vm), np.concatenate(eager))


def test_large_m_takes_the_xla_path(kernels):
    """Prefill-sized M goes to dequantize + XLA's dot, with the same numbers."""
    M = ffi.KERNEL_MAX_ROWS + 1
    x, q, scale, want = make("int8", M, 64, 9, 64, jnp.float32, seed=3)
    assert not _uses_kernel(ffi.int8_matmul, x, q, scale, 64)
    np.testing.assert_allclose(np.asarray(ffi.int8_matmul(x, q, scale, 64)), want, rtol=1e-5, atol=1e-5)


def test_every_kernel_source_is_in_the_build_hash():
    """The cached library is keyed by a hash of ffi.SOURCES: a file of csrc/ missing from it (an
    included .inc or .h) could change while a stale build is still loaded."""
    on_disk = sorted(p.name for p in ffi.CSRC.iterdir() if p.suffix in (".cc", ".h", ".inc"))
    assert sorted(ffi.SOURCES) == on_disk


@pytest.fixture
def fresh_loader(monkeypatch, tmp_path):
    """A loader that has not tried yet, building into an empty cache; restored afterwards."""
    monkeypatch.setenv("NANOJAX_KERNEL_CACHE", str(tmp_path / "cache"))
    ffi._reset_for_tests()
    yield monkeypatch
    monkeypatch.undo()
    ffi._reset_for_tests()


@pytest.mark.parametrize("how", ["env", "no_compiler", "compile_error"])
def test_fallback_warns_once_and_gives_the_same_numbers(fresh_loader, tmp_path, how):
    if how == "env":
        fresh_loader.setenv("NANOJAX_NO_KERNELS", "1")
        why = "NANOJAX_NO_KERNELS"
    elif how == "no_compiler":
        fresh_loader.setenv("CXX", "no-such-g++")
        why = "no C\\+\\+ compiler"
    else:  # a source that does not compile: the loader must report g++'s failure, not crash
        if not HAVE_CXX:
            pytest.skip("needs g++ to fail a compile")
        bad = tmp_path / "csrc"
        bad.mkdir()
        for name in ffi.SOURCES[1:]:  # empty: g++ would compile every other unit before failing
            (bad / name).write_text("")
        (bad / "qmatmul.cc").write_text("this is not C++\n")
        fresh_loader.setattr(ffi, "CSRC", bad)
        why = "failed \\(exit"
    x8, q8, s8, want8 = make("int8", 2, 64, 5, 32, jnp.float32, seed=4)
    x4, q4, s4, want4 = make("int4", 2, 64, 5, 32, jnp.float32, seed=4)
    with pytest.warns(RuntimeWarning, match=f"kernels unavailable.*{why}") as rec:
        y8 = ffi.int8_matmul(x8, q8, s8, 32)
        y4 = ffi.int4_matmul(x4, q4, s4, 32)
    assert len([w for w in rec if "kernels unavailable" in str(w.message)]) == 1  # once, not per call
    assert not ffi.kernels_available()
    assert not _uses_kernel(ffi.int8_matmul, x8, q8, s8, 32)
    np.testing.assert_allclose(np.asarray(y8), want8, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(y4), want4, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("call,match", [
    (lambda: ffi.int8_matmul(jnp.ones((1, 64)), jnp.ones((5, 64), jnp.int8), jnp.ones((5, 2)), 48),
     "group_size 48 must divide I = 64"),
    (lambda: ffi.int8_matmul(jnp.ones((1, 64)), jnp.ones((5, 64), jnp.uint8), jnp.ones((5, 2)), 32),
     "q must be a 2-D int8"),
    (lambda: ffi.int4_matmul(jnp.ones((1, 64)), jnp.ones((5, 64), jnp.uint8), jnp.ones((5, 2)), 32),
     r"expected \(O, 32\)"),
    (lambda: ffi.int4_matmul(jnp.ones((1, 64)), jnp.ones((5, 32), jnp.uint8), jnp.ones((5, 4)), 16),
     "multiple of 32"),
    (lambda: ffi.int8_matmul(jnp.ones((1, 64), jnp.int32), jnp.ones((5, 64), jnp.int8), jnp.ones((5, 1)), 64),
     "float32 or bfloat16"),
    (lambda: ffi.int8_matmul(jnp.ones((1, 64)), jnp.ones((5, 64), jnp.int8), jnp.ones((5, 2)), 64),
     r"scale must be float32/bfloat16 of shape \(5, 1\)"),
    (lambda: ffi.int8_matmul(jnp.ones((64,)), jnp.ones((5, 64), jnp.int8), jnp.ones((5, 1)), 64),
     "x must be 2-D"),
])
def test_bad_inputs(call, match):
    with pytest.raises(ValueError, match=match):
        call()
