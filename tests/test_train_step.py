"""What a training step computes: the loss falls (on real text, in fp32 and bf16 alike), micro-batches
accumulate to one big batch, a non-finite step changes nothing, and dropout masks, rescales and
stays out of evaluation.

The runs here share conftest's `trained` (tests/train_run.py) with test_train.py, which checks
the loop around the step: resume, checkpoints, the scripts.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from train_run import LN_VOCAB, STEPS, TINY, base_config, losses

import nanojax as nj
from nanojax import data
from nanojax import sharding as shd
from nanojax.metrics import read_metrics
from nanojax.model import hidden_states, param_shapes
from nanojax.tokenizer import CharTokenizer
from nanojax.train import build, loss_fn, make_eval_step, make_train_step, model_config_from, train

pytestmark = pytest.mark.usefixtures("compile_cache")


def test_loss_falls_on_real_text(shakespeare_text, tmp_path):
    data.prepare(shakespeare_text, CharTokenizer.from_text(shakespeare_text), tmp_path / "data")
    c = base_config(tmp_path / "data", {
        "model.n_layer": 2, "model.n_head": 4, "model.d_model": 64, "model.max_seq_len": 32,
        "grad_accum": 1, "max_steps": 150, "lr": 3e-3, "min_lr": 1e-4, "warmup_steps": 100,
        "eval_every": 150, "eval_iters": 5, "ckpt_every": 150})
    s = train(c, tmp_path / "run", progress=False)
    first = losses(tmp_path / "run")[1]
    assert first > 3.8  # ~ln(65) at init
    assert s["val_loss"] < 2.7 and s["train_loss"] < 2.7, s
    cfg, params, tok = nj.load_checkpoint(tmp_path / "run")
    assert cfg.vocab_size == 65 and tok.decode(tok.encode("ROMEO:")) == "ROMEO:"
    assert jax.tree.map(lambda x: x.shape, params) == jax.tree.map(lambda x: x.shape, param_shapes(cfg))


def test_loss_falls_in_fp32_and_bf16_alike(synth_data, trained, tmp_path):
    """On learnable text both runs fall from ln 23 far below it (where a run that learns nothing
    stays), the bf16-compute run step by step within 3% of the fp32 one, with fp32 master weights."""
    train(base_config(synth_data, {"model.dtype": "bfloat16", "ckpt_every": 100}), tmp_path / "b16",
          progress=False)
    f32, b16 = losses(trained), losses(tmp_path / "b16")
    assert sorted(b16) == sorted(f32) == list(range(1, STEPS + 1))
    for run in (f32, b16):
        assert abs(run[1] - LN_VOCAB) < 0.05, run[1]  # the init predicts ~uniformly
        assert np.mean([run[s] for s in range(STEPS - 3, STEPS + 1)]) < 0.6 * LN_VOCAB, run
    np.testing.assert_allclose([b16[s] for s in f32], list(f32.values()), rtol=0.03)
    assert b16[1] != f32[1]  # and the bf16 run really computed in bf16
    vals = [r["val_loss"] for w in (trained, tmp_path / "b16") for r in read_metrics(w / "metrics.jsonl")
            if r.get("step") == STEPS and "val_loss" in r]
    assert len(vals) == 2 and max(vals) < 0.6 * LN_VOCAB and abs(vals[0] - vals[1]) < 0.03 * vals[0], vals
    cfg, params, _ = nj.load_checkpoint(tmp_path / "b16")
    assert cfg.dtype == "bfloat16"
    assert {x.dtype for x in jax.tree.leaves(params)} == {np.dtype("float32")}  # master weights


def test_grad_accumulation_equals_one_big_batch(synth_data, fresh_params):
    """4 micro-batches of 2 rows average to the gradient of the same 8 rows at once."""
    cfg = TINY
    opt = optax.sgd(1.0)  # the update is the gradient itself
    params = fresh_params
    tokens = np.fromfile(synth_data / "train.bin", np.uint16)
    x, y = data.get_batch(tokens, 16, 8, seed=0, step=0)
    step = jax.jit(make_train_step(cfg, opt, 0))
    p1, _, m1 = step(params, opt.init(params), x, y, 0)
    p4, _, m4 = step(params, opt.init(params), x.reshape(4, 2, 16), y.reshape(4, 2, 16), 0)
    np.testing.assert_allclose(m1["loss"], m4["loss"], rtol=1e-5)
    np.testing.assert_allclose(m1["grad_norm"], m4["grad_norm"], rtol=1e-4)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), p1, p4)


@pytest.mark.parametrize("adamw_kernel", ["1", "0"])
def test_a_nonfinite_step_changes_neither_params_nor_optimizer_state(synth_data, trained, monkeypatch,
                                                                    adamw_kernel):
    """The compiled training step given a NaN loss, or a finite loss whose gradient norm
    overflows, returns ok=False and the params and Adam state it was given, bit for bit: with the
    one-call AdamW kernel where it runs, and with optax's update (NANOJAX_ADAMW_KERNEL=0, as under a
    mesh of several devices or without the kernels)."""
    monkeypatch.setenv("NANOJAX_ADAMW_KERNEL", adamw_kernel)  # read when build() makes the step
    config = base_config(synth_data)
    run = build(config, model_config_from(config, 23))
    tokens = np.fromfile(synth_data / "train.bin", np.uint16)
    x, y = (shd.put_batch(a, run.batch_sharding) for a in data.get_batch(tokens, 16, 8, config.seed, 0, 2))
    params, opt_state = run.init_fn(jax.random.key(0))
    params, opt_state, m = run.step_fn(params, opt_state, x, y, np.int32(0))  # Adam's moments now != 0
    assert m["ok"]
    good = jax.device_get(params)
    nan_row = jax.tree.map(np.array, good)
    nan_row["wte"][x[0, 0, 0]] = np.nan  # the loss is NaN
    huge_norm = jax.tree.map(np.array, good)
    huge_norm["ln_f"]["scale"] *= 1e21  # logits ~1e20: a finite loss, a gradient norm^2 past fp32
    for bad in (nan_row, huge_norm):
        state = jax.device_get(opt_state)
        new_params, new_state, m = run.step_fn(jax.device_put(bad, run.param_shardings),
                                               jax.device_put(state, run.opt_shardings), x, y, np.int32(1))
        m = jax.device_get(m)
        assert not m["ok"], m
        assert jax.tree.structure(new_params) == jax.tree.structure(bad)
        jax.tree.map(np.testing.assert_array_equal, jax.device_get(new_params), bad)
        jax.tree.map(np.testing.assert_array_equal, jax.device_get(new_state), state)
    assert np.isfinite(m["loss"]) and not np.isfinite(m["grad_norm"]), m


# ----------------------------------------------------------------------------------------------
# Dropout (configs/shakespeare_char.py trains with 0.2)


def _tokens(shape, seed=0):
    return np.random.default_rng(seed).integers(0, TINY.vocab_size, shape).astype(np.int32)


def test_dropout_zeroes_or_rescales_each_activation_and_keeps_the_mean(fresh_params):
    """With the blocks' output projections zeroed, hidden_states is the dropped-out embedding:
    over 64 keys each value is 0 or the dropout-free value / (1 - p), about a fraction p are 0,
    and the values average to the dropout-free ones."""
    p = 0.25
    cfg = TINY.replace(dropout=p)
    params = jax.tree.map(np.copy, fresh_params)
    for layer in params["layers"]:
        layer["attn"]["wo"][...] = 0
        layer["mlp"]["w_out"][...] = 0
    tokens = _tokens((8, 16))
    ref = np.asarray(hidden_states(params, tokens, cfg)[0])  # no key: no dropout
    keys = jax.random.split(jax.random.key(1), 64)
    got = np.asarray(jax.jit(jax.vmap(lambda k: hidden_states(params, tokens, cfg, dropout_rng=k)[0]))(keys))
    kept = got != 0
    np.testing.assert_allclose(got[kept], np.broadcast_to(ref / (1 - p), got.shape)[kept], rtol=1e-6)
    assert abs(kept.mean() - (1 - p)) < 0.01, kept.mean()
    assert not (kept[0] == kept[1]).all()  # each key its own mask
    ratio = float((got.mean(0) * ref).sum() / (ref * ref).sum())  # E[dropout(x)] = x
    assert abs(ratio - 1) < 0.01, ratio


def test_dropout_masks_are_fresh_each_step_and_each_micro_batch(fresh_params):
    """The loss of a dropout-0.5 training step that accumulates one micro-batch twice, over 400
    steps, twice: the same step gives the same loss, each step another, none the dropout-free
    loss; and it varies half as much as the loss of that micro-batch under one random mask (so
    two masks a step, not one drawn twice)."""
    cfg = TINY.replace(dropout=0.5)
    params = fresh_params
    opt = optax.sgd(0.0)
    step = make_train_step(cfg, opt, seed=0)
    x, y = _tokens((4, 16), 1), _tokens((4, 16), 2)
    steps = jnp.tile(jnp.arange(400), 2)
    twice = np.asarray(jax.jit(jax.vmap(
        lambda s: step(params, opt.init(params), np.stack([x, x]), np.stack([y, y]), s)[2]["loss"]))(steps))
    np.testing.assert_array_equal(twice[:400], twice[400:])
    assert len(np.unique(twice[:400])) > 390  # (a few fp32 values may coincide)
    keys = jax.random.split(jax.random.key(7), 400)
    once = np.asarray(jax.jit(jax.vmap(lambda k: loss_fn(params, x, y, cfg, k)))(keys))
    clean = float(jax.jit(loss_fn, static_argnums=3)(params, x, y, cfg))
    for run in (twice, once):  # (a few may come near it by chance)
        assert np.isclose(run, clean, rtol=1e-6).mean() < 0.05, run
    ratio = twice[:400].var() / once.var()
    assert 0.35 < ratio < 0.7, ratio


def test_eval_and_forward_without_a_key_are_dropout_free(fresh_params):
    """The eval step of a dropout-0.5 model equals, bit for bit, the loss of the same params with
    dropout 0, every time; so does forward without a key."""
    params = fresh_params
    x, y = _tokens((4, 16), 1), _tokens((4, 16), 2)
    eval_fn = jax.jit(make_eval_step(TINY.replace(dropout=0.5)))
    ref = jax.jit(make_eval_step(TINY))(params, x, y)
    assert eval_fn(params, x, y) == eval_fn(params, x, y) == ref
    np.testing.assert_array_equal(nj.forward(params, x, TINY.replace(dropout=0.5)),
                                  nj.forward(params, x, TINY))
