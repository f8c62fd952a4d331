"""Hugging Face interop against transformers itself (PyTorch CPU, eager attention) as the oracle.

Tiny random models are built with transformers, every parameter perturbed (HF initialises norms to
1 and biases to 0, which would hide a swapped or dropped tensor), saved with save_pretrained, and
loaded by nanojax; the logits must match to 1e-4. The other way, random nanojax params are
written with save_hf and loaded by AutoModelForCausalLM.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import nanojax as nj  # noqa: E402
from nanojax.interop import hf as nj_hf  # noqa: E402
from nanojax.model import ParamSpec, param_specs  # noqa: E402
from nanojax.tokenizer import HFTokenizer, load_tokenizer  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
V = 320  # vocab: tokens are text bytes mod V
TOL = 1e-4

# Tiny HF configs, one per mapping path.
HF_CONFIGS = {
    "gpt2": lambda: transformers.GPT2Config(
        vocab_size=V, n_positions=96, n_embd=64, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0),
    "gpt2_untied": lambda: transformers.GPT2Config(
        vocab_size=V, n_positions=96, n_embd=64, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0,
        tie_word_embeddings=False, layer_norm_epsilon=1e-6, activation_function="gelu_pytorch_tanh"),
    "llama_gqa": lambda: transformers.LlamaConfig(
        vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, rope_theta=5000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=False),
    "llama_head_dim": lambda: transformers.LlamaConfig(  # N * H = 96 != D = 64, tied head
        vocab_size=V, hidden_size=64, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=24, max_position_embeddings=128, rope_theta=20000.0,
        tie_word_embeddings=True),
    "llama_bias": lambda: transformers.LlamaConfig(
        vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=128, attention_bias=True, mlp_bias=True),
    "qwen2": lambda: transformers.Qwen2Config(
        vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, rope_theta=1e6),
    "mistral": lambda: transformers.MistralConfig(  # a window of 256 over a 128 context never bites
        vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, sliding_window=256),
}


def _build(name: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(HF_CONFIGS[name](), attn_implementation="eager")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory) -> dict[str, Path]:
    """Each tiny model saved once (fp32 safetensors) for the whole module."""
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for name in HF_CONFIGS:
        _build(name).save_pretrained(root / name, safe_serialization=True)
        out[name] = root / name
    return out


def _oracle(path: Path, dtype=torch.float32) -> torch.nn.Module:
    return transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, attn_implementation="eager").eval()


def _hf_logits(model: torch.nn.Module, row: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([row])).logits[0].float().numpy()


_forward = jax.jit(nj.forward, static_argnames="cfg")


def _nj_logits(params, cfg: nj.ModelConfig, rows: list[list[int]]) -> list[np.ndarray]:
    """Logits of ragged rows from one compiled call: right padding cannot reach back through
    causal attention, so each row's logits are those of the row alone (nanojax has no pad mask)."""
    buf = np.zeros((len(rows), max(map(len, rows))), np.int32)
    for i, r in enumerate(rows):
        buf[i, : len(r)] = r
    out = np.asarray(_forward(params, jnp.asarray(buf), cfg))
    return [out[i, : len(r)] for i, r in enumerate(rows)]


def _max_diff(model, params, cfg, rows) -> float:
    """Max |logit difference| over ragged rows; transformers runs each row alone, unpadded."""
    ours = _nj_logits(params, cfg, rows)
    return max(float(np.abs(_hf_logits(model, r) - o).max()) for r, o in zip(rows, ours, strict=True))


def _text_rows(text: str, lengths=(96, 61, 17)) -> list[list[int]]:
    data = text.encode("utf-8")
    return [[b % V for b in data[1000 * i: 1000 * i + n]] for i, n in enumerate(lengths)]


def _random_rows(seed: int, lengths=(64, 33, 5), vocab: int = V) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, n).tolist() for n in lengths]


# ----------------------------------------------------------------------------------------------
# HF -> nanojax


