"""The quality comparison with nanoGPT: scripts/eval_whole_split.py scores a torch model and a
nanojax model over the same windows (checked against each other on one Hugging Face GPT-2 loaded
both ways), and the two recipe knobs that differ from nanoGPT (decay_embeddings, pos_init_std)
reach the optimizer and the init."""

import importlib.util
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
import transformers

import nanojax as nj
from nanojax.train import build, default_config, model_config_from

REPO = Path(__file__).resolve().parent.parent
T, V = 16, 23
N_TOKENS = 12 * T + 7  # 12 full windows and a last one of 6 targets


@pytest.fixture(scope="module")
def ews():
    """scripts/eval_whole_split.py as a module (its flags are defined once, at import)."""
    spec = importlib.util.spec_from_file_location("eval_whole_split", REPO / "scripts/eval_whole_split.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def hf_gpt2(tmp_path_factory):
    """A tiny random HF GPT-2 (torch, eval mode) and the directory it is saved in."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=V, n_positions=T, n_embd=16, n_layer=1, n_head=2,
                                     bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config)
    with torch.no_grad():  # unequal per-token losses, so a dropped or doubled target shows
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    model.eval()
    path = tmp_path_factory.mktemp("hf") / "gpt2"
    model.save_pretrained(path, safe_serialization=True)
    return model, path


def test_torch_and_nanojax_score_the_same_targets_to_the_same_loss(ews, hf_gpt2):
    """The same weights scored by the torch path (HF's forward, windows cut by slicing) and by
    nanojax's evaluation path (full_split_batches + the eval-sum step) agree, over every target
    once, for batch sizes that do and do not divide the 13 windows."""
    model, path = hf_gpt2
    cfg, params = nj.load_hf(path)
    tokens = np.random.default_rng(0).integers(0, V, N_TOKENS).astype(np.uint16)
    logits_fn = lambda x, y: model(x).logits  # noqa: E731
    for batch in (4, 13, 64):
        theirs, n_theirs = ews.torch_whole_split_loss(logits_fn, tokens, T, batch)
        ours, n_ours = ews.nanojax_whole_split_loss(params, cfg, tokens, batch)
        assert n_theirs == n_ours == N_TOKENS - 1, (batch, n_theirs, n_ours)
        assert abs(theirs - ours) < 1e-5, (batch, theirs, ours)
    # The torch path on its own: the mean over the 12 full windows of HF's per-window loss.
    x = torch.from_numpy(tokens.astype(np.int64))
    with torch.no_grad():
        per_window = [torch.nn.functional.cross_entropy(model(x[r * T:(r + 1) * T][None]).logits[0],
                                                        x[r * T + 1:(r + 1) * T + 1]) for r in range(12)]
    full_only, n = ews.torch_whole_split_loss(logits_fn, tokens[:12 * T + 1], T)
    assert n == 12 * T and abs(full_only - float(torch.stack(per_window).mean())) < 1e-5


def test_load_nanogpt_names_a_wrong_checkout(ews, tmp_path):
    with pytest.raises(FileNotFoundError, match="no model.py there; point it at a checkout"):
        ews.load_nanogpt(tmp_path / "ckpt.pt", tmp_path)


def _zero_grad_step(decay_embeddings):
    """(params before, after) one optimizer update with zero gradients from build()'s optimizer."""
    c = default_config("shakespeare-char-cpu", vocab_size=V, n_layer=1, n_head=2, d_model=16, max_seq_len=T)
    c.update(lr=0.1, min_lr=0.1, warmup_steps=0, weight_decay=0.5, decay_embeddings=decay_embeddings)
    cfg = model_config_from(c)
    run = build(c, cfg)  # jits lazily; only its optimizer is used here
    params = jax.device_get(nj.init_params(cfg, jax.random.key(0)))
    opt_state = run.optimizer.init(params)
    updates, _ = run.optimizer.update(jax.tree.map(np.zeros_like, params), opt_state, params)
    return params, jax.device_get(jax.tree.map(lambda p, u: p + u, params, updates))


@pytest.mark.parametrize("decay_embeddings", [False, True])
def test_decay_embeddings_reaches_the_optimizer(decay_embeddings):
    """With zero gradients only the decay moves a weight: wte and wpe shrink by (1 - lr * wd)
    exactly when decay_embeddings is on; the block matrices shrink either way; norms never."""
    before, after = _zero_grad_step(decay_embeddings)
    shrink = 1 - 0.1 * 0.5
    for name in ("wte", "wpe"):
        want = shrink * before[name] if decay_embeddings else before[name]
        np.testing.assert_allclose(after[name], want, rtol=1e-6, err_msg=name)
    np.testing.assert_allclose(after["layers"][0]["attn"]["wq"], shrink * before["layers"][0]["attn"]["wq"],
                               rtol=1e-6)
    np.testing.assert_array_equal(after["ln_f"]["scale"], before["ln_f"]["scale"])


def test_pos_init_std_sets_the_position_table_init():
    for std in (0.01, 0.05):
        cfg = nj.ModelConfig.preset("shakespeare-char-cpu", vocab_size=V, max_seq_len=256, pos_init_std=std)
        params = nj.init_params(cfg, jax.random.key(1))
        wpe, wte = np.asarray(params["wpe"]), np.asarray(params["wte"])
        assert abs(wpe.std() / std - 1) < 0.03, (std, wpe.std())  # 256 x 128 draws: ~0.4% noise
        assert abs(wte.std() / cfg.init_std - 1) < 0.05  # the token table keeps init_std
