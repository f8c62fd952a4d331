"""Quantized weights (nanojax/quant): records against a numpy reference, the quantized model
against the same model with the dequantized weights, the int8 KV cache, save/load, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import np_params

import nanojax as nj
from nanojax.dense import dense, lookup
from nanojax.model import param_shapes
from nanojax.quant import (
    QuantizedMatrix,
    QuantizedTable,
    QuantizeError,
    dequantize,
    load_quantized,
    quantize,
    quantize_matrix,
    save_quantized,
    weight_bytes,
)

# ----------------------------------------------------------------------------------------------
# A numpy reference of the layout contract, written from the contract's text, not from arrays.py.


def ref_values(q: np.ndarray, bits: int) -> np.ndarray:
    """int values (O, I): int8 as is; int4 byte j -> element 2j (low nibble), 2j+1 (high), minus 8."""
    q = np.asarray(q)
    if bits == 8:
        return q.astype(np.int64)
    out = np.empty((q.shape[0], 2 * q.shape[1]), np.int64)
    out[:, 0::2] = (q & 0x0F).astype(np.int64) - 8
    out[:, 1::2] = (q >> 4).astype(np.int64) - 8
    return out


def ref_weight(rec: QuantizedMatrix) -> np.ndarray:
    """W (I, O) in float64: W[i, o] = value[o, i] * scale[o, i // G]."""
    v = ref_values(rec.q, rec.bits)
    s = np.asarray(rec.scale, np.float64)
    G = rec.group_size
    cols = np.arange(v.shape[1]) // G
    return (v * s[:, cols]).T


_dense = jax.jit(lambda x, w: dense(x, w, jnp.float32))
_forward = jax.jit(nj.forward, static_argnums=2)


CASES = [  # (bits, I, O, group): odd output counts, per-channel int8 over an odd I, all int4 groups
    (8, 37, 5, None), (8, 64, 33, 32), (8, 96, 7, None),
    (4, 32, 9, 32), (4, 128, 17, 64), (4, 256, 3, 128), (4, 96, 11, 32),
]


@pytest.mark.parametrize("bits,I,O,group", CASES)
@pytest.mark.parametrize("M", [1, 8])
def test_record_matmul_matches_numpy_reference(bits, I, O, group, M):
    rng = np.random.default_rng(I * O + bits)
    w = rng.standard_normal((I, O)).astype(np.float32)
    rec = quantize_matrix(w, bits, group)
    G = group or I
    assert rec.q.dtype == (jnp.int8 if bits == 8 else jnp.uint8)
    assert rec.q.shape == ((O, I) if bits == 8 else (O, I // 2)) and rec.scale.shape == (O, I // G)
    vals = ref_values(rec.q, bits)
    assert vals.min() >= (-127 if bits == 8 else -8) and vals.max() <= (127 if bits == 8 else 7)
    W = ref_weight(rec)
    # Round to nearest: every weight within half a step of its group's scale (int4: the side
    # opposite the extreme clips at +7 where the extreme took -8, so up to one step there).
    step = np.abs(np.repeat(np.asarray(rec.scale, np.float64), G, axis=1).T)  # (I, O)
    assert np.all(np.abs(W - w) <= (0.5 if bits == 8 else 1.0) * step + 1e-6)
    x = rng.standard_normal((M, I)).astype(np.float32)
    got = np.asarray(_dense(jnp.asarray(x), rec))
    np.testing.assert_allclose(got, x.astype(np.float64) @ W, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(np.asarray(rec.dequantize()), W, rtol=1e-6, atol=1e-6)


def test_int4_uses_all_sixteen_levels():
    """The group's signed extreme lands on -8 exactly (ggml Q4_0 rule), not on +-7."""
    w = np.linspace(-1.0, 0.5, 32, dtype=np.float32)[:, None]  # (I=32, O=1), extreme -1.0
    rec = quantize_matrix(w, 4, 32)
    v = ref_values(rec.q, 4)[0]
    assert v[0] == -8 and v.max() == 4 and float(rec.scale[0, 0]) == pytest.approx(0.125)


def test_table_lookup_dequantizes_only_gathered_rows():
    V, D = 50, 40
    table = np.random.default_rng(1).standard_normal((V, D)).astype(np.float32)
    rec = QuantizedTable(quantize_matrix(table.T, 8, None, shape=(D, V)))
    ids = jnp.asarray([[3, 49, 0], [7, 7, 1]], jnp.int32)
    full = ref_weight(rec.matrix).T  # (V, D)
    np.testing.assert_allclose(np.asarray(lookup(rec, ids, jnp.float32)), full[np.asarray(ids)], rtol=1e-6)
    assert rec.shape == (V, D)
    x = np.random.default_rng(2).standard_normal((4, D)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(dense(jnp.asarray(x), rec.T, jnp.float32)), x @ full.T,
                               rtol=1e-5, atol=1e-5)
    jaxpr = jax.make_jaxpr(lambda r, i: lookup(r, i, jnp.float32))(rec, ids)
    shapes = [tuple(v.aval.shape) for e in jaxpr.eqns for v in e.outvars
              if jnp.issubdtype(v.aval.dtype, jnp.floating)]
    assert shapes and all(np.prod(s) < V * D for s in shapes), shapes


# ----------------------------------------------------------------------------------------------
# The quantized model against the same model with dequantized float weights.

LLAMA = nj.ModelConfig.preset("llama-tiny", d_ff=128, vocab_size=96, max_seq_len=128)
GPT = nj.ModelConfig.preset("shakespeare-char-cpu", d_model=64, n_layer=2, n_head=2)  # tied, learned pos


@pytest.fixture(scope="module")
def models():
    out = {}
    for name, cfg in (("llama", LLAMA), ("gpt", GPT)):
        out[name] = (cfg, np_params(cfg, 3))
    return out


@pytest.mark.parametrize("name", ["llama", "gpt"])
@pytest.mark.parametrize("scheme,group", [("int8", None), ("int4", 32)])
def test_quantized_forward_matches_dequantized(models, name, scheme, group):
    cfg, params = models[name]
    q = quantize(params, cfg, scheme, group)
    assert isinstance(q["layers"][0]["attn"]["wo"], QuantizedMatrix)
    assert isinstance(q["wte"], QuantizedTable)
    assert q["ln_f"]["scale"] is params["ln_f"]["scale"]  # norms stay float
    if cfg.tie_embeddings:
        assert "lm_head" not in q and isinstance(q["wpe"], QuantizedTable)
    else:
        assert isinstance(q["lm_head"], QuantizedMatrix)
    toks = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 11)), jnp.int32)
    got = _forward(q, toks, cfg)
    want = _forward(dequantize(q), toks, cfg)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=1e-5)
    ref = _forward(params, toks, cfg)  # and quantization moved the logits only a little
    assert float(jnp.abs(got - ref).max()) < (0.02 if scheme == "int8" else 0.1)


