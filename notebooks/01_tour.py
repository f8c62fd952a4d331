# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # A tour of nanojax
#
# Build a model from a preset, look at its parameters and their logical axes, train it on Tiny
# Shakespeare, plot the loss, sample from it, look at one layer's attention, and check greedy
# decoding against Hugging Face on imported GPT-2 weights. Everything here is the public API:
# `nanojax` (`nj`), `nanojax.train`, `nanojax.data`, plain dicts of arrays.
#
# Set `NANOJAX_NOTEBOOK_FAST=1` for a quick pass (the tests do); the saved copy ran in full.

# %%
import os
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

import nanojax as nj
from nanojax import data
from nanojax.metrics import read_metrics
from nanojax.tokenizer import CharTokenizer
from nanojax.train import default_config, train

FAST = os.environ.get("NANOJAX_NOTEBOOK_FAST") == "1"
STEPS = 40 if FAST else 400
work = Path(tempfile.mkdtemp(prefix="nanojax_tour_"))
print(jax.devices(), "fast mode" if FAST else f"{STEPS} steps")

# %% [markdown]
# ## A model from a preset
# `ModelConfig` is frozen and hashable; a preset is a named set of its fields. Params are a nested
# dict of arrays; `nj.param_axes` gives the same tree with each leaf's logical axis names, which
# the sharding rules map onto a device mesh (see 02_sharding).

# %%
cfg = nj.ModelConfig.preset("shakespeare-char-cpu")
params = nj.init_params(cfg, jax.random.key(0))
axes = nj.param_axes(cfg)
flat_p = jax.tree_util.tree_flatten_with_path(params)[0]
flat_a = jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, tuple))
for (path, leaf), ax in zip(flat_p, flat_a, strict=True):
    name = jax.tree_util.keystr(path)
    if not name.startswith("['layers']") or name.startswith("['layers'][0]"):  # one layer is enough
        print(f"{name:34s} {str(leaf.shape):16s} {ax}")
print("...", len(flat_p), "arrays;", f"{cfg.num_params():,} params,",
      f"{cfg.num_params(include_embeddings=False):,} without embeddings")

# %% [markdown]
# ## Train a few hundred steps on Tiny Shakespeare
# Characters as tokens, nanoGPT's CPU quickstart shape. `train` writes an ordinary workdir
# (checkpoints, config.json, metrics.jsonl); calling it again would resume.

# %%
candidates = [os.environ.get("NANOJAX_TEST_TEXT", ""), "../../shared/data/tinyshakespeare.txt",
              "/work/shared/data/tinyshakespeare.txt", "../data/shakespeare_char/input.txt"]
text_path = next((Path(p) for p in candidates if p and Path(p).is_file()), None)
assert text_path, "set NANOJAX_TEST_TEXT to a copy of Tiny Shakespeare"
text = data.read_text(text_path)
meta = data.prepare(text, CharTokenizer.from_text(text), work / "data")
print(meta)

config = default_config("shakespeare-char-cpu", vocab_size=0)
config.data_dir = str(work / "data")
config.max_steps = STEPS
config.eval_every = STEPS // 4
config.ckpt_every = STEPS
config.eval_iters = 5
config.warmup_steps = STEPS // 10
summary = train(config, work / "run", progress=False)
print({k: summary[k] for k in ("step", "train_loss", "val_loss", "val_loss_full")})

# %%
m = read_metrics(work / "run" / "metrics.jsonl")
tr = [(r["step"], r["train_loss"]) for r in m if "step_time_s" in r]
va = [(r["step"], r["val_loss"]) for r in m if "val_loss" in r]
fig, ax = plt.subplots(figsize=(6, 3.5))
ax.plot([s for s, _ in tr], [v for _, v in tr], lw=0.8, label="train")
ax.plot([s for s, _ in va], [v for _, v in va], "o-", label="val (sampled batches)")
ax.set_xlabel("step")
ax.set_ylabel("loss (nats/char)")
ax.legend()
plt.show()

# %% [markdown]
# ## Sample
# `nj.load_checkpoint` gives the config, params and tokenizer of a workdir's latest checkpoint.

# %%
cfg, params, tok = nj.load_checkpoint(work / "run")
out = nj.generate(params, cfg, [tok.encode("ROMEO:")], max_new_tokens=200, temperature=0.8, seed=0,
                  overflow="slide")  # past the 64-token context: keep the last 64
print("ROMEO:" + tok.decode(out[0]))

# %% [markdown]
# ## One layer's attention pattern
# The model is plain functions over the params dict, so a layer's attention weights are a few
# lines away: embed, the first norm, the q/k projections (`wq`: (D, N, H)), softmax of the causal
# scores. Shapes in comments: T tokens, D width, N heads, H head dim.

# %%
from nanojax.model import embed, norm  # noqa: E402  (the model's own building blocks)

prompt = tok.encode("ROMEO:\nWhat light through yonder window breaks?")[: cfg.max_seq_len]
tokens = jnp.asarray([prompt], jnp.int32)  # (1, T)
T = tokens.shape[1]
x = embed(params, tokens, jnp.arange(T)[None], cfg)  # (T, D)
layer = params["layers"][1]
h = norm(layer["ln1"], x, cfg)
q = jnp.einsum("td,dnh->nth", h, layer["attn"]["wq"])  # (N, T, H)
k = jnp.einsum("td,dnh->nth", h, layer["attn"]["wk"])
scores = jnp.einsum("nth,nsh->nts", q, k) / np.sqrt(cfg.resolved_head_dim)  # (N, T, T)
scores = jnp.where(jnp.tril(jnp.ones((T, T), bool)), scores, -jnp.inf)
probs = jax.nn.softmax(scores, axis=-1)
labels = [tok.decode([t]).replace("\n", "⏎") for t in prompt]
fig, axs = plt.subplots(1, cfg.n_head, figsize=(4 * cfg.n_head, 4))
for i, a in enumerate(axs):
    a.imshow(probs[i], cmap="viridis")
    a.set_title(f"layer 1, head {i}")
    a.set_xticks(range(T), labels, fontsize=5)
    a.set_yticks(range(T), labels, fontsize=5)
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Greedy decoding against Hugging Face
# A tiny random GPT-2 built with `transformers`, saved with `save_pretrained`, imported with
# `nj.load_hf`: both greedy continuations must be the same tokens.

# %%
import torch  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

torch.manual_seed(0)
# initializer_range 0.2 (HF's default is 0.02) so that a random model's greedy tokens vary.
hf_config = GPT2Config(vocab_size=97, n_positions=64, n_embd=64, n_layer=2, n_head=4, initializer_range=0.2,
                       bos_token_id=None, eos_token_id=None)
hf = GPT2LMHeadModel(hf_config).eval()
hf.save_pretrained(work / "hf")
hf_cfg, hf_params = nj.load_hf(work / "hf")
prompt = [5, 17, 42, 8, 3]
with torch.no_grad():
    ref = hf.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False,
                      pad_token_id=0)[0, len(prompt):].tolist()
ours = nj.generate(hf_params, hf_cfg, [prompt], max_new_tokens=24, temperature=0.0)[0]
print("HF:     ", ref)
print("nanojax:", list(ours))
assert list(ours) == ref