EXPECTED = {  # the nanojax switches each HF model must map to
    "gpt2": dict(pos_emb="learned", norm="layernorm", mlp="gelu", bias=True, tie_embeddings=True,
                 max_seq_len=96, d_ff=None),
    "gpt2_untied": dict(tie_embeddings=False, norm_eps=1e-6),
    "llama_gqa": dict(pos_emb="rope", norm="rmsnorm", mlp="swiglu", bias=False, n_kv_head=2,
                      rope_theta=5000.0, tie_embeddings=False, norm_eps=1e-5, head_dim=None),
    "llama_head_dim": dict(head_dim=24, tie_embeddings=True, rope_theta=20000.0, d_ff=80),
    "llama_bias": dict(bias=True, qkv_bias=None),
    "qwen2": dict(bias=False, qkv_bias=True, rope_theta=1e6, norm_eps=1e-6),
    "mistral": dict(bias=False, use_qkv_bias=False, max_seq_len=128),
}


@pytest.mark.parametrize("name", list(HF_CONFIGS))
def test_load_matches_transformers_random_tokens(hf_dirs, name):
    cfg, params = nj.load_hf(hf_dirs[name])
    for k, v in EXPECTED[name].items():
        assert getattr(cfg, k) == v, (k, getattr(cfg, k), v)
    assert cfg.param_dtype == "float32" and cfg.dropout == 0.0
    diff = _max_diff(_oracle(hf_dirs[name]), params, cfg, _random_rows(1))
    assert diff < TOL, diff


@pytest.mark.parametrize("name", list(HF_CONFIGS))
def test_load_matches_transformers_real_text(hf_dirs, name, shakespeare_text):
    cfg, params = nj.load_hf(hf_dirs[name])
    diff = _max_diff(_oracle(hf_dirs[name]), params, cfg, _text_rows(shakespeare_text))
    assert diff < TOL, diff


def test_greedy_generate_matches_transformers(hf_dirs):
    """What scripts/sample.py does, at temperature 0, against transformers' greedy generate."""
    cfg, params = nj.load_hf(hf_dirs["llama_gqa"])
    model = _oracle(hf_dirs["llama_gqa"])
    prompt = _random_rows(2, lengths=(7,))[0]
    with torch.no_grad():
        ref = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False,
                             pad_token_id=0)[0, len(prompt):].tolist()
    assert nj.generate(params, cfg, [prompt], max_new_tokens=8, temperature=0.0)[0] == ref


def test_load_bf16_params(hf_dirs):
    cfg32, p32 = nj.load_hf(hf_dirs["llama_gqa"])
    cfg16, p16 = nj.load_hf(hf_dirs["llama_gqa"], dtype="bfloat16")
    assert cfg16.param_dtype == "bfloat16" and cfg16.dtype == "bfloat16"
    assert {x.dtype for x in jax.tree.leaves(p16)} == {jnp.dtype(jnp.bfloat16)}
    rows = _random_rows(3)
    for ref, got in zip(_nj_logits(p32, cfg32, rows), _nj_logits(p16, cfg16, rows), strict=True):
        # bf16 keeps 8 mantissa bits (~0.4% relative) per weight and activation.
        assert np.abs(got - ref).max() < 0.03 * np.abs(ref).max() + 0.02  # measured ~0.013 * max
        assert (got.argmax(-1) == ref.argmax(-1)).mean() > 0.9


def test_bf16_checkpoint_and_sharded(hf_dirs, tmp_path):
    """A bf16 checkpoint split over shards: read exactly (the BF16 raw path), defaulting to bf16."""
    model = _build("qwen2").to(torch.bfloat16)
    model.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert not (tmp_path / "model.safetensors").exists()
    cfg, params = nj.load_hf(tmp_path)  # dtype from config.json
    assert cfg.param_dtype == "bfloat16"
    assert jax.tree.leaves(params)[0].dtype == jnp.bfloat16
    cfg32, p32 = nj.load_hf(tmp_path, dtype="float32")  # bf16 values upcast exactly
    assert _max_diff(_oracle(tmp_path, torch.float32), p32, cfg32, _random_rows(4)) < TOL


