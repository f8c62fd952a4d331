"""Training: the loss falls (fp32 and bf16), exact resume after kills and signals and on another
mesh, the non-finite guard, dropout, the scripts' flags end to end, and every bad input.

Most tests share one tiny run, `trained`: configs/shakespeare_char_cpu.py with OVERRIDES, the
same overrides the script tests pass as --config.* flags. Tests that only read it use it as is;
tests that write copy it first. The persistent compilation cache (conftest) lets every run of
that config, in this process or a subprocess, load the step compiled once.
"""

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import checkpoint_steps, cpu_config

import nanojax as nj
from nanojax import data
from nanojax import sharding as shd
from nanojax.metrics import MetricsWriter, cpu_description, read_metrics, trace_op_times
from nanojax.model import hidden_states, param_shapes
from nanojax.tokenizer import CharTokenizer
from nanojax.train import (
    NonFiniteLossError,
    WorkdirMismatchError,
    build,
    loss_fn,
    make_eval_step,
    make_train_step,
    model_config_from,
    train,
)

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.usefixtures("compile_cache")

ALPHABET = "abcdefgh ijklmnop\nqrstu"  # 23 symbols


def _markov_text(n: int = 40_000, p_follow: float = 0.8, seed: int = 0) -> str:
    """Each symbol is followed by its own fixed successor 80% of the time, else by a uniform pick.
    Every symbol is equally frequent, so a model that learns nothing (or only symbol counts)
    sits at ln 23 = 3.14 nats, while one that learns the pairs heads for ~1.08 nats."""
    rng = np.random.default_rng(seed)
    successor = rng.permutation(len(ALPHABET))
    follow = rng.random(n) < p_follow
    pick = rng.integers(0, len(ALPHABET), n)
    ids = [0]
    for i in range(1, n):
        ids.append(successor[ids[-1]] if follow[i] else pick[i])
    return "".join(ALPHABET[i] for i in ids)


SYNTH = _markov_text()
LN_VOCAB = math.log(len(ALPHABET))

# The shared run: small enough that compiling its step is most of its cost. Checkpoints every 4
# steps (the last two kept: 20 and 24), val loss at 12 and 24.
STEPS = 24
OVERRIDES = {
    "model.n_layer": 1, "model.n_head": 2, "model.d_model": 32, "model.max_seq_len": 16,
    "batch_size": 8, "grad_accum": 2, "max_steps": STEPS, "lr": 1e-2, "min_lr": 1e-3, "warmup_steps": 4,
    "eval_every": 12, "eval_iters": 2, "ckpt_every": 4, "seed": 5,
}
CONFIG_FILE = REPO / "configs/shakespeare_char_cpu.py"
TINY = nj.ModelConfig.preset("shakespeare-char-cpu", vocab_size=len(ALPHABET), n_layer=1, n_head=2,
                             d_model=32, max_seq_len=16)  # OVERRIDES' model


def base_config(data_dir, changes=None):
    """configs/shakespeare_char_cpu.py with OVERRIDES and `changes` ({"model.dtype": ...})."""
    return cpu_config(data_dir, OVERRIDES, changes)


def train_cmd(data_dir, workdir, *extra):
    """scripts/train.py with OVERRIDES as --config.* flags: the script's twin of base_config."""
    flags = [f"--config.{k}={v}" for k, v in {**OVERRIDES, "data_dir": data_dir}.items()]
    return [sys.executable, str(REPO / "scripts/train.py"), f"--config={CONFIG_FILE}",
            f"--workdir={workdir}", *flags, *extra]


def script_env(compile_cache, devices=1):
    flag = f"--xla_force_host_platform_device_count={devices}"
    return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=flag, **compile_cache)


