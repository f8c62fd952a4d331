"""Model tests: shapes, causality, tied/untied heads, GQA against plain multi-head, RoPE."""

import functools
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import nanojax as nj
from nanojax.attention import attention
from nanojax.model import param_axes, param_shapes, rope
from nanojax.train import make_train_step

TINY_GPT = nj.ModelConfig(vocab_size=97, n_layer=2, n_head=4, d_model=32, max_seq_len=16)
TINY_LLAMA = nj.ModelConfig.preset("llama-tiny", vocab_size=97, max_seq_len=16)


# One compile per config and shape, instead of op-by-op dispatch (each op compiled on first use).
jit_forward = jax.jit(nj.forward, static_argnums=2)


def init(cfg, seed=0):
    """nj.init_params with an RBG key: its random kernels compile in half the time of the default
    threefry's (~1.5 s less per new config here); these tests need random values, not particular ones."""
    return nj.init_params(cfg, jax.random.key(seed, impl="rbg"))


def tokens(B=2, T=16, V=97, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, V, (B, T)), jnp.int32)


class ShapeTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_forward_shapes_and_dtype(self):
        for cfg in (TINY_GPT, TINY_LLAMA):
            params = init(cfg)
            fwd = self.variant(lambda p, t, cfg=cfg: nj.forward(p, t, cfg))
            logits = fwd(params, tokens(3, 11))
            chex.assert_shape(logits, (3, 11, 97))
            chex.assert_type(logits, jnp.float32)
            chex.assert_tree_all_finite(logits)

    @chex.variants(with_jit=True, without_jit=True)
    def test_bf16_compute(self):
        cfg = TINY_LLAMA.replace(dtype="bfloat16", param_dtype="bfloat16")
        params = init(cfg)
        chex.assert_trees_all_equal_dtypes(params, jax.tree.map(lambda x: x.astype(jnp.bfloat16), params))
        logits = self.variant(lambda p, t: nj.forward(p, t, cfg))(params, tokens())
        chex.assert_type(logits, jnp.float32)
        ref = jit_forward(jax.tree.map(lambda x: x.astype(jnp.float32), params), tokens(),
                          cfg.replace(dtype="float32", param_dtype="float32"))
        np.testing.assert_allclose(logits, ref, atol=0.05)


def test_param_tree_matches_specs_and_counts():
    for cfg in (TINY_GPT, TINY_LLAMA, TINY_LLAMA.replace(qkv_bias=True)):
        params = init(cfg)
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
    params = init(cfg, 1)
    a = tokens(2, 16, seed=1)
    for t in (0, 5, 15):
        b = a.at[:, t:].set((a[:, t:] + 7) % 97)
        la, lb = jit_forward(params, a, cfg), jit_forward(params, b, cfg)
        np.testing.assert_array_equal(la[:, :t], lb[:, :t])
        assert not np.allclose(la[:, t], lb[:, t])