def test_gpt2_without_prefix_and_with_buffers(tmp_path, hf_dirs):
    """Checkpoints saved from GPT2Model (no 'transformer.' prefix) with attn.bias mask buffers."""
    from safetensors.numpy import load_file, save_file

    tensors = load_file(hf_dirs["gpt2"] / "model.safetensors")
    renamed = {k.removeprefix("transformer."): v for k, v in tensors.items()}
    renamed["h.0.attn.bias"] = np.tril(np.ones((1, 1, 96, 96), np.float32))
    renamed["h.0.attn.masked_bias"] = np.array(-1e4, np.float32)
    shutil.copy(hf_dirs["gpt2"] / "config.json", tmp_path / "config.json")
    save_file(renamed, tmp_path / "model.safetensors", metadata={"format": "pt"})
    cfg, params = nj.load_hf(tmp_path)
    _, ref = nj.load_hf(hf_dirs["gpt2"])
    assert jax.tree.all(jax.tree.map(lambda a, b: bool((a == b).all()), params, ref))


# ----------------------------------------------------------------------------------------------
# nanojax -> HF


def _init(cfg: nj.ModelConfig, seed: int = 0, noise: float = 0.0):
    """Params with init_params' tree, shapes and init rule, drawn with numpy (eager JAX random
    compiles one kernel per leaf shape: seconds per config), plus `noise` on every leaf so that
    norms and biases are not 1 and 0."""
    rng = np.random.default_rng(seed)

    def leaf(spec: ParamSpec) -> jax.Array:
        x = {"zeros": np.zeros, "ones": np.ones}.get(spec.init, lambda s: spec.std * rng.standard_normal(s))
        return jnp.asarray(x(spec.shape) + noise * rng.standard_normal(spec.shape), cfg.weight_dtype)

    return jax.tree.map(leaf, param_specs(cfg), is_leaf=lambda x: isinstance(x, ParamSpec))


GPT2_NJ = dict(vocab_size=V, n_layer=2, n_head=4, d_model=64, max_seq_len=64, pos_emb="learned",
               norm="layernorm", mlp="gelu")
LLAMA_NJ = dict(vocab_size=V, n_layer=2, n_head=4, n_kv_head=2, d_model=64, d_ff=96, max_seq_len=128,
                pos_emb="rope", norm="rmsnorm", mlp="swiglu", bias=False, tie_embeddings=False,
                rope_theta=3000.0)
EXPORTS = {  # name: (nanojax config, the HF class it must become, whether biases are zero-filled)
    "gpt2": (GPT2_NJ, "GPT2LMHeadModel", False),
    "gpt2_nobias_untied": (dict(GPT2_NJ, bias=False, tie_embeddings=False, d_ff=80), "GPT2LMHeadModel", True),
    "llama": (LLAMA_NJ, "LlamaForCausalLM", False),
    "llama_head_dim_tied": (dict(LLAMA_NJ, head_dim=8, tie_embeddings=True), "LlamaForCausalLM", False),
    "llama_bias": (dict(LLAMA_NJ, bias=True), "LlamaForCausalLM", False),
    "llama_o_bias_only": (dict(LLAMA_NJ, bias=True, qkv_bias=False), "LlamaForCausalLM", True),
    "qwen2": (dict(LLAMA_NJ, qkv_bias=True, head_dim=32), "Qwen2ForCausalLM", False),
}


@pytest.mark.parametrize("name", list(EXPORTS))
def test_save_hf_loads_in_transformers(tmp_path, name):
    fields, hf_class, zero_filled = EXPORTS[name]
    cfg = nj.ModelConfig(**fields)
    params = _init(cfg, len(name), noise=0.05)
    nj.save_hf(params, cfg, tmp_path)
    hf_cfg = json.loads((tmp_path / "config.json").read_text())
    assert hf_cfg["architectures"] == [hf_class] and hf_cfg["dtype"] == "float32"
    model = _oracle(tmp_path)
    assert type(model).__name__ == hf_class
    rows = _random_rows(5, lengths=(64, 20, 3))
    assert _max_diff(model, params, cfg, rows) < TOL
    # ... and back: the same params, or (zero-filled biases) the same logits.
    cfg2, params2 = nj.load_hf(tmp_path)
    if zero_filled:
        assert _max_diff(model, params2, cfg2, rows) < TOL
    else:
        assert cfg2.replace(init_std=cfg.init_std) == cfg
        assert jax.tree.all(jax.tree.map(lambda a, b: bool((a == b).all()), params, params2))


