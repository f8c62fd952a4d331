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
# # Quantized inference: fp32 vs int8 vs int4
#
# Train a small character model on Tiny Shakespeare (or load a finished workdir), quantize it with
# `nj.quantize` (int8 per output channel; int4 in groups of 32, 64 and 128), and compare each scheme
# with the float model: weight bytes, whole-split val loss and KL to fp32, greedy samples, decode
# speed at batch 1, and what the int8 KV cache (`generate(kv_cache_dtype="int8")`) changes.
# Formats and the measured table of a longer-trained model: docs/quantization.md.
#
# Set `NANOJAX_NOTEBOOK_FAST=1` for a quick pass (the tests do); set `NANOJAX_INFER_WORKDIR` to a
# training workdir (e.g. `out/sc_cpu` from the quickstart) to study that model instead of training
# one here. The saved copy ran in full.

# %%
import importlib.util
import json
import os
import tempfile
import time
from pathlib import Path

import jax
import matplotlib.pyplot as plt
import numpy as np

import nanojax as nj
from nanojax import data
from nanojax.quant import weight_bytes
from nanojax.quant.quality import quality_report
from nanojax.tokenizer import CharTokenizer
from nanojax.train import default_config, train

FAST = os.environ.get("NANOJAX_NOTEBOOK_FAST") == "1"
STEPS = 30 if FAST else 2000
WORKDIR = os.environ.get("NANOJAX_INFER_WORKDIR")
work = Path(tempfile.mkdtemp(prefix="nanojax_infer_"))
print(jax.devices(), "fast mode" if FAST else f"{STEPS} steps")

# %% [markdown]
# ## A model to quantize
# nanoGPT's CPU quickstart shape (`shakespeare-char-cpu`: 4 layers, 128 wide, context 64), trained
# here for 2000 steps (the quickstart's budget; a few minutes on 2 CPU cores). A model this small
# is the hard case for int4: each weight matters more than in a wide one.

# %%
if WORKDIR:
    run = Path(WORKDIR)
    data_dir = json.loads((run / "config.json").read_text())["train"]["data_dir"]
else:
    candidates = [os.environ.get("NANOJAX_TEST_TEXT", ""), "../../shared/data/tinyshakespeare.txt",
                  "/work/shared/data/tinyshakespeare.txt", "../data/shakespeare_char/input.txt"]
    text_path = next((Path(p) for p in candidates if p and Path(p).is_file()), None)
    assert text_path, "set NANOJAX_TEST_TEXT to a copy of Tiny Shakespeare (or NANOJAX_INFER_WORKDIR)"
    text = data.read_text(text_path)
    data_dir = work / "data"
    data.prepare(text, CharTokenizer.from_text(text), data_dir)
    config = default_config("shakespeare-char-cpu", vocab_size=0)
    config.data_dir = str(data_dir)
    config.max_steps = STEPS
    config.eval_every = STEPS
    config.ckpt_every = STEPS
    config.eval_iters = 5
    config.warmup_steps = STEPS // 10
    run = work / "run"
    summary = train(config, run, progress=False)
    print({k: summary[k] for k in ("step", "train_loss", "val_loss_full")})
cfg, params, tok = nj.load_checkpoint(run)
val = data.load_split(data_dir, "val", cfg.max_seq_len, cfg.vocab_size)
print(f"{cfg.num_params():,} params; val split: {len(val):,} tokens")

# %% [markdown]
# ## Quantize
# One call per scheme. Every block matrix is rounded to int8 or int4 (a scale per output channel, or
# per group of G inputs); the token embedding and learned positions go to int8 per row; norms stay
# float. The records are pytree leaves' containers, so `nj.forward` and `nj.generate` take the
# quantized tree as they take the float one.

# %%
SCHEMES = [("int8", None), ("int4", 32)] + ([] if FAST else [("int4", 64), ("int4", 128)])


def label(scheme, group):
    return "fp32" if scheme == "float32" else f"{scheme} " + ("channel" if group is None else f"g{group}")


models = {"fp32": params}
for scheme, group in SCHEMES:
    models[label(scheme, group)] = nj.quantize(params, cfg, scheme, group)
fp32_bytes = weight_bytes(params)
for name, p in models.items():
    print(f"{name:13s} {weight_bytes(p):>10,} bytes  {weight_bytes(p) / fp32_bytes:.3f}x fp32")