# Runs a script as `python SCRIPT ARGS` does, sending itself SIG right after the metrics line of
# step AT is written (once checkpoint WAIT is on disk, if not 0): a signal at a known step,
# without racing the run from outside.
SIGNAL_AT = """
import os, runpy, sys, time
from nanojax.metrics import MetricsWriter
sig, at, wait = (int(a) for a in sys.argv[1:4])
write = MetricsWriter.write
def write_then_signal(self, rec):
    write(self, rec)
    if rec.get("step") == at and "grad_norm" in rec:
        done = self.path.parent / "checkpoints" / str(wait)
        for _ in range(6000):
            if not wait or done.is_dir():
                break
            time.sleep(0.01)
        os.kill(os.getpid(), sig)
MetricsWriter.write = write_then_signal
sys.argv = sys.argv[4:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def signalled(cmd, sig, at, wait=0):
    return [sys.executable, "-c", SIGNAL_AT, str(int(sig)), str(at), str(wait), *cmd[1:]]


def train_signalled(monkeypatch, config, workdir, sig, at):
    """train() in this process, sent `sig` right after step `at`'s metrics line is written. A
    signal train() failed to catch fails the test instead of ending pytest."""

    def uncaught(signum, frame):
        raise AssertionError(f"signal {signum} reached the test: train() did not handle it")

    write = MetricsWriter.write

    def write_then_signal(self, rec):
        write(self, rec)
        if rec.get("step") == at and "grad_norm" in rec:
            os.kill(os.getpid(), sig)

    monkeypatch.setattr(MetricsWriter, "write", write_then_signal)
    old = signal.signal(sig, uncaught)
    try:
        return train(config, workdir, progress=False)
    finally:
        signal.signal(sig, old)
        monkeypatch.undo()


def losses(workdir):
    return {r["step"]: r["train_loss"] for r in read_metrics(Path(workdir) / "metrics.jsonl")
            if "grad_norm" in r}


def step_lines(workdir):
    """The step of every training line in metrics.jsonl, in file order."""
    return [r["step"] for r in read_metrics(Path(workdir) / "metrics.jsonl") if "grad_norm" in r]


def copy_run(src, dst):
    shutil.copytree(src, dst)
    return dst


@pytest.fixture(scope="module")
def synth_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("synth")
    data.prepare(SYNTH, CharTokenizer.from_text(SYNTH), d)
    return d


@pytest.fixture(scope="module")
def trained(synth_data, tmp_path_factory):
    """The reference run: base_config, one device, uninterrupted."""
    workdir = tmp_path_factory.mktemp("trained") / "run"
    train(base_config(synth_data), workdir, progress=False)
    return workdir


@pytest.fixture(scope="module")
def fresh_params(trained, synth_data):
    """Freshly initialised params of the reference run's model, on the host: its init is compiled
    already (eager init_params compiles op by op, seconds)."""
    config = base_config(synth_data)
    cfg = model_config_from(config, len(ALPHABET))
    assert cfg == TINY
    return jax.device_get(build(config, cfg).init_fn(jax.random.key(0))[0])


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


# ----------------------------------------------------------------------------------------------
# Resume, checkpoints, the scripts


def test_killed_and_interrupted_runs_resume_to_exactly_the_same_losses(synth_data, trained, tmp_path,
                                                                        monkeypatch, compile_cache):
    """The reference run again (grad_accum 2), stopped four times: SIGKILL by the script, SIGTERM
    in this process, SIGINT by the script on 2 devices with FSDP-sharded params, then finished
    here on one device. Every resume gives the reference losses: bit for bit on one device,
    within float noise after the 2-device part. The script's run resolves its --config flags to
    the config built here."""
    expected = losses(trained)
    assert sorted(expected) == list(range(1, STEPS + 1))
    run = tmp_path / "run"
    cmd = train_cmd(synth_data, run)

    # A hard kill at step 10, after checkpoint 8 is written: the script gets no chance to save.
    p = subprocess.run(signalled(cmd, signal.SIGKILL, 10, wait=8), capture_output=True, text=True,
                       env=script_env(compile_cache))
    assert p.returncode == -signal.SIGKILL, p.stderr[-3000:]
    saved = json.loads((run / "config.json").read_text())["train"]
    assert saved == json.loads(json.dumps(base_config(synth_data).to_dict(), default=str))
    assert checkpoint_steps(run) == [4, 8] and losses(run) == {s: expected[s] for s in range(1, 11)}

    # SIGTERM at step 13: saves step 14 and returns.
    s = train_signalled(monkeypatch, base_config(synth_data), run, signal.SIGTERM, 13)
    assert (s["interrupted"], s["start_step"], s["step"]) == (signal.SIGTERM, 8, 14), s
    assert step_lines(run) == list(range(1, 15))  # steps 9 and 10 recomputed, logged once
    assert losses(run) == {s: expected[s] for s in range(1, 15)}

    # Ctrl-C at step 17 on another mesh: 2 devices, params sharded over fsdp.
    two = script_env(compile_cache, devices=2)
    p = subprocess.run(signalled(cmd + ["--config.mesh.fsdp=2"], signal.SIGINT, 17), capture_output=True,
                       text=True, env=two)
    assert p.returncode == 128 + signal.SIGINT, p.stdout[-2000:] + p.stderr[-3000:]
    assert "rerun the same command to resume" in p.stdout
    assert checkpoint_steps(run) == [16, 18]

    # Back on one device, from the checkpoint the 2-device run wrote: to the end.
    s = train(base_config(synth_data), run, progress=False)
    assert (s["interrupted"], s["start_step"], s["step"]) == (None, 18, STEPS)
    got = losses(run)
    assert step_lines(run) == list(range(1, STEPS + 1))  # one line per step: the killed run's extras dropped
    assert {s: got[s] for s in range(1, 15)} == {s: expected[s] for s in range(1, 15)}
    np.testing.assert_allclose([got[s] for s in range(15, STEPS + 1)],
                               [expected[s] for s in range(15, STEPS + 1)], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 nj.load_checkpoint(run)[1], nj.load_checkpoint(trained)[1])

    # Once more: the run is finished; it says so, trains nothing and leaves the metrics alone.
    again = subprocess.run(cmd, capture_output=True, text=True, env=script_env(compile_cache))
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"already reached step {STEPS}" in again.stdout, again.stdout
    assert losses(run) == got


def test_training_a_workdir_holding_imported_weights_fine_tunes_them(synth_data, tmp_path):
    """A step-0 checkpoint (what scripts/convert.py --hf_dir writes) is the starting point."""
    from nanojax.checkpoint import Checkpointer

    c = base_config(synth_data, {"ckpt_every": 100})
    cfg = model_config_from(c, 23)
    # Weights no fresh init would give (10x the init scale), so the first loss tells them apart.
    trained = nj.init_params(cfg.replace(init_std=0.2), jax.random.key(3))
    work = tmp_path / "imported"
    ckpt = Checkpointer(work / "checkpoints", save_every=1)
    ckpt.save(0, trained, {"imported_from_hf": 0}, force=True)
    ckpt.close()
    (work / "config.json").write_text(json.dumps({"model": cfg.to_dict(), "train": {}}))
    train(c, work, progress=False)
    tokens = np.fromfile(synth_data / "train.bin", np.uint16)
    x, y = data.get_batch(tokens, 16, c.batch_size, seed=c.seed, step=0, accum=c.grad_accum)
    expected = np.mean([float(loss_fn(trained, x[i], y[i], cfg)) for i in range(c.grad_accum)])
    assert losses(work)[1] == pytest.approx(expected, rel=1e-5)
    fresh = float(loss_fn(nj.init_params(cfg, jax.random.key(c.seed)), x[0], y[0], cfg))
    assert abs(fresh - expected) > 0.1  # so the test can tell imported weights from a fresh init


def test_unknown_config_key_is_named(synth_data, tmp_path):
    for flag, name in (("--config.nonexistent=1", "nonexistent"), ("--config.model.n_layers=3", "n_layers")):
        p = subprocess.run(train_cmd(synth_data, tmp_path / "w", flag), capture_output=True, text=True)
        assert p.returncode != 0
        err = p.stderr.lower()
        assert name in p.stderr and ("not found" in err or "unknown" in err), p.stderr
        assert not (tmp_path / "w").exists()


def test_sample_script_flags_take_effect(trained, compile_cache):
    """scripts/sample.py with a prompt, a length past the context, temperature, top-k and seed
    prints the prompt and exactly what generate() samples with those settings. None is a default
    (0.8, 200, 0, 500), so a flag the script dropped would change the text."""
    prompt, n = "abc", 40  # 3 + 40 tokens > the 16-token context: it slides
    p = subprocess.run([sys.executable, str(REPO / "scripts/sample.py"), f"--workdir={trained}",
                        f"--prompt={prompt}", f"--max_new_tokens={n}", "--temperature=1.5", "--top_k=6",
                        "--seed=3", "--nostream"],
                       capture_output=True, text=True, env=script_env(compile_cache))
    assert p.returncode == 0, p.stderr[-3000:]
    cfg, params, tok = nj.load_checkpoint(trained)
    new = nj.generate(params, cfg, [tok.encode(prompt)], max_new_tokens=n, temperature=1.5, top_k=6, seed=3,
                      overflow="slide")[0]
    assert len(new) == n and p.stdout == prompt + tok.decode(new) + "\n", p.stdout


def test_workdir_of_another_model_is_refused_untouched(synth_data, trained, tmp_path):
    work = copy_run(trained, tmp_path / "run")
    before = {p: p.stat().st_mtime_ns for p in work.rglob("*") if p.is_file()}
    with pytest.raises(WorkdirMismatchError, match="n_layer: workdir has 1, config has 2"):
        train(base_config(synth_data, {"model.n_layer": 2}), work, progress=False)
    after = {p: p.stat().st_mtime_ns for p in work.rglob("*") if p.is_file()}
    assert before == after


def test_half_written_and_damaged_checkpoints(synth_data, trained, tmp_path):
    """A copy of the reference run whose last step is an unfinished save, then one whose last step
    lost its files: each time it resumes from the step before and ends with the reference losses."""
    work = copy_run(trained, tmp_path / "run")
    ckpts = work / "checkpoints"
    assert checkpoint_steps(work) == [STEPS - 4, STEPS]
    # What an interrupted save leaves behind (a temporary directory) is ignored and cleaned up;
    # the run resumes from the step before and ends as the reference did.
    junk = ckpts / f"{STEPS}.orbax-checkpoint-tmp-1234567"
    (ckpts / str(STEPS)).rename(junk)
    s = train(base_config(synth_data), work, progress=False)
    assert s["start_step"] == STEPS - 4 and s["step"] == STEPS and not junk.exists()
    assert losses(work) == losses(trained)
    # A step directory that lost its files is reported, moved aside (kept) and resumed before.
    for f in (ckpts / str(STEPS) / "params").rglob("*"):
        if f.is_file():
            f.write_bytes(b"")
    s = train(base_config(synth_data), work, progress=False)
    assert s["start_step"] == STEPS - 4 and s["step"] == STEPS, s
    assert len(s["skipped_checkpoints"]) == 1 and str(STEPS) in s["skipped_checkpoints"][0], s
    assert [p.name.split(".")[0] for p in ckpts.glob("*.corrupt-*")] == [str(STEPS)]
    assert losses(work) == losses(trained)


def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(synth_data, trained, tmp_path):
    work = copy_run(trained, tmp_path / "run")
    # The same run continued with an absurd learning rate blows up within a few steps.
    c = base_config(synth_data, {"max_steps": 40, "lr": 1e12, "warmup_steps": 0, "grad_clip": 0.0})
    with pytest.raises(NonFiniteLossError, match=r"not finite.*last good checkpoint \(step \d+\)"):
        train(c, work, progress=False)
    _, params, _ = nj.load_checkpoint(work)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))
    assert max(r["step"] for r in read_metrics(work / "metrics.jsonl")) < 40
    assert jax.tree.structure(params) == jax.tree.structure(nj.load_checkpoint(trained)[1])


def test_bad_data_and_vocab(synth_data, tmp_path):
    with pytest.raises((FileNotFoundError, ValueError), match="prepare_data.py"):
        train(base_config(tmp_path / "missing"), tmp_path / "w", progress=False)
    short = tmp_path / "short"
    data.prepare("abcdefghij" * 10, CharTokenizer.from_text("abcdefghij"), short)
    with pytest.raises(ValueError, match="fewer than seq_len"):
        train(base_config(short), tmp_path / "w", progress=False)
    c = base_config(synth_data, {"model.vocab_size": 10})
    with pytest.raises(ValueError, match="has 23 tokens but model.vocab_size=10"):
        train(c, tmp_path / "w", progress=False)
    bad = tmp_path / "bad"
    shutil.copytree(synth_data, bad)
    ids = np.fromfile(bad / "train.bin", np.uint16)
    ids[100] = 99
    ids.tofile(bad / "train.bin")
    with pytest.raises(ValueError, match="token id 99, out of range for vocab_size=23"):
        train(base_config(bad), tmp_path / "w2", progress=False)
    assert not (tmp_path / "w").exists() or not any((tmp_path / "w").rglob("*.json"))
    assert json.loads((synth_data / "meta.json").read_text())["vocab_size"] == len(set(SYNTH)) == 23


def test_profile_traces_exactly_the_asked_steps_and_names_their_ops(synth_data, tmp_path):
    quiet = {"ckpt_every": 100, "eval_every": 100}
    c = base_config(synth_data, {"profile": "3:5", **quiet})
    train(c, tmp_path / "a", progress=False)
    ops, steps = trace_op_times(tmp_path / "a" / "profile", by_kind=False)
    assert steps == 2
    # Every op the summary names is an instruction of the compiled step (XLA's own HLO text).
    run = build(c, model_config_from(c, vocab_size=len(ALPHABET)))
    params, opt_state = run.init_fn(jax.random.key(0))
    x = shd.put_batch(np.zeros((c.grad_accum, c.batch_size, 16), np.int32), run.batch_sharding)
    hlo = run.step_fn.lower(params, opt_state, x, x, np.int32(0)).compile().as_text()  # train()'s executable
    names = set(re.findall(r"%([\w.-]+) = ", hlo))
    step_ops = [o for o in ops if o.module == "jit_step_fn"]
    assert step_ops and all(o.count > 0 for o in step_ops) and sum(o.seconds for o in step_ops) > 0
    assert {o.name for o in step_ops} <= names, {o.name for o in step_ops} - names
    assert any("dot" in o.name or o.name.startswith("ynn") for o in step_ops)  # the matmuls are there
    # A window running past the last step still closes the trace and writes it.
    train(base_config(synth_data, {"profile": f"{STEPS - 2}:40", **quiet}), tmp_path / "b", progress=False)
    assert trace_op_times(tmp_path / "b" / "profile")[1] == 2
    with pytest.raises(ValueError, match="START:END"):
        train(base_config(synth_data, {"profile": "5"}), tmp_path / "c", progress=False)
    with pytest.raises(FileNotFoundError, match="--config.profile"):
        trace_op_times(tmp_path / "c")


def test_metrics_header_records_the_cpu_devices_and_xla_flags(trained):
    """The first metrics.jsonl line describes the process that trained: what nanojax chose for
    XLA_FLAGS on this CPU (and the user's flags), the CPU line the benches print, the devices."""
    first = read_metrics(trained / "metrics.jsonl")[0]
    assert first["step"] == 0 and set(first) == {"step", "header"}, first
    h = first["header"]
    assert h["xla_tuning"] == nj.xla_tuning()
    assert h["xla_tuning"]["xla_flags"] == os.environ.get("XLA_FLAGS", "")
    assert h["cpu"] == cpu_description() and h["cpu"].startswith(_cpuinfo_model())
    assert (h["jax"], h["devices"], h["platform"]) == (jax.__version__, jax.device_count(), "cpu")


def _cpuinfo_model():
    lines = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "")