def test_save_hf_init_params_tied_gpt2(tmp_path):
    """nj.init_params itself (not the numpy stand-in) through save_hf; a tied head is not written."""
    cfg = nj.ModelConfig(**GPT2_NJ)
    params = nj.init_params(cfg, jax.random.key(0))
    nj.save_hf(params, cfg, tmp_path)
    assert _max_diff(_oracle(tmp_path), params, cfg, _random_rows(10)) < TOL
    from safetensors import safe_open

    with safe_open(tmp_path / "model.safetensors", "numpy") as f:
        names = set(f.keys())
    assert "lm_head.weight" not in names and "transformer.wte.weight" in names


def test_save_hf_bf16(tmp_path):
    cfg = nj.ModelConfig(**LLAMA_NJ, param_dtype="bfloat16")
    params = _init(cfg, 7, noise=0.05)
    nj.save_hf(params, cfg, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    model = _oracle(tmp_path, torch.float32)  # bf16 weights upcast exactly: compare in fp32
    assert _max_diff(model, params, cfg.replace(dtype="float32"), _random_rows(6)) < TOL
    cfg2, params2 = nj.load_hf(tmp_path)
    assert cfg2.param_dtype == "bfloat16"
    assert jax.tree.all(jax.tree.map(lambda a, b: bool((a == b).all()), params, params2))


# ----------------------------------------------------------------------------------------------
# Tokenizers


def _tiny_bpe() -> HFTokenizer:
    return HFTokenizer.train_bpe("To be, or not to be, that is the question.\n" * 50, 300)


def test_tokenizer_written_by_transformers_loads_in_nanojax(tmp_path):
    """An HF dir's tokenizer.json, as transformers writes it, is what load_tokenizer reads."""
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=_tiny_bpe().tok, eos_token="<|endoftext|>")
    fast.save_pretrained(tmp_path)
    tok = load_tokenizer(tmp_path)
    text = "To be, or not to be: ROMEO!"
    assert tok.encode(text) == fast.encode(text, add_special_tokens=False)
    assert tok.decode(tok.encode(text)) == text


def test_save_hf_tokenizer_loads_in_transformers(tmp_path):
    cfg = nj.ModelConfig(**GPT2_NJ)
    bpe = _tiny_bpe()
    nj.save_hf(_init(cfg), cfg, tmp_path, tokenizer=bpe)
    fast = transformers.AutoTokenizer.from_pretrained(tmp_path)
    text = "not to be, that is"
    assert fast.encode(text, add_special_tokens=False) == bpe.encode(text)
    eos = bpe.token_id("<|endoftext|>")
    assert json.loads((tmp_path / "config.json").read_text())["eos_token_id"] == eos


def test_save_hf_char_tokenizer(tmp_path):
    from nanojax.tokenizer import CharTokenizer

    char = CharTokenizer.from_text("hello world\nROMEO: ")
    cfg = nj.ModelConfig(**dict(GPT2_NJ, vocab_size=char.vocab_size))
    nj.save_hf(_init(cfg), cfg, tmp_path, tokenizer=char)
    text = "ROMEO: hello\nworld"
    assert load_tokenizer(tmp_path).encode(text) == char.encode(text)
    fast = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert fast.encode(text, add_special_tokens=False) == char.encode(text)
    assert fast.decode(char.encode(text)) == text


# ----------------------------------------------------------------------------------------------
# Workdirs and scripts/convert.py


