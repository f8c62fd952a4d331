"""The whole-split validation loss (train.evaluate_full, data.full_split_batches): every target
token predicted exactly once, token-weighted, against a loop of `nj.forward` over the windows;
on one device, on a 2-device mesh, and as train() logs it (metrics.jsonl `val_loss_full`)."""

import os
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

import nanojax as nj
from nanojax import data
from nanojax.metrics import read_metrics
from nanojax.tokenizer import CharTokenizer
from nanojax.train import (
    ConfigError,
    build,
    default_config,
    evaluate_full,
    model_config_from,
    train,
    validate_config,
)

REPO = Path(__file__).resolve().parent.parent
T, V = 16, 23
# 198 targets: 12 full windows and one of 6 target tokens. With B = 4 or 6 the 13 windows need
# padding rows, and the 12 full ones alone would fill whole batches (so a lost last window shows).
N_TOKENS = 12 * T + 7


def tiny_config(batch_size=4, mesh=None):
    """A 1-layer model whose random init (std 0.3) already gives unequal per-token losses, so a
    dropped, doubled or wrongly weighted token moves the mean well past the tolerance."""
    c = default_config("shakespeare-char-cpu", vocab_size=V, n_layer=1, n_head=2, d_model=16,
                       max_seq_len=T, init_std=0.3)
    c.batch_size = batch_size
    if mesh:
        c.mesh.update(mesh)
    return c


def reference_loss(params, cfg, tokens):
    """Mean next-token loss (nats) over tokens[1:], each predicted once from the window it falls
    in: windows tokens[s : s + T + 1] for s = 0, T, 2T, ..., the last one shorter. float64 sums."""
    fwd = jax.jit(nj.forward, static_argnums=2)
    total, count = 0.0, 0
    for s in range(0, len(tokens) - 1, cfg.max_seq_len):
        win = np.asarray(tokens[s:s + cfg.max_seq_len + 1], np.int32)  # (t + 1,), t <= T
        x, y = win[:-1], win[1:]
        logits = np.asarray(fwd(params, x[None], cfg)[0], np.float64)  # (t, V)
        top = logits.max(-1, keepdims=True)
        logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
        total -= logp[np.arange(len(y)), y].sum()
        count += len(y)
    assert count == len(tokens) - 1
    return total / count


def full_and_reference(batch_size=4, mesh=None):
    """(evaluate_full, reference_loss) on a fresh tiny model and a random split of N_TOKENS."""
    config = tiny_config(batch_size, mesh)
    cfg = model_config_from(config)
    run = build(config, cfg)
    params = run.init_fn(jax.random.key(0))[0]
    tokens = np.random.default_rng(0).integers(0, V, N_TOKENS).astype(np.uint16)
    return evaluate_full(run, params, tokens, batch_size), reference_loss(jax.device_get(params), cfg, tokens)


def test_windows_cover_every_target_once():
    """The batches' weighted targets are exactly tokens[1:], in order, each once, for any batch
    size and process split; padding (weight 0) only fills the end."""
    tokens = np.arange(1, N_TOKENS + 1, dtype=np.uint16)  # ids 1.. so padding (0) is visible
    for B, P in ((1, 1), (4, 1), (4, 2), (3, 3), (32, 2)):
        rows = [list(data.full_split_batches(tokens, T, B, p, P)) for p in range(P)]
        assert len({len(r) for r in rows}) == 1  # every process makes the same number of calls
        got = []
        for batches in zip(*rows, strict=True):  # one call: the processes' shares, in row order
            for x, y, w in batches:
                assert x.shape == y.shape == w.shape == (B // P, T) and x.dtype == y.dtype == np.int32
                assert np.all(x[:, 1:] == y[:, :-1]) and np.all((w == 0) | (w == 1))
                got += list(y[w == 1])
        assert got == list(tokens[1:]), (B, P)


def test_full_split_loss_equals_a_forward_loop():
    t0 = time.perf_counter()
    full, ref = full_and_reference()
    assert abs(full - ref) < 1e-5, (full, ref)
    print(f"one device: {full:.6f} vs {ref:.6f} in {time.perf_counter() - t0:.1f} s")


def test_full_split_loss_on_a_2_device_mesh():
    """The same number with the windows split over 2 devices and the params sharded too (fsdp=2:
    the batch is split over data x fsdp); the rows padding the last batch count for nothing."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu",
               PYTHONPATH=str(REPO))
    p = subprocess.run([sys.executable, __file__], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0 and "OK" in p.stdout, p.stdout + p.stderr


def two_device_checks():
    assert jax.device_count() == 2
    full, ref = full_and_reference(batch_size=6, mesh={"data": 1, "fsdp": 2})  # 13 windows -> 18 rows
    assert abs(full - ref) < 1e-5, (full, ref)


def test_train_logs_the_full_split_loss_at_the_last_step(tmp_path, compile_cache):
    rng = np.random.default_rng(1)
    text = "".join(rng.choice(list("abcdefgh ijklmnop\nqrstu"), size=3_000))
    data.prepare(text, CharTokenizer.from_text(text), tmp_path / "data")
    config = tiny_config()
    config.model.vocab_size = 0
    config.update(data_dir=str(tmp_path / "data"), max_steps=3, warmup_steps=1, eval_every=2,
                  eval_iters=1, ckpt_every=3)
    summary = train(config, tmp_path / "run", progress=False)
    vals = [r for r in read_metrics(tmp_path / "run/metrics.jsonl") if "val_loss" in r]
    assert [r["step"] for r in vals] == [2, 3] and "val_loss_full" not in vals[0]
    cfg, params, _ = nj.load_checkpoint(tmp_path / "run")
    val = np.fromfile(tmp_path / "data/val.bin", np.uint16)
    assert (len(val) - 1) % T  # the last window is partial
    ref = reference_loss(params, cfg, val)
    assert abs(vals[1]["val_loss_full"] - ref) < 1e-5 and summary["val_loss_full"] == vals[1]["val_loss_full"]

    config.eval_full_at_end = False
    config.max_steps = 4
    summary = train(config, tmp_path / "run", progress=False)
    assert "val_loss_full" not in summary
    assert "val_loss_full" not in read_metrics(tmp_path / "run/metrics.jsonl")[-1]

    del config["eval_full_at_end"]  # the typed field refuses a non-bool; an edited config need not
    config.eval_full_at_end = 1
    with pytest.raises(ConfigError, match=r"eval_full_at_end=1: must be True or False"):
        validate_config(config, n_devices=1, n_processes=1)


if __name__ == "__main__":
    two_device_checks()
    print("OK")