def test_tied_and_untied_heads():
    tied = init(TINY_GPT)
    assert "lm_head" not in tied
    untied_cfg = TINY_GPT.replace(tie_embeddings=False)
    untied = init(untied_cfg)
    assert untied["lm_head"].shape == (32, 97)
    # Tied: the head is wte^T, so logits are the final hidden state dotted with each embedding.
    t = tokens()
    from nanojax.model import hidden_states, norm

    h, _ = hidden_states(tied, t, TINY_GPT)
    h = norm(tied["ln_f"], h, TINY_GPT)
    np.testing.assert_allclose(jit_forward(tied, t, TINY_GPT).reshape(-1, 97), h @ tied["wte"].T,
                               rtol=1e-5, atol=1e-5)
    # Untied: the head is lm_head; giving it wte^T reproduces the tied model exactly.
    same = dict(untied, **{k: v for k, v in tied.items()}, lm_head=tied["wte"].T)
    np.testing.assert_allclose(jit_forward(same, t, untied_cfg), jit_forward(tied, t, TINY_GPT),
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
    p = init(gqa_cfg, 3)
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
    params = init(TINY_LLAMA, 2)
    t = tokens(1, 10)
    pos = jnp.arange(10)[None]
    a = jit_forward(params, t, TINY_LLAMA, positions=pos)
    b = jit_forward(params, t, TINY_LLAMA, positions=pos + 5)
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    theta = TINY_LLAMA.replace(rope_theta=500000.0)
    assert not np.allclose(a, jit_forward(params, t, theta, positions=pos), atol=1e-4)


@pytest.mark.parametrize("theta", [10000.0, 500000.0])
def test_rope_matches_hf_llama_rotary_embedding(theta):
    """nanojax.model.rope on q (B, T, N, H) and k (B, T, K, H) equals transformers' Llama RoPE
    (LlamaRotaryEmbedding's cos/sin, apply_rotary_pos_emb on (B, N, T, H)): the half-split pairing,
    the frequencies and the sign of the rotation, at ragged positions up to ~2000."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from transformers.models.llama import modeling_llama as llama

    B, T, N, K, H = 2, 6, 4, 2, 16
    hf_cfg = transformers.LlamaConfig(hidden_size=N * H, num_attention_heads=N, num_key_value_heads=K,
                                      head_dim=H, max_position_embeddings=4096, rope_theta=theta)
    rng = np.random.default_rng(0)
    q = rng.normal(size=(B, T, N, H)).astype(np.float32)
    k = rng.normal(size=(B, T, K, H)).astype(np.float32)
    positions = np.stack([np.arange(T) + 3, np.sort(rng.choice(2000, T, replace=False))])  # (B, T)
    cos, sin = llama.LlamaRotaryEmbedding(hf_cfg)(torch.from_numpy(q), torch.from_numpy(positions))
    q_hf, k_hf = llama.apply_rotary_pos_emb(torch.from_numpy(q).transpose(1, 2),  # (B, N, T, H)
                                            torch.from_numpy(k).transpose(1, 2), cos, sin)
    pos = jnp.asarray(positions, jnp.int32)
    np.testing.assert_allclose(rope(jnp.asarray(q), pos, theta), q_hf.transpose(1, 2).numpy(), atol=1e-4)
    np.testing.assert_allclose(rope(jnp.asarray(k), pos, theta), k_hf.transpose(1, 2).numpy(), atol=1e-4)


# remat and scan_layers change the program, not the numbers: each variant's train step
# (nanojax.train.make_train_step, SGD at rate 1 so the update is minus the gradient) is traced,
# lowered, compiled and run once; the tests below read both the numbers and the program.
LAYER_VARIANTS = {"loop": {}, "remat": {"remat": "full"}, "scan": {"scan_layers": True},
                  "scan+remat": {"scan_layers": True, "remat": "full"}}


def _sub_jaxprs(eqn):
    for v in eqn.params.values():
        for j in v if isinstance(v, list | tuple) else (v,):
            if isinstance(j, jax.extend.core.ClosedJaxpr):
                yield j.jaxpr
            elif isinstance(j, jax.extend.core.Jaxpr):
                yield j


def all_equations(jaxpr):
    """Every equation of a (closed) jaxpr and of the jaxprs nested in it (jit, scan, remat...)."""
    for eqn in getattr(jaxpr, "jaxpr", jaxpr).eqns:
        yield eqn
        for sub in _sub_jaxprs(eqn):
            yield from all_equations(sub)


@functools.cache
def _remat_primitive():
    """The primitive jax.checkpoint stages out ('remat2' in jax 0.10), asked of jax itself."""
    return jax.make_jaxpr(jax.checkpoint(jnp.sin))(1.0).eqns[0].primitive


def layer_structure(jaxpr) -> tuple[int, list[int]]:
    """(remat equations run per call, each counted once per trip of the scans around it; the
    lengths of all scans) in a jaxpr and every jaxpr nested in it."""
    remat = _remat_primitive()
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    n_remat, scans = 0, []
    for eqn in jaxpr.eqns:
        trips = 1
        if eqn.primitive is remat:
            n_remat += 1
        elif eqn.primitive.name == "scan":
            trips = eqn.params["length"]
            scans.append(trips)
        for sub in _sub_jaxprs(eqn):
            r, s = layer_structure(sub)
            n_remat, scans = n_remat + trips * r, scans + s
    return n_remat, scans


def while_trip_counts(hlo_text: str) -> list[int]:
    """Known trip counts of the while loops in compiled HLO text (XLA's backend_config)."""
    return [int(n) for n in re.findall(r'"known_trip_count":\{"n":"(\d+)"\}', hlo_text)]


@pytest.fixture(scope="module", ids=["gpt", "llama"],
                params=[(TINY_GPT, ("loop", "scan+remat")), (TINY_LLAMA, tuple(LAYER_VARIANTS))])
def layer_variants(request):
    """For each of LAYER_VARIANTS: the forward and step jaxprs and the lowered step's text; for
    the variants named in the param (a compile costs 1-3 s here) also the compiled step's text
    and (loss, gradients) from one run of it."""
    base, compiled_names = request.param
    params = init(base)
    opt = optax.sgd(1.0)
    x, y = tokens(2, 8, seed=1)[None], tokens(2, 8, seed=2)[None]  # (A, B, T): one micro-batch
    args = (params, opt.init(params), x, y, np.int32(0))
    out = {}
    for name, flags in LAYER_VARIANTS.items():
        cfg = base.replace(**flags)
        traced = jax.jit(make_train_step(cfg, opt, seed=0)).trace(*args)
        lowered = traced.lower()
        v = out[name] = dict(cfg=cfg, step=traced.jaxpr, lowered=lowered.as_text())
        v["forward"] = jax.make_jaxpr(lambda p, t, c=cfg: nj.forward(p, t, c))(params, x[0])
        if name in compiled_names:
            # LLVM optimisation level 0 compiles ~40% faster; it changes the kernels' speed, not
            # the HLO read here, and every variant is compiled alike.
            compiled = lowered.compile({"xla_backend_optimization_level": 0})
            new_params, _, metrics = compiled(*args)
            v.update(compiled=compiled.as_text(), loss=metrics["loss"],
                     grads=jax.tree.map(lambda new, old: old - new, new_params, params))
    return out


def test_scan_layers_and_remat_match_the_loop(layer_variants):
    """The loss and every gradient leaf of the compiled remat / scan train steps equal the plain
    loop's (gpt: scan and remat together; llama: each alone and together)."""
    ref = layer_variants["loop"]
    compared = [name for name, v in layer_variants.items() if "loss" in v and name != "loop"]
    assert "scan+remat" in compared
    for name in compared:
        got = layer_variants[name]
        np.testing.assert_allclose(got["loss"], ref["loss"], rtol=1e-5, err_msg=name)
        chex.assert_trees_all_close(got["grads"], ref["grads"], rtol=1e-4, atol=1e-5)


def test_remat_and_scan_layers_show_in_the_program(layer_variants):
    """remat: one checkpoint per block in the forward and the step jaxprs and an optimization
    barrier in the lowered step; scan_layers: a scan of length L in the forward and two in the
    step (forward, backward), and XLA while loops of trip count L in the compiled step. Off: none.
    In compiled llama steps remat adds dots (the forward is recomputed in the backward)."""
    for name, v in layer_variants.items():
        L, remat, scan = v["cfg"].n_layer, v["cfg"].remat != "none", v["cfg"].scan_layers
        assert layer_structure(v["forward"]) == (L if remat else 0, [L] if scan else []), name
        assert layer_structure(v["step"]) == (L if remat else 0, [L, L] if scan else []), name
        assert ("optimization_barrier" in v["lowered"]) == remat, name
        if "compiled" in v:
            assert while_trip_counts(v["compiled"]) == ([L, L] if scan else []), name
    # Products recomputed: XLA's dots, and the CPU attention kernel's forward where it runs (it takes
    # the attention's dots: nanojax.kernels.cpu_attention).
    dots = {name: v["compiled"].count(" dot(") + v["compiled"].count('"nanojax_causal_attention_fwd"')
            for name, v in layer_variants.items() if "compiled" in v}
    if "remat" in dots:
        assert dots["remat"] > dots["loop"] and dots["scan+remat"] > dots["scan"], dots


@pytest.mark.parametrize("mlp,op", [("gelu", "tanh"), ("swiglu", "exponential")])  # silu: x / (1 + exp(-x))
def test_bf16_mlp_activation_runs_in_fp32(mlp, op):
    """In mixed precision the MLP's activation (and its bias add) runs in fp32, forward and
    backward, and only its result is bf16: XLA:CPU emulates bf16 elementwise math at several times
    the fp32 cost (nanojax/model.py, _plus_bias_f32)."""
    from conftest import np_params

    from nanojax.train.step import loss_fn

    cfg = nj.ModelConfig.preset("shakespeare-char-cpu", vocab_size=61, max_seq_len=16, n_layer=1,
                                d_model=32, n_head=2, bias=True, mlp=mlp, dtype="bfloat16")
    params = np_params(cfg, 0)
    x = jnp.zeros((2, 16), jnp.int32)
    text = jax.jit(jax.grad(lambda p: loss_fn(p, x, x, cfg))).lower(params).as_text()
    types = re.findall(rf"stablehlo\.{op} %\S+ : tensor<([^>]*)>", text)
    assert types and all(t.endswith("xf32") for t in types), types


def test_dense_custom_vjp_matches_autodiff():
    from nanojax.dense import matmul

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(6, 5)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(5, 3)), jnp.float32)
    f = lambda x, w: jnp.sum(jnp.sin(matmul(x, w)))  # noqa: E731
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
        nj.forward(init(TINY_GPT), tokens(1, 17), TINY_GPT)