def test_workdir_round_trip(tmp_path, hf_dirs):
    src = tmp_path / "hf"
    shutil.copytree(hf_dirs["gpt2"], src)
    _tiny_bpe().save(src)
    work = nj_hf.hf_to_workdir(src, tmp_path / "work")
    assert json.loads((work / "config.json").read_text())["train"] == {}
    cfg, params, tok = nj.load_checkpoint(work)
    cfg_ref, ref = nj.load_hf(src)
    assert cfg == cfg_ref
    assert jax.tree.all(jax.tree.map(lambda a, b: bool((a == b).all()), params, ref))
    assert tok.encode("to be") == _tiny_bpe().encode("to be")
    with pytest.raises(FileExistsError, match="already holds a run"):
        nj_hf.hf_to_workdir(src, work)
    out = nj_hf.workdir_to_hf(work, tmp_path / "out")
    assert _max_diff(_oracle(out), params, cfg, _random_rows(8)) < TOL
    assert (out / "tokenizer.json").exists()


def test_workdir_needs_tokenizer(tmp_path, hf_dirs):
    with pytest.raises(FileNotFoundError, match="tokenizer.json.*AutoTokenizer"):
        nj_hf.hf_to_workdir(hf_dirs["gpt2"], tmp_path / "work")
    assert not (tmp_path / "work").exists()


def test_convert_script_both_directions(tmp_path, hf_dirs):
    src = tmp_path / "hf"
    shutil.copytree(hf_dirs["llama_gqa"], src)
    _tiny_bpe().save(src)
    script = str(REPO / "scripts" / "convert.py")
    run = dict(capture_output=True, text=True, timeout=300, cwd=tmp_path)
    r = subprocess.run([sys.executable, script, f"--hf_dir={src}", f"--workdir={tmp_path / 'w'}"], **run)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([sys.executable, script, f"--workdir={tmp_path / 'w'}",
                        f"--out_hf_dir={tmp_path / 'out'}"], **run)
    assert r.returncode == 0, r.stderr
    cfg, params = nj.load_hf(src)
    assert _max_diff(_oracle(tmp_path / "out"), params, cfg, _random_rows(9)) < TOL
    r = subprocess.run([sys.executable, script, f"--hf_dir={tmp_path}", f"--workdir={tmp_path / 'x'}"], **run)
    assert r.returncode == 1 and "config.json" in r.stderr


# ----------------------------------------------------------------------------------------------
# Bad input: each error says what was wrong, what was expected, what to do.


def _variant(src: Path, dst: Path, **config_changes) -> Path:
    shutil.copytree(src, dst)
    hf = json.loads((dst / "config.json").read_text())
    hf.update(config_changes)
    (dst / "config.json").write_text(json.dumps(hf))
    return dst


def _edit_tensors(path: Path, fn) -> None:
    from safetensors.numpy import load_file, save_file

    tensors = fn(load_file(path / "model.safetensors"))
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def test_missing_config(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"config.json not found.*save_pretrained"):
        nj.load_hf(tmp_path)


def test_unsupported_architecture(tmp_path, hf_dirs):
    d = _variant(hf_dirs["gpt2"], tmp_path / "d", architectures=["GPTNeoXForCausalLM"], model_type="gpt_neox")
    with pytest.raises(ValueError, match=r"unsupported architecture 'GPTNeoXForCausalLM'.*GPT2LMHeadModel, "
                                         r"LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM"):
        nj.load_hf(d)


def test_pickle_only_refused(tmp_path, hf_dirs):
    d = tmp_path / "d"
    d.mkdir()
    shutil.copy(hf_dirs["gpt2"] / "config.json", d)
    (d / "pytorch_model.bin").write_bytes(b"never unpickled")
    with pytest.raises(ValueError, match=r"pytorch_model.bin.*arbitrary code.*safe_serialization=True"):
        nj.load_hf(d)


def test_no_weights(tmp_path, hf_dirs):
    d = tmp_path / "d"
    d.mkdir()
    shutil.copy(hf_dirs["gpt2"] / "config.json", d)
    with pytest.raises(ValueError, match="no weights.*model.safetensors"):
        nj.load_hf(d)