def test_metrics_log_every_step_and_the_rate_follows_warmup_then_cosine(trained):
    """The reference run's metrics.jsonl: a line per step with the documented fields, val loss at
    the eval steps, and the learning rate of OVERRIDES' warmup and cosine schedule."""
    records = read_metrics(trained / "metrics.jsonl")
    steps = [r for r in records if "grad_norm" in r]
    assert [r["step"] for r in steps] == list(range(1, STEPS + 1))
    for r in steps:
        assert {"train_loss", "lr", "tokens_per_sec", "mfu", "step_time_s"} <= set(r), r
    assert [r["step"] for r in records if "val_loss" in r] == [12, 24]
    lr, min_lr, warmup = OVERRIDES["lr"], OVERRIDES["min_lr"], OVERRIDES["warmup_steps"]

    def expected(i):  # the update that ends at step i + 1 used the rate of step i
        if i < warmup:  # nanoGPT's warmup: the first update already moves
            return lr * (i + 1) / (warmup + 1)
        frac = (i - warmup) / (STEPS - warmup)
        return min_lr + (lr - min_lr) * 0.5 * (1 + np.cos(np.pi * frac))

    np.testing.assert_allclose([r["lr"] for r in steps], [expected(s - 1) for s in range(1, STEPS + 1)],
                               rtol=1e-5, atol=1e-9)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_train_like_one(synth_data, trained, tmp_path, compile_cache):
    """Real multi-process JAX (2 processes x 2 CPU devices, gloo, mesh data 2 x fsdp 2) resumes the
    one-device reference run from its step-20 checkpoint: the reference's losses for the last 4
    steps, and one checkpoint that holds the reference's params."""
    work = copy_run(trained, tmp_path / "two")
    shutil.rmtree(work / "checkpoints" / str(STEPS))
    mesh = ["--config.mesh.data=2", "--config.mesh.fsdp=2"]
    dist = [f"--coordinator=localhost:{_free_port()}", "--num_processes=2"]
    procs = [subprocess.Popen(train_cmd(synth_data, work, *mesh, *dist, f"--process_id={i}"),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=script_env(compile_cache, devices=2))
             for i in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outs)

    a, b = losses(trained), losses(work)
    assert sorted(b) == list(range(1, STEPS + 1))
    np.testing.assert_allclose([b[s] for s in range(STEPS - 3, STEPS + 1)],
                               [a[s] for s in range(STEPS - 3, STEPS + 1)], rtol=1e-5)
    # The checkpoint the 2 processes wrote loads here, on this process's one device.
    _, pa, _ = nj.load_checkpoint(trained)
    _, pb, _ = nj.load_checkpoint(work)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6), pa, pb)
