"""LoRA against `peft` itself (PyTorch CPU) as the oracle, and the serving / merge properties.

Tiny random HF Llama (GQA) and GPT-2 models get a PEFT LoRA adapter with init_lora_weights=False
(B nonzero, so the adapter changes the logits) and every base parameter perturbed; PEFT saves it,
nanojax loads it and must give PEFT's logits within 1e-4. The other way, a nanojax adapter saved
with save_lora is loaded by PeftModel.from_pretrained and must match nanojax's logits.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import nanojax as nj  # noqa: E402
from nanojax.lora import LoraError, count_params, init_lora, stack_adapters  # noqa: E402

V = 96
TOL = 1e-4
TOKENS = np.array([[5, 17, 3, 88, 42, 7, 0, 61, 12, 9], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]], np.int32)

HF_CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(
        vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False),
    "gpt2": lambda: transformers.GPT2Config(
        vocab_size=V, n_positions=64, n_embd=32, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0),
}
# PEFT target_modules per family, and what they cover in nanojax's names.
PEFT_TARGETS = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],  # c_proj: both the attention's and the MLP's
}


def _base(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(HF_CONFIGS[name](), attn_implementation="eager")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def _peft_logits(model: torch.nn.Module, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(tokens, dtype=torch.long)).logits.float().numpy()


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """Per family: the HF base dir, a PEFT adapter dir (rsLoRA for GPT-2, alpha != r for both), and
    PEFT's logits with the adapter on."""
    root = tmp_path_factory.mktemp("lora")
    out = {}
    for name in HF_CONFIGS:
        base = _base(name)
        base.save_pretrained(root / f"{name}_base", safe_serialization=True)
        conf = peft.LoraConfig(r=4, lora_alpha=12, target_modules=PEFT_TARGETS[name], lora_dropout=0.0,
                               init_lora_weights=False, use_rslora=name == "gpt2", task_type="CAUSAL_LM",
                               fan_in_fan_out=name == "gpt2")
        torch.manual_seed(1)
        model = peft.get_peft_model(base, conf).eval()
        model.save_pretrained(root / f"{name}_lora")
        out[name] = (root / f"{name}_base", root / f"{name}_lora", _peft_logits(model, TOKENS))
    return out


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_peft_adapter_matches_peft_logits(made, name):
    base_dir, lora_dir, want = made[name]
    cfg, params = nj.load_hf(base_dir)
    adapter = nj.load_lora(lora_dir, cfg)
    assert adapter.rank == 4 and adapter.alpha == 12 and adapter.rslora == (name == "gpt2")
    got = np.asarray(nj.forward(params, jnp.asarray(TOKENS), cfg, lora=adapter))
    np.testing.assert_allclose(got, want, atol=TOL, rtol=0)
    plain = np.asarray(nj.forward(params, jnp.asarray(TOKENS), cfg))
    assert np.abs(plain - want).max() > 100 * TOL  # the adapter really changes the logits
    # merged == unmerged; unmerge gives the base back
    merged = nj.merge_lora(params, cfg, adapter)
    merged_logits = np.asarray(nj.forward(merged, jnp.asarray(TOKENS), cfg))
    np.testing.assert_allclose(merged_logits, got, atol=TOL, rtol=0)
    back = nj.unmerge_lora(merged, cfg, adapter)
    for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(params), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6, rtol=0)
    with pytest.raises(LoraError, match="already has an adapter merged"):
        nj.merge_lora(merged, cfg, adapter)
    with pytest.raises(LoraError, match="does not hold this adapter merged"):
        nj.unmerge_lora(params, cfg, adapter)