# %% [markdown]
# ## Quality: whole-split val loss and KL to fp32
# `nanojax.quant.quality.quality_report` (what `scripts/eval_quant.py` prints) scores every target
# of the val split once, in non-overlapping 64-token windows, for the float model and each scheme;
# KL is KL(p_fp32 || p_quant) in nats per token, averaged over the same targets.

# %%
scored = val[: 64 * 64 * 4 + 1] if FAST else val  # fast mode: the first 4 batches of windows only
t0 = time.perf_counter()
rows = quality_report(params, cfg, scored, SCHEMES)
print(f"scored {len(rows)} models on {len(scored) - 1:,} targets in {time.perf_counter() - t0:.1f} s")
print(f"{'scheme':13s} {'val loss':>9s} {'rise':>8s} {'KL (nats/tok)':>14s} {'x fp32 bytes':>13s}")
for r in rows:
    print(f"{label(r['scheme'], r['group_size']):13s} {r['loss']:9.4f} {100 * r['rise']:+7.3f}% "
          f"{r['kl']:14.5f} {r['bytes_ratio']:13.3f}")

# %%
names = [label(r["scheme"], r["group_size"]) for r in rows]
colors = ["tab:gray", "tab:blue"] + ["tab:orange"] * (len(rows) - 2)
fig, axs = plt.subplots(1, 3, figsize=(13, 3.5))
axs[0].bar(names, [r["bytes"] / 1e6 for r in rows], color=colors)
axs[0].set_ylabel("weight MB (whole tree)")
axs[1].bar(names, [100 * r["rise"] for r in rows], color=colors)
axs[1].set_ylabel("val loss rise over fp32 (%)")
axs[2].bar(names[1:], [r["kl"] for r in rows[1:]], color=colors[1:])
axs[2].set_ylabel("KL(fp32 || quant), nats/token")
for a in axs:
    a.tick_params(axis="x", rotation=30)
fig.suptitle("Cost and size of each scheme (whole val split)")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Greedy samples: do they agree with fp32?
# Greedy decoding turns small logit changes into different tokens only where two candidates were
# nearly tied, and one different token changes all that follows. So: per prompt, how many tokens
# match fp32 before the first difference, and the share of positions that match.

# %%
N_PROMPTS, NEW = (4, 32) if FAST else (16, 48)
starts = np.linspace(0, len(val) - 20, N_PROMPTS).astype(int)
prompts = [[int(t) for t in val[s: s + 16]] for s in starts]  # 16-token prompts from the val split
# One prompt a call: batch 1, the shape the speed test below times (so it compiles once).
greedy = {name: [nj.generate(p, cfg, [pr], NEW)[0] for pr in prompts] for name, p in models.items()}
print(f"{'scheme':13s} {'same prefix (mean tokens)':>26s} {'same position (%)':>18s}")
for name, outs in greedy.items():
    prefix, same = [], []
    for a, b in zip(greedy["fp32"], outs, strict=True):
        diff = [i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y]
        prefix.append(diff[0] if diff else NEW)
        same.append(np.mean(np.equal(a, b)))
    print(f"{name:13s} {np.mean(prefix):26.1f} {100 * np.mean(same):18.1f}")
print()
print("prompt:   ", repr(tok.decode(prompts[0])))
for name in ("fp32", "int8 channel", "int4 g32"):
    print(f"{name:13s}", repr(tok.decode(greedy[name][0])))

# %% [markdown]
# ## Decode speed at batch 1
# One prompt, greedy, `NEW` new tokens per call, timed around `nj.generate` (prefill of a 16-token
# prompt included; that is a small share at this size). Each scheme is compiled first, then the
# schemes take turns, repeat after repeat, so that a noisy neighbour on the machine slows them all
# alike; the median of the repeats is shown.
#
# **On the CPU this measures whichever matmul path is present.** `nanojax/quant/ffi.py`'s C++
# kernels (int8/int4 dot products on the packed values; docs/quantization.md, "Speed") are used when
# they are built; without them each quantized product is pure JAX (dequantize, then one float dot),
# which is slower than fp32, not faster: the saving is memory until the kernels are there. On a GPU
# the fused dequantize-and-dot reads 4-8x fewer weight bytes, which is what decode is bound by.
# This model's 3 MB of fp32 weights fit in the CPU caches, so here reading fewer bytes saves little,
# and the pure-JAX path pays for its dequantizing: expect the quantized rows at or below fp32.

# %%
REPEATS = 3 if FAST else 30
kernels = importlib.util.find_spec("nanojax.quant.ffi") is not None
print("quantized CPU matmuls:", "nanojax.quant.ffi (C++ kernels when built)" if kernels
      else "pure JAX (dequantize, then dot): the kernel module is not in this checkout")
