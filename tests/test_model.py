"""Model tests: shapes, causality, tied/untied heads, GQA against plain multi-head, RoPE."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nanojax as nj
from nanojax.attention import attention
from nanojax.model import param_axes, param_shapes

TINY_GPT = nj.ModelConfig(vocab_size=97, n_layer=2, n_head=4, d_model=32, max_seq_len=16)
TINY_LLAMA = nj.ModelConfig.preset("llama-tiny", vocab_size=97, max_seq_len=16)


def tokens(B=2, T=16, V=97, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, V, (B, T)), jnp.int32)


class ShapeTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_forward_shapes_and_dtype(self):
        for cfg in (TINY_GPT, TINY_LLAMA):
            params = nj.init_params(cfg, jax.random.key(0))
            fwd = self.variant(lambda p, t, cfg=cfg: nj.forward(p, t, cfg))
            logits = fwd(params, tokens(3, 11))
            chex.assert_shape(logits, (3, 11, 97))
            chex.assert_type(logits, jnp.float32)
            chex.assert_tree_all_finite(logits)

    @chex.variants(with_jit=True, without_jit=True)
    def test_bf16_compute(self):
        cfg = TINY_LLAMA.replace(dtype="bfloat16", param_dtype="bfloat16")
        params = nj.init_params(cfg, jax.random.key(0))
        chex.assert_trees_all_equal_dtypes(params, jax.tree.map(lambda x: x.astype(jnp.bfloat16), params))
        logits = self.variant(lambda p, t: nj.forward(p, t, cfg))(params, tokens())
        chex.assert_type(logits, jnp.float32)
        ref = nj.forward(jax.tree.map(lambda x: x.astype(jnp.float32), params), tokens(),
                         cfg.replace(dtype="float32", param_dtype="float32"))
        np.testing.assert_allclose(logits, ref, atol=0.05)


def test_param_tree_matches_specs_and_counts():
    for cfg in (TINY_GPT, TINY_LLAMA, TINY_LLAMA.replace(qkv_bias=True)):
        params = nj.init_params(cfg, jax.random.key(0))
        shapes = jax.tree.map(lambda s: s.shape, param_shapes(cfg))
        assert jax.tree.map(lambda x: x.shape, params) == shapes
        axes = param_axes(cfg)
        jax.tree.map(lambda x, a: (len(a) == x.ndim) or pytest.fail(f"axes {a} for shape {x.shape}"),
                     params, axes, is_leaf=lambda a: isinstance(a, tuple))
        assert sum(x.size for x in jax.tree.leaves(params)) == cfg.num_params()
    # GPT-2 small has the well-known 124,439,808 parameters (tied head, 1024 positions).
    assert nj.ModelConfig.preset("gpt2-small").num_params() == 124_439_808


@pytest.mark.parametrize("cfg", [TINY_GPT, TINY_LLAMA], ids=["gpt", "llama"])
def test_causality(cfg):
    """Changing future tokens never changes the logits of earlier positions."""
    params = nj.init_params(cfg, jax.random.key(1))
    a = tokens(2, 16, seed=1)
    for t in (0, 5, 15):
        b = a.at[:, t:].set((a[:, t:] + 7) % 97)
        la, lb = nj.forward(params, a, cfg), nj.forward(params, b, cfg)
        np.testing.assert_array_equal(la[:, :t], lb[:, :t])
        assert not np.allclose(la[:, t], lb[:, t])


def test_tied_and_untied_heads():
    tied = nj.init_params(TINY_GPT, jax.random.key(0))
    assert "lm_head" not in tied
    untied_cfg = TINY_GPT.replace(tie_embeddings=False)
    untied = nj.init_params(untied_cfg, jax.random.key(0))
    assert untied["lm_head"].shape == (32, 97)
    # Tied: the head is wte^T, so logits are the final hidden state dotted with each embedding.
    t = tokens()
    from nanojax.model import hidden_states, norm

    h, _ = hidden_states(tied, t, TINY_GPT)
    h = norm(tied["ln_f"], h, TINY_GPT)
    np.testing.assert_allclose(nj.forward(tied, t, TINY_GPT).reshape(-1, 97), h @ tied["wte"].T,
                               rtol=1e-5, atol=1e-5)
    # Untied: the head is lm_head; giving it wte^T reproduces the tied model exactly.
    same = dict(untied, **{k: v for k, v in tied.items()}, lm_head=tied["wte"].T)
    np.testing.assert_allclose(nj.forward(same, t, untied_cfg), nj.forward(tied, t, TINY_GPT),
                               rtol=1e-6, atol=1e-6)


def naive_attention(q, k, v):
    """Plain multi-head causal attention in numpy, float64, one head at a time."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    B, T, N, H = q.shape
    out = np.zeros_like(q)
    for b in range(B):
        for n in range(N):
            s = q[b, :, n] @ k[b, :, n].T / np.sqrt(H)
            s = np.where(np.tril(np.ones((T, T), bool)), s, -np.inf)
            p = np.exp(s - s.max(-1, keepdims=True))
            out[b, :, n] = (p / p.sum(-1, keepdims=True)) @ v[b, :, n]
    return out