@pytest.mark.parametrize("name,targets", [("llama", "q,v,down"), ("gpt2", "c_attn,mlp.c_proj")])
def test_nanojax_adapter_loads_in_peft(made, tmp_path, name, targets):
    base_dir, _, _ = made[name]
    cfg, params = nj.load_hf(base_dir)
    adapter = init_lora(cfg, jax.random.key(3), rank=3, targets=targets, alpha=5.0)
    # a trained adapter has B != 0: give it random B
    rng = np.random.default_rng(0)
    adapter = adapter.replace(weights=jax.tree.map(
        lambda x: jnp.asarray(rng.normal(0, 0.3, x.shape), jnp.float32), adapter.weights))
    nj.save_lora(adapter, cfg, tmp_path / "out")
    model = peft.PeftModel.from_pretrained(_base(name), tmp_path / "out").eval()
    want = _peft_logits(model, TOKENS)
    got = np.asarray(nj.forward(params, jnp.asarray(TOKENS), cfg, lora=adapter))
    np.testing.assert_allclose(got, want, atol=TOL, rtol=0)
    # and back: load_lora gives the same tensors
    again = nj.load_lora(tmp_path / "out", cfg)
    assert again.targets == adapter.targets
    for x, y in zip(jax.tree.leaves(again.weights), jax.tree.leaves(adapter.weights), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_trainable_count_is_the_formula(made):
    cfg, _ = nj.load_hf(made["llama"][0])
    a = init_lora(cfg, jax.random.key(0), rank=8, targets="q,v")
    D, N, K, H = cfg.d_model, cfg.n_head, cfg.kv_heads, cfg.resolved_head_dim
    assert count_params(a) == cfg.n_layer * 8 * ((D + N * H) + (D + K * H))


# ----------------------------------------------------------------------------------------------
# Serving: several adapters in one batch.


@pytest.fixture(scope="module")
def served(made):
    cfg, params = nj.load_hf(made["llama"][0])
    rng = np.random.default_rng(1)

    def rand_adapter(seed, rank, targets):
        a = init_lora(cfg, jax.random.key(seed), rank=rank, targets=targets, alpha=2.0 * rank)
        return a.replace(weights=jax.tree.map(
            lambda x: jnp.asarray(rng.normal(0, 0.5, x.shape), jnp.float32), a.weights))

    adapters = [rand_adapter(1, 2, "q,v"), rand_adapter(2, 4, "o,up,down"), rand_adapter(3, 3, "k,gate")]
    return cfg, params, adapters


def test_rows_with_different_adapters_equal_separate_calls(served):
    cfg, params, (a, b, c) = served
    prompts = [[5, 17, 3], [9, 1, 44, 2, 8], [7], [60, 61]]
    per_row = [a, b, None, c]
    together = nj.generate(params, cfg, prompts, max_new_tokens=12, lora=per_row)
    alone = [nj.generate(params, cfg, [p], max_new_tokens=12, lora=ad)[0]
             for p, ad in zip(prompts, per_row, strict=True)]
    assert together == alone
    plain = nj.generate(params, cfg, prompts, max_new_tokens=12)
    assert plain[2] == together[2] and all(plain[i] != together[i] for i in (0, 1, 3))


def test_stacked_forward_matches_each_adapter(served):
    cfg, params, (a, b, c) = served
    tokens = jnp.asarray(np.tile(TOKENS[:1], (4, 1)))
    stacked = stack_adapters([c, None, a, b], cfg)
    forward = jax.jit(nj.forward, static_argnames="cfg")
    got = np.asarray(forward(params, tokens, cfg, lora=stacked))
    for row, ad in enumerate([c, None, a, b]):
        want = np.asarray(forward(params, tokens[:1], cfg, lora=ad))[0]
        np.testing.assert_allclose(got[row], want, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------------
# Bad inputs.


def _edit_config(src: Path, dst: Path, **changes) -> Path:
    shutil.copytree(src, dst)
    conf = json.loads((dst / "adapter_config.json").read_text())
    conf.update(changes)
    (dst / "adapter_config.json").write_text(json.dumps(conf))
    return dst


@pytest.mark.parametrize("change,named", [
    ({"use_dora": True}, "DoRA"), ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"layers_to_transform": [0]}, "layers_to_transform"), ({"rank_pattern": {"q_proj": 2}}, "rank_pattern"),
    ({"alpha_pattern": {"q_proj": 2}}, "alpha_pattern"), ({"bias": "all"}, "trainable biases"),
    ({"peft_type": "IA3"}, "only 'LORA'"), ({"r": 0}, "rank must be an int > 0"),
])
def test_unsupported_peft_features_refused_by_name(made, tmp_path, change, named):
    base_dir, lora_dir, _ = made["llama"]
    cfg, _ = nj.load_hf(base_dir)
    with pytest.raises(LoraError, match=named):
        nj.load_lora(_edit_config(lora_dir, tmp_path / "bad", **change), cfg)


def test_adapter_for_another_base_refused(made):
    cfg_llama, params = nj.load_hf(made["llama"][0])
    cfg_gpt2, _ = nj.load_hf(made["gpt2"][0])
    with pytest.raises(LoraError, match="not a LoRA A/B of a module"):
        nj.load_lora(made["gpt2"][1], cfg_llama)
    wider = nj.ModelConfig.from_dict({**cfg_llama.to_dict(), "d_model": 48})
    with pytest.raises(LoraError, match=r"lora_B \[32, 4\]; the base model with r=4 needs .*B \[48, 4\]"):
        nj.load_lora(made["llama"][1], wider)
    a = init_lora(cfg_llama, jax.random.key(0), rank=2, targets="q")
    with pytest.raises(LoraError, match=r"A \(32, 2\).*needs A \(48, 2\)"):
        nj.forward(params, jnp.asarray(TOKENS), wider, lora=a)


@pytest.mark.parametrize("kwargs,named", [
    ({"rank": 0, "targets": "q"}, "rank must be an int > 0"),
    ({"rank": 4, "targets": "q,proj_x"}, "unknown LoRA target 'proj_x'"),
    ({"rank": 4, "targets": ""}, "no LoRA targets"),
    ({"rank": 4, "targets": "q", "dropout": 1.0}, "dropout must be in"),
])
def test_bad_hparams(made, kwargs, named):
    cfg, _ = nj.load_hf(made["llama"][0])
    with pytest.raises(LoraError, match=named):
        init_lora(cfg, jax.random.key(0), **kwargs)


def test_gpt2_q_target_explains_fused_c_attn(made):
    cfg, _ = nj.load_hf(made["gpt2"][0])
    with pytest.raises(LoraError, match="target 'c_attn'"):
        init_lora(cfg, jax.random.key(0), rank=2, targets="q")