def test_every_remat_policy_gives_the_same_loss_and_gradients():
    """Each ModelConfig.remat name puts its jax.checkpoint_policies policy on every block (read
    back from the jaxpr, asked what it saves: a dot with batch dims, one without, a named
    tensor) and changes no number against remat="none"."""
    from jax.ad_checkpoint import checkpoint_name

    cfg0 = TINY_LLAMA.replace(n_layer=1)
    params, x = init(cfg0), tokens(2, 8)
    dot = jax.make_jaxpr(lambda a, b: a @ b)(jnp.ones((2, 3)), jnp.ones((3, 4))).eqns[0]
    bdot = jax.make_jaxpr(lambda a, b: jnp.einsum("bij,bjk->bik", a, b))(jnp.ones((2, 2, 3)),
                                                                          jnp.ones((2, 3, 4))).eqns[0]
    named = jax.make_jaxpr(lambda a: checkpoint_name(a, "attn_context"))(jnp.ones(2)).eqns[0]
    other = jax.make_jaxpr(lambda a: checkpoint_name(a, "other"))(jnp.ones(2)).eqns[0]
    # what each policy keeps of (a plain dot, a batched dot, the name attn_context, another name)
    keeps = {"full": (False, False, False, False), "dots": (True, True, False, False),
             "dots_no_batch": (True, False, False, False), "names": (False, False, True, False)}

    def saves(policy, eqn):
        return bool(policy(eqn.primitive, *[v.aval for v in eqn.invars], **eqn.params))

    def loss(p, cfg):
        return nj.forward(p, x, cfg).mean()

    ref = jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, cfg0)
    remat = _remat_primitive()
    for name, expected in keeps.items():
        cfg = cfg0.replace(remat=name)
        eqns = [e for e in all_equations(jax.make_jaxpr(lambda p, c=cfg: loss(p, c))(params))
                if e.primitive is remat]
        assert len(eqns) == cfg.n_layer, name
        policy = eqns[0].params["policy"]
        assert tuple(saves(policy, e) for e in (dot, bdot, named, other)) == expected, name
        got = jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, cfg)
        chex.assert_trees_all_close(got, ref, rtol=1e-5, atol=1e-6)


def test_old_remat_booleans_load_as_policies(tmp_path):
    """config.json files written when remat was a bool: true is "full", false "none", both through
    ModelConfig.from_dict (load_checkpoint, load_hf) and the resume check of a workdir."""
    import json

    from nanojax.train.loop import _check_workdir

    assert nj.ModelConfig.from_dict({**TINY_GPT.to_dict(), "remat": True}).remat == "full"
    assert nj.ModelConfig.from_dict({**TINY_GPT.to_dict(), "remat": False}).remat == "none"
    assert nj.ModelConfig(remat=True) == nj.ModelConfig(remat="full")
    with pytest.raises(ValueError, match="remat='some'"):
        nj.ModelConfig(remat="some")
    (tmp_path / "config.json").write_text(json.dumps({"model": {**TINY_GPT.to_dict(), "remat": True}}))
    _check_workdir(tmp_path, TINY_GPT.replace(remat="full"))  # the same model: no error