speed_models = dict(models)
speed_models["fp32 + int8 KV"] = params
kv = {name: ("int8" if name.endswith("int8 KV") else None) for name in speed_models}
prompt = [prompts[0]]


def decode(name):
    out = nj.generate(speed_models[name], cfg, prompt, NEW, kv_cache_dtype=kv[name])
    assert len(out[0]) == NEW  # the host has the tokens: the work is done


for name in speed_models:
    decode(name)  # compile
times = {name: [] for name in speed_models}
for _ in range(REPEATS):
    for name in speed_models:
        t0 = time.perf_counter()
        decode(name)
        times[name].append(time.perf_counter() - t0)
tps = {name: NEW / np.median(t) for name, t in times.items()}
for name, v in tps.items():
    print(f"{name:15s} {v:8.0f} tokens/s  ({v / tps['fp32']:.2f}x fp32)")

# %%
fig, ax = plt.subplots(figsize=(7, 3.5))
names_s = list(tps)
ax.bar(names_s, [tps[n] for n in names_s], color=colors + ["tab:green"])
for n in names_s:  # the spread of the repeats: their middle half
    lo, hi = NEW / np.percentile(times[n], 75), NEW / np.percentile(times[n], 25)
    ax.plot([n, n], [lo, hi], "k-", lw=1)
ax.set_ylabel("decode tokens/s (batch 1, median)")
ax.set_title(f"{jax.devices()[0].platform.upper()}: {NEW} new tokens a call, {REPEATS} interleaved repeats "
             "(bars: 25-75%)", fontsize=9)
ax.tick_params(axis="x", rotation=30)
plt.tight_layout()
plt.show()

# %% [markdown]
# ## The int8 KV cache
# `kv_cache_dtype="int8"` stores the cached keys and values as int8 with one float scale per token
# and kv head: H + 4 bytes instead of 4H per token and head. The prompt's own attention (prefill)
# uses the unrounded keys and values, so the first new token's logits are unchanged; later ones read
# the int8 cache. `return_logits=True` gives the logits behind each new token; they are compared
# position by position while both runs' greedy tokens agree (after a difference the inputs differ).

# %%
def step_logits(p, kv_dtype):
    """Logits (n, V) behind each greedy token of the first prompt, and the tokens."""
    out, logits = nj.generate(p, cfg, prompt, NEW, kv_cache_dtype=kv_dtype, return_logits=True)
    return np.asarray(out[0]), logits[0]


def kl(ref, other):  # KL(softmax(ref) || softmax(other)) per row, nats
    ref, other = ref.astype(np.float64), other.astype(np.float64)
    lr = ref - np.logaddexp.reduce(ref, axis=-1, keepdims=True)
    lo = other - np.logaddexp.reduce(other, axis=-1, keepdims=True)
    return np.sum(np.exp(lr) * (lr - lo), axis=-1)


kv_rows = []
for name in ("fp32", "int4 g32") if FAST else ("fp32", "int8 channel", "int4 g32"):
    toks_f, lg_f = step_logits(models[name], None)
    toks_q, lg_q = step_logits(models[name], "int8")
    n_same = next((i for i, (a, b) in enumerate(zip(toks_f, toks_q, strict=True)) if a != b), NEW)
    # Compare logits only while both runs have seen the same tokens.
    d = np.abs(lg_f[:n_same] - lg_q[:n_same]).max(axis=-1)
    k = kl(lg_f[:n_same], lg_q[:n_same])
    kv_rows.append((name, d, k))
    print(f"{name:13s} weights: tokens equal for {n_same}/{NEW}; first token's logits differ by "
          f"{d[0]:.1e}; max |dlogit| {d.max():.3f}, mean KL {k.mean():.2e} nats over those steps")
kv_bytes = cfg.n_layer * 2 * (cfg.n_kv_head or cfg.n_head)  # keys and values, per layer and kv head
H = cfg.resolved_head_dim
print(f"KV cache per token: {kv_bytes * 4 * H:,} bytes fp32 vs {kv_bytes * (H + 4):,} bytes int8")

# %%
fig, ax = plt.subplots(figsize=(6, 3.5))
for name, d, _ in kv_rows:
    ax.plot(np.arange(len(d)), d, marker=".", label=f"{name} weights")
ax.set_xlabel("new token index")
ax.set_ylabel("max |logit(fp cache) - logit(int8 cache)|")
ax.set_title("Effect of the int8 KV cache on the logits")
ax.legend()
plt.tight_layout()
plt.show()
