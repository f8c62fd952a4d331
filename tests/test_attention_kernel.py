"""The CPU decode-attention kernel (nanojax/quant/csrc/dattn.cc, ffi.decode_attention) behind the
serving engine's decode chunk: against a float64 numpy oracle (grouped-query heads, every row its
own slot and length, both ISA paths), row results independent of the batch, bad shapes refused,
and the engine's greedy tokens equal with the kernel on and off."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest


def _oracle(q, k, v, rows, lens, K, starts=None):
    R, N, H = q.shape
    G, C = N // K, k.shape[1]
    out = np.zeros((R, N, H))
    for r in range(R):
        end = min(max(int(lens[r]), 1), C)
        start = 0 if starts is None else min(max(int(starts[r]), 0), end - 1)
        for n in range(N):
            kk = k[rows[r] * K + n // G, start:end].astype(np.float64)
            vv = v[rows[r] * K + n // G, start:end].astype(np.float64)
            s = kk @ q[r, n].astype(np.float64) / np.sqrt(H)
            p = np.exp(s - s.max())
            out[r, n] = (p / p.sum()) @ vv
    return out


def _case(H, seed=0, R=4, N=6, K=2, S=5, C=40):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((R, N, H)).astype(np.float32)
    k = rng.standard_normal((S * K, C, H)).astype(np.float32)
    v = rng.standard_normal((S * K, C, H)).astype(np.float32)
    rows = np.array([4, 0, 2, 0], np.int32)[:R]
    lens = np.array([1, C, 17, C + 9], np.int32)[:R]  # one position, all, some, past C (clamped)
    return q, k, v, rows, lens, K


@pytest.mark.parametrize("H,isa,starts", [(32, "avx512", None), (32, "scalar", None), (24, "avx512", None),
                                          (32, "avx512", [0, 5, 16, 50]), (32, "scalar", [0, 5, 16, 50])],
                         ids=["avx512", "scalar", "odd-head-size", "avx512-starts", "scalar-starts"])
def test_decode_attention_matches_numpy(kernels, monkeypatch, H, isa, starts):
    # starts (generate's left padding): from 0, inside, the last position, past lens (clamped)
    monkeypatch.setenv("NANOJAX_KERNEL_ISA", isa)  # read at each call; H % 16 != 0 is always scalar
    q, k, v, rows, lens, K = _case(H)
    st = None if starts is None else jnp.asarray(starts, jnp.int32)
    out = np.asarray(kernels.decode_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v),
                                              jnp.asarray(rows), jnp.asarray(lens), K, starts=st))
    np.testing.assert_allclose(out, _oracle(q, k, v, rows, lens, K, starts), rtol=2e-5, atol=2e-5)


def test_a_rows_result_does_not_depend_on_the_batch(kernels):
    q, k, v, rows, lens, K = _case(32, seed=1)
    f = jax.jit(lambda q, r, n: kernels.decode_attention(q, jnp.asarray(k), jnp.asarray(v), r, n, K))
    batch = np.asarray(f(q, rows, lens))
    for r in range(len(rows)):
        alone = np.asarray(f(q[r:r + 1], rows[r:r + 1], lens[r:r + 1]))
        np.testing.assert_array_equal(alone[0], batch[r])


def test_decode_attention_refuses_bad_shapes(kernels):
    q, k, v, rows, lens, K = _case(32)
    with pytest.raises(ValueError, match="kv_heads"):
        kernels.decode_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), rows, lens, 4)
    with pytest.raises(ValueError, match="float32"):
        kernels.decode_attention(jnp.asarray(q, jnp.bfloat16), jnp.asarray(k), jnp.asarray(v), rows, lens, K)


def test_engine_and_generate_through_the_kernel_equal_xla(kernels):
    # Head size 16: the kernel's AVX-512 loop where the CPU has it (checked); tests/test_scheduler.py's
    # engine (head size 8) runs XLA's window path against the same oracle. generate's decode loop
    # takes the kernel too, with its left padding as each row's start (prompts 3, 21, 9 in one batch).
    from conftest import np_params

    import nanojax as nj
    from nanojax.infer import slots as SL
    from nanojax.infer.scheduler import Engine, SamplingParams

    cfg = nj.ModelConfig(vocab_size=61, n_layer=2, n_head=4, n_kv_head=2, d_model=64, d_ff=96, max_seq_len=64,
                         pos_emb="rope", norm="rmsnorm", mlp="swiglu", bias=False, tie_embeddings=False,
                         init_std=0.2)
    params = np_params(cfg, 3)
    rng = np.random.default_rng(4)
    prompts = [rng.integers(0, cfg.vocab_size, n).tolist() for n in (3, 21, 9)]
    want = nj.generate(params, cfg.replace(attn_impl="xla"), prompts, max_new_tokens=12)  # XLA's dots
    np.testing.assert_array_equal(nj.generate(params, cfg, prompts, max_new_tokens=12), want)
    avx512 = kernels.kernels_info()["vector_bits"] == 512
    assert SL.use_attention_kernel(cfg, SL.new_cache(cfg, 1, None)) == avx512
    eng = Engine(params, cfg, None, slots=2, max_queue=8, chunk_size=4, prefix_cache_tokens=0).start()
    try:
        reqs = [eng.submit(p, SamplingParams(max_tokens=12, temperature=0.0)) for p in prompts]
        got = [[t for ev in r for t in ev.token_ids] for r in reqs]
    finally:
        eng.shutdown(drain=False, timeout=30)
    assert got == [list(w) for w in want]