def test_gqa_attention_matches_plain_multihead():
    rng = np.random.default_rng(0)
    B, T, N, K, H = 2, 7, 6, 2, 8
    q = rng.normal(size=(B, T, N, H)).astype(np.float32)
    k = rng.normal(size=(B, T, K, H)).astype(np.float32)
    v = rng.normal(size=(B, T, K, H)).astype(np.float32)
    # GQA: query head n uses kv head n // (N // K); the reference repeats the kv heads.
    ref = naive_attention(q, np.repeat(k, N // K, axis=2), np.repeat(v, N // K, axis=2))
    np.testing.assert_allclose(attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)), ref,
                               rtol=1e-5, atol=1e-5)


def test_gqa_model_equals_mha_model_with_repeated_kv():
    gqa_cfg = TINY_LLAMA  # 4 query heads over 2 kv heads
    mha_cfg = TINY_LLAMA.replace(n_kv_head=4)
    p = nj.init_params(gqa_cfg, jax.random.key(3))
    G = gqa_cfg.n_head // gqa_cfg.kv_heads
    mha = jax.tree.map(lambda x: x, p)
    mha["layers"] = [
        dict(lp, attn=dict(lp["attn"], wk=jnp.repeat(lp["attn"]["wk"], G, axis=1),
                           wv=jnp.repeat(lp["attn"]["wv"], G, axis=1)))
        for lp in p["layers"]
    ]
    t = tokens()
    np.testing.assert_allclose(nj.forward(p, t, gqa_cfg), nj.forward(mha, t, mha_cfg), rtol=1e-5, atol=1e-5)


def test_rope_depends_only_on_relative_position():
    params = nj.init_params(TINY_LLAMA, jax.random.key(2))
    t = tokens(1, 10)
    pos = jnp.arange(10)[None]
    a = nj.forward(params, t, TINY_LLAMA, positions=pos)
    b = nj.forward(params, t, TINY_LLAMA, positions=pos + 5)
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    theta = TINY_LLAMA.replace(rope_theta=500000.0)
    assert not np.allclose(a, nj.forward(params, t, theta, positions=pos), atol=1e-4)


def test_scan_layers_and_remat_match_the_loop():
    t = tokens()
    for cfg in (TINY_GPT, TINY_LLAMA):
        params = nj.init_params(cfg, jax.random.key(0))
        ref = nj.forward(params, t, cfg)
        for variant in (cfg.replace(scan_layers=True), cfg.replace(remat=True)):
            np.testing.assert_allclose(jax.jit(nj.forward, static_argnums=2)(params, t, variant), ref,
                                       rtol=1e-5, atol=1e-5)
            g_ref = jax.grad(lambda p, c=cfg: nj.forward(p, t, c).sum())(params)
            g = jax.grad(lambda p, c=variant: nj.forward(p, t, c).sum())(params)
            chex.assert_trees_all_close(g, g_ref, rtol=1e-4, atol=1e-5)


def test_dense_custom_vjp_matches_autodiff():
    from nanojax.model import dense

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(6, 5)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(5, 3)), jnp.float32)
    f = lambda x, w: jnp.sum(jnp.sin(dense(x, w)))  # noqa: E731
    g = lambda x, w: jnp.sum(jnp.sin(x @ w))  # noqa: E731
    chex.assert_trees_all_close(jax.grad(f, (0, 1))(x, w), jax.grad(g, (0, 1))(x, w), rtol=1e-6)


def test_config_errors_are_clear():
    with pytest.raises(ValueError, match="n_kv_head=3 must divide n_head=4"):
        nj.ModelConfig(n_head=4, d_model=32, n_kv_head=3)
    with pytest.raises(ValueError, match=r"Unknown ModelConfig field\(s\) \['n_layers'\]"):
        nj.ModelConfig.from_dict({"n_layers": 3})
    with pytest.raises(ValueError, match="Unknown preset 'gpt5'"):
        nj.ModelConfig.preset("gpt5")
    with pytest.raises(ValueError, match="not divisible by n_head"):
        nj.ModelConfig(n_head=5, d_model=32)
    with pytest.raises(ValueError, match="exceeds max_seq_len=16"):
        nj.forward(nj.init_params(TINY_GPT, jax.random.key(0)), tokens(1, 17), TINY_GPT)