def test_missing_tensor(tmp_path, hf_dirs):
    d = _variant(hf_dirs["llama_gqa"], tmp_path / "d")
    _edit_tensors(d, lambda t: {k: v for k, v in t.items() if k != "model.layers.1.mlp.up_proj.weight"})
    with pytest.raises(ValueError, match=r"1 tensor\(s\) missing.*model.layers.1.mlp.up_proj.weight"):
        nj.load_hf(d)


def test_extra_tensor(tmp_path, hf_dirs):
    d = _variant(hf_dirs["llama_gqa"], tmp_path / "d")
    _edit_tensors(d, lambda t: {**t, "model.layers.0.self_attn.o_proj.bias": np.zeros(64, np.float32)})
    with pytest.raises(ValueError, match=r"unexpected tensor\(s\).*model.layers.0.self_attn.o_proj.bias"):
        nj.load_hf(d)


def test_shape_mismatch(tmp_path, hf_dirs):
    d = _variant(hf_dirs["llama_gqa"], tmp_path / "d", intermediate_size=80)
    with pytest.raises(ValueError, match=r"tensor 'model.layers.0.mlp.gate_proj.weight' .* shape "
                                         r"\[96, 64\]; expected \[80, 64\] from config.json"):
        nj.load_hf(d)


@pytest.mark.parametrize("name,changes,match", [
    ("llama_gqa", {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}},
     "rope scaling 'linear'.*plain RoPE"),
    ("llama_gqa", {"rope_parameters": None, "rope_theta": 1e4,
                   "rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope scaling 'dynamic'"),
    ("mistral", {"sliding_window": 16}, "active sliding window.*sliding_window=16 < "
                                        "max_position_embeddings=128"),
    ("qwen2", {"use_sliding_window": True, "sliding_window": 16, "max_window_layers": 1,
               "layer_types": None}, "active sliding window"),
    ("gpt2", {"activation_function": "gelu"}, "activation_function='gelu'.*'gelu_new'"),
    ("gpt2", {"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx=True"),
    ("llama_gqa", {"hidden_act": "gelu"}, "hidden_act='gelu'.*'silu'"),
    ("llama_gqa", {"attention_bias": True}, "attention_bias=True, mlp_bias=False cannot be represented"),
    ("llama_gqa", {"hidden_size": None}, "no 'hidden_size'"),
])
def test_refused_configs(tmp_path, hf_dirs, name, changes, match):
    d = _variant(hf_dirs[name], tmp_path / "d", **changes)
    with pytest.raises(ValueError, match=match):
        nj.load_hf(d)


def test_inactive_qwen2_window_is_accepted(tmp_path, hf_dirs):
    """4.x-style Qwen2 config: a window is set, but use_sliding_window is false."""
    d = _variant(hf_dirs["qwen2"], tmp_path / "d", sliding_window=16, use_sliding_window=False)
    nj.load_hf(d)


def test_save_hf_refuses_unexpressible(tmp_path):
    cfg = nj.ModelConfig(**dict(GPT2_NJ, norm="rmsnorm"))
    with pytest.raises(ValueError, match="pos_emb='learned', norm='rmsnorm', mlp='gelu'.*Llama family"):
        nj.save_hf(_init(cfg), cfg, tmp_path)
    cfg = nj.ModelConfig(**dict(GPT2_NJ, n_kv_head=2))
    with pytest.raises(ValueError, match="n_kv_head=2 .GPT-2 has no grouped-query attention"):
        nj.save_hf(_init(cfg), cfg, tmp_path)
    cfg = nj.ModelConfig(**LLAMA_NJ)
    params = _init(cfg)
    del params["layers"][1]["attn"]["wq"]
    with pytest.raises(ValueError, match="missing layers/1/attn/wq"):
        nj.save_hf(params, cfg, tmp_path)
    params = _init(cfg)
    params["lm_head"] = params["lm_head"][:, :10]
    with pytest.raises(ValueError, match=r"lm_head has shape \[64, 10\]; expected \[64, 320\]"):
        nj.save_hf(params, cfg, tmp_path)
    assert not (tmp_path / "model.safetensors").exists()