def test_generate_takes_quantized_params(models):
    """Quantized weights and the int8 KV cache together: the same tokens as the dequantized
    weights with the same cache."""
    cfg, params = models["llama"]
    q = quantize(params, cfg, "int4")
    prompts = [[1, 2, 3], [5, 6, 7, 8, 9]]
    out = nj.generate(q, cfg, prompts, 6, kv_cache_dtype="int8")
    assert out == nj.generate(dequantize(q), cfg, prompts, 6, kv_cache_dtype="int8")


def test_weight_bytes_of_the_quickstart_shape():
    cfg = nj.ModelConfig.preset("shakespeare-char-cpu")
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32),
                          param_shapes(cfg))
    base = weight_bytes(params)
    assert weight_bytes(quantize(params, cfg, "int8")) <= 0.27 * base
    assert weight_bytes(quantize(params, cfg, "int4", 32)) <= 0.16 * base


def test_save_and_load_restore_the_same_records(models, tmp_path):
    cfg, params = models["gpt"]
    q = quantize(params, cfg, "int4", 32)
    save_quantized(q, cfg, tmp_path / "q")
    cfg2, q2, tok = load_quantized(tmp_path / "q")
    assert cfg2 == cfg and tok is None
    assert jax.tree.structure(q2) == jax.tree.structure(q)  # same record types and static fields
    for a, b in zip(jax.tree.leaves(q), jax.tree.leaves(q2), strict=True):
        assert a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b))


# ----------------------------------------------------------------------------------------------
# int8 KV cache


def test_int8_kv_cache_close_to_float_cache(models):
    cfg, params = models["llama"]
    params = jax.tree.map(lambda x: x * 4.0 if x.ndim > 1 else x, params)  # peaked logits: greedy is stable
    prompts = [[1, 2, 3, 4], [9, 8, 7, 6, 5, 4, 3]]
    a, la = nj.generate(params, cfg, prompts, 24, return_logits=True)
    b, lb = nj.generate(params, cfg, prompts, 24, return_logits=True, kv_cache_dtype="int8")
    same = np.mean([x == y for ra, rb in zip(a, b, strict=True) for x, y in zip(ra, rb, strict=True)])
    assert same >= 0.9, (a, b)
    # Until the first differing token both runs saw the same inputs: logits agree to int8 noise.
    for ra, rb, xa, xb in zip(a, b, la, lb, strict=True):
        n = next((i for i, (x, y) in enumerate(zip(ra, rb, strict=True)) if x != y), len(ra)) + 1
        scale = float(np.abs(xa[:n]).max())
        err = float(np.abs(xa[:n] - xb[:n]).max())
        assert 0 < err < 0.02 * scale, (err, scale)


# ----------------------------------------------------------------------------------------------
# Bad input: a clear error, nothing half-done.


def test_bad_requests(models):
    cfg, params = models["llama"]
    with pytest.raises(QuantizeError, match=r"unknown quantization scheme 'int3'.*int8, int4"):
        quantize(params, cfg, "int3")
    odd = nj.ModelConfig.preset("llama-tiny")  # mlp 176: not a multiple of 32
    odd_params = np_params(odd, 0)
    with pytest.raises(QuantizeError, match=r"group_size=32 does not divide the input dim I=176 of "
                                            r"layers\[0\]\.mlp\.w_down"):
        quantize(odd_params, odd, "int4", 32)
    with pytest.raises(QuantizeError, match=r"int4 group_size must be one of \(32, 64, 128\), got 48"):
        quantize(params, cfg, "int4", 48)
    q = quantize(params, cfg, "int8")
    with pytest.raises(QuantizeError, match=r"already quantized \(16 records, e.g. at \['layers'\]\[0\]"):
        quantize(q, cfg, "int4")
    assert isinstance(params["layers"][0]["attn"]["wq"], jax.Array)  # the input tree is untouched
    with pytest.raises(ValueError, match=r"kv_cache_dtype must be one of \(None, 'int8'\).*'int4'"):
        nj.generate(params, cfg, [[1]], 2, kv_cache_dtype="int4")
    with pytest.raises(ValueError, match=r"kv_cache_dtype='int8' with attn_impl='pallas'"):
        nj.generate(params, cfg.replace(attn_impl="pallas"), [[1]], 2, kv_cache_dtype="int8")
    with pytest.raises(FileNotFoundError, match="not a quantized model directory"):
        load_quantized(".")
