"""GGUF import (nanojax/interop/gguf.py) against transformers reading the same file (`gguf_file=`,
which dequantizes), and the bad files the importer must refuse."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from conftest import np_params  # noqa: E402

import nanojax as nj  # noqa: E402
from nanojax.interop.gguf import GGUFFormatError, load_gguf, write_gguf  # noqa: E402
from nanojax.quant import QuantizedMatrix, QuantizedTable  # noqa: E402


@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory):
    """A tiny random HF Llama (GQA, untied head), saved, and its nanojax float params."""
    d = tmp_path_factory.mktemp("hf_llama")
    hc = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                  tie_word_embeddings=False, rope_theta=10000.0)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(hc).save_pretrained(d)
    cfg, params = nj.load_hf(d)
    return d, cfg, params


@pytest.mark.parametrize("qtype,head", [("F32", None), ("Q8_0", None), ("Q4_0", None), ("Q4_0", "Q8_0")])
def test_gguf_matches_transformers(hf_llama, qtype, head):
    d, cfg, params = hf_llama
    name = f"m_{qtype}_{head}.gguf"
    write_gguf(params, cfg, d / name, qtype, head_qtype=head)
    hf = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=name).eval()
    cfg2, p2 = load_gguf(d / name)
    assert cfg2.replace(max_seq_len=cfg.max_seq_len) == cfg
    wq = p2["layers"][1]["attn"]["wq"]
    if qtype == "F32":
        assert isinstance(wq, jax.Array) and wq.shape == (64, 4, 16)
    else:
        assert isinstance(wq, QuantizedMatrix) and wq.group_size == 32
        assert wq.bits == (8 if qtype == "Q8_0" else 4) and isinstance(p2["wte"], QuantizedTable)
        assert p2["lm_head"].bits == (8 if (head or qtype) == "Q8_0" else 4)
    toks = np.random.default_rng(0).integers(0, 96, (2, 12))
    with torch.no_grad():
        ref = hf(torch.tensor(toks)).logits.numpy()
    got = np.asarray(nj.forward(p2, jnp.asarray(toks, jnp.int32), cfg2))
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)
    prompt = [int(t) for t in toks[0, :5]]
    with torch.no_grad():
        hf_new = hf.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, min_new_tokens=8,
                             pad_token_id=0)[0, 5:].tolist()
    assert nj.generate(p2, cfg2, [prompt], 8) == [hf_new]


def test_blocks_map_without_rerounding(hf_llama):
    """Dequantized records equal gguf's own dequantization of the blocks, bit for bit."""
    d, cfg, params = hf_llama
    for qtype in ("Q8_0", "Q4_0"):
        path = d / f"exact_{qtype}.gguf"
        write_gguf(params, cfg, path, qtype)
        reader = gguf.GGUFReader(str(path))
        t = next(t for t in reader.tensors if t.name == "blk.0.ffn_down.weight")  # (D, F) rows, no permute
        want = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)  # (O=D, I=F)
        _, p2 = load_gguf(path)
        got = np.asarray(p2["layers"][0]["mlp"]["w_down"].dequantize_t())
        assert np.array_equal(got, want)


def test_tied_embeddings_roundtrip(tmp_path):
    cfg = nj.ModelConfig.preset("llama-tiny", d_ff=128, vocab_size=80, tie_embeddings=True)
    params = np_params(cfg, 1)
    write_gguf(params, cfg, tmp_path / "t.gguf", "F32")
    cfg2, p2 = load_gguf(tmp_path / "t.gguf")
    assert cfg2.tie_embeddings and "lm_head" not in p2
    toks = jnp.asarray([[1, 5, 9, 79]], jnp.int32)
    fwd = jax.jit(nj.forward, static_argnums=2)
    np.testing.assert_allclose(np.asarray(fwd(p2, toks, cfg2)), np.asarray(fwd(params, toks, cfg)), atol=1e-5)


def test_tokenizer_from_the_gguf_vocabulary(hf_llama, tmp_path):
    """A byte-level BPE written into the GGUF comes back encoding and decoding like the original;
    a SentencePiece ("llama") vocabulary is refused with the reason."""
    from nanojax.interop.gguf import load_gguf_tokenizer
    from nanojax.tokenizer import HFTokenizer

    _, cfg, params = hf_llama
    tok = HFTokenizer.train_bpe("to be or not to be, that is the question; " * 20, 300)
    write_gguf(params, cfg, tmp_path / "tok.gguf", "F32", tokenizer=tok)
    back = load_gguf_tokenizer(tmp_path / "tok.gguf")
    text = "to be, or not: the question"
    assert back.encode(text) == tok.encode(text) and back.decode(tok.encode(text)) == text

    w = _tiny_writer(tmp_path / "spm.gguf")
    w.add_tokenizer_model("llama")
    _finish(w)
    with pytest.raises(GGUFFormatError, match=r"tokenizer.ggml.model='llama' is not rebuilt.*tokenizer.json"):
        load_gguf_tokenizer(tmp_path / "spm.gguf")


# ----------------------------------------------------------------------------------------------
# Bad files: a clear error naming the problem and what is supported; nothing returned.


def _tiny_writer(path, arch="llama"):
    w = gguf.GGUFWriter(str(path), arch)
    w.add_embedding_length(32)
    w.add_block_count(0)
    w.add_feed_forward_length(64)
    w.add_head_count(2)
    w.add_context_length(16)
    return w


def _finish(w):
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_bad_gguf_files(hf_llama, tmp_path):
    d, cfg, params = hf_llama
    w = _tiny_writer(tmp_path / "falcon.gguf", "falcon")
    w.add_tensor("token_embd.weight", np.zeros((8, 32), np.float32))
    _finish(w)
    with pytest.raises(GGUFFormatError, match=r"architecture 'falcon' is not supported; nanojax reads llama"):
        load_gguf(tmp_path / "falcon.gguf")

    w = _tiny_writer(tmp_path / "q5.gguf")
    q5 = gguf.GGMLQuantizationType.Q5_0
    w.add_tensor("token_embd.weight", gguf.quants.quantize(np.ones((8, 32), np.float32), q5), raw_dtype=q5)
    w.add_tensor("output_norm.weight", np.ones(32, np.float32))
    _finish(w)
    with pytest.raises(GGUFFormatError, match=r"'token_embd.weight' has type Q5_0.*supported: F32, F16, "
                                              r"BF16, Q8_0, Q4_0"):
        load_gguf(tmp_path / "q5.gguf")

    full = d / "m_trunc.gguf"
    write_gguf(params, cfg, full, "Q8_0")
    data = full.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) - 1000])
    with pytest.raises(GGUFFormatError, match=r"cut.gguf is not a readable GGUF file .*it may be truncated"):
        load_gguf(cut)
    cut.write_bytes(data[:200])  # inside the header
    with pytest.raises(GGUFFormatError, match=r"not a readable GGUF file.*truncated"):
        load_gguf(cut)
    with pytest.raises(ValueError, match=r"qtype must be one of \('F32', 'Q8_0', 'Q4_0'\)"):
        write_gguf(params, cfg, tmp_path / "x.gguf", "Q6_K")
    with pytest.raises(ValueError, match=r"head_qtype must be one of .*got 'Q6_K'"):
        write_gguf(params, cfg, tmp_path / "x.gguf", "Q4_0", head_qtype="Q6_K")
