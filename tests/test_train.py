"""Training: loss falls on real text, exact resume after a kill, and every bad input."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

import nanojax as nj
from nanojax import data
from nanojax.metrics import read_metrics, trace_op_times
from nanojax.tokenizer import CharTokenizer
from nanojax.train import (
    NonFiniteLossError,
    WorkdirMismatchError,
    build,
    default_config,
    model_config_from,
    train,
)

REPO = Path(__file__).resolve().parent.parent
# Varied synthetic text, so the mechanics tests never depend on $NANOJAX_TEST_TEXT.
_rng = np.random.default_rng(0)
SYNTH = "".join(_rng.choice(list("abcdefgh ijklmnop\nqrstu"), size=40_000))


@pytest.fixture(scope="module")
def synth_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("synth")
    data.prepare(SYNTH, CharTokenizer.from_text(SYNTH), d)
    return d


def small_config(data_dir, **kw):
    c = default_config("shakespeare-char-cpu", vocab_size=0)
    c.model.n_layer, c.model.d_model, c.model.max_seq_len = 2, 64, 32
    c.data_dir = str(data_dir)
    c.batch_size, c.max_steps, c.eval_every, c.eval_iters, c.ckpt_every = 8, 20, 10, 2, 10
    for k, v in kw.items():
        c[k] = v
    return c


def losses(workdir):
    return {r["step"]: r["train_loss"] for r in read_metrics(Path(workdir) / "metrics.jsonl")
            if "grad_norm" in r}


def test_loss_falls_on_real_text(shakespeare_text, tmp_path):
    data.prepare(shakespeare_text, CharTokenizer.from_text(shakespeare_text), tmp_path / "data")
    c = small_config(tmp_path / "data", max_steps=150, eval_every=150, eval_iters=5, lr=3e-3)
    s = train(c, tmp_path / "run", progress=False)
    first = losses(tmp_path / "run")[1]
    assert first > 3.8  # ~ln(65) at init
    assert s["val_loss"] < 2.7 and s["train_loss"] < 2.7, s
    cfg, params, tok = nj.load_checkpoint(tmp_path / "run")
    assert cfg.vocab_size == 65 and tok.decode(tok.encode("ROMEO:")) == "ROMEO:"
    assert jax.tree.map(lambda x: x.shape, params) == jax.tree.map(
        lambda x: x.shape, nj.init_params(cfg, jax.random.key(0)))


def test_grad_accumulation_equals_one_big_batch(synth_data, tmp_path):
    """4 micro-batches of 2 rows average to the gradient of the same 8 rows at once."""
    import optax

    from nanojax.train import make_train_step, model_config_from

    c = small_config(synth_data)
    cfg = model_config_from(c, 24)
    opt = optax.sgd(1.0)  # the update is the gradient itself
    params = nj.init_params(cfg, jax.random.key(0))
    tokens = np.fromfile(synth_data / "train.bin", np.uint16)
    x, y = data.get_batch(tokens, 32, 8, seed=0, step=0)
    step = jax.jit(make_train_step(cfg, opt, 0))
    p1, _, m1 = step(params, opt.init(params), x, y, 0)
    p4, _, m4 = step(params, opt.init(params), x.reshape(4, 2, 32), y.reshape(4, 2, 32), 0)
    np.testing.assert_allclose(m1["loss"], m4["loss"], rtol=1e-5)
    np.testing.assert_allclose(m1["grad_norm"], m4["grad_norm"], rtol=1e-4)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), p1, p4)


def _train_cmd(data_dir, workdir, *extra):
    config = REPO / "configs/shakespeare_char_cpu.py"
    return [sys.executable, str(REPO / "scripts/train.py"), f"--config={config}",
            f"--workdir={workdir}", f"--config.data_dir={data_dir}", "--config.max_steps=60",
            "--config.ckpt_every=10", "--config.eval_every=30", "--config.eval_iters=2", *extra]


def _run_until(cmd, step, sig):
    """Starts training and sends `sig` once metrics.jsonl shows `step`. Returns (rc, output)."""
    workdir = Path(cmd[3].split("=", 1)[1])
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        path = workdir / "metrics.jsonl"
        if path.exists() and any(r.get("step", 0) >= step for r in read_metrics(path) if r):
            proc.send_signal(sig)
            break
        time.sleep(0.01)
    out, _ = proc.communicate(timeout=120)
    return proc.returncode, out


def test_killed_and_interrupted_runs_resume_to_exactly_the_same_losses(synth_data, tmp_path):
    ref = tmp_path / "ref"
    subprocess.run(_train_cmd(synth_data, ref), check=True, capture_output=True, env=dict(os.environ))
    expected = losses(ref)
    assert sorted(expected) == list(range(1, 61))

    run = tmp_path / "run"
    # A hard kill mid-run: no chance to save; the last periodic checkpoint must be whole.
    rc, out = _run_until(_train_cmd(synth_data, run), 25, signal.SIGKILL)
    assert rc == -signal.SIGKILL, out
    assert max(losses(run)) < 60, "the run finished before it was killed; the test proves nothing"
    # Ctrl-C mid-run: saves a checkpoint at the current step and exits with 128 + SIGINT.
    rc, out = _run_until(_train_cmd(synth_data, run), 45, signal.SIGINT)
    assert rc == 128 + signal.SIGINT, out
    assert "rerun the same command to resume" in out
    # Rerunning the same command finishes the run.
    subprocess.run(_train_cmd(synth_data, run), check=True, capture_output=True)
    got = losses(run)
    assert sorted(got) == list(range(1, 61))  # one line per step, the dead run's extra lines dropped
    assert got == expected  # bit-for-bit the losses of the uninterrupted run
    # Once more: the run is finished; it says so, trains nothing and leaves the metrics alone.
    again = subprocess.run(_train_cmd(synth_data, run), capture_output=True, text=True)
    assert again.returncode == 0 and "already reached step 60" in again.stdout, again.stdout + again.stderr
    assert losses(run) == expected


def test_training_a_workdir_holding_imported_weights_fine_tunes_them(synth_data, tmp_path):
    """A step-0 checkpoint (what scripts/convert.py --hf_dir writes) is the starting point."""
    from nanojax.checkpoint import Checkpointer
    from nanojax.train import loss_fn, model_config_from

    c = small_config(synth_data)
    cfg = model_config_from(c, 23)
    # Weights no fresh init would give (10x the init scale), so the first loss tells them apart.
    trained = nj.init_params(cfg.replace(init_std=0.2), jax.random.key(3))
    work = tmp_path / "imported"
    ckpt = Checkpointer(work / "checkpoints", save_every=1)
    ckpt.save(0, trained, {"imported_from_hf": 0}, force=True)
    ckpt.close()
    (work / "config.json").write_text(json.dumps({"model": cfg.to_dict(), "train": {}}))
    c.update(max_steps=1, seed=7)
    train(c, work, progress=False)
    tokens = np.fromfile(synth_data / "train.bin", np.uint16)
    x, y = data.get_batch(tokens, 32, c.batch_size, seed=7, step=0)
    expected = float(loss_fn(trained, x[0], y[0], cfg))
    assert losses(work)[1] == pytest.approx(expected, rel=1e-5)
    fresh = float(loss_fn(nj.init_params(cfg, jax.random.key(7)), x[0], y[0], cfg))
    assert abs(fresh - expected) > 0.1  # so the test can tell imported weights from a fresh init


def test_unknown_config_key_is_named(synth_data, tmp_path):
    for flag, name in (("--config.nonexistent=1", "nonexistent"), ("--config.model.n_layers=3", "n_layers")):
        p = subprocess.run(_train_cmd(synth_data, tmp_path / "w", flag), capture_output=True, text=True)
        assert p.returncode != 0
        err = p.stderr.lower()
        assert name in p.stderr and ("not found" in err or "unknown" in err), p.stderr


def test_workdir_of_another_model_is_refused_untouched(synth_data, tmp_path):
    c = small_config(synth_data, max_steps=10)
    train(c, tmp_path / "run", progress=False)
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "run").rglob("*") if p.is_file()}
    c.model.n_layer = 3
    with pytest.raises(WorkdirMismatchError, match="n_layer: workdir has 2, config has 3"):
        train(c, tmp_path / "run", progress=False)
    after = {p: p.stat().st_mtime_ns for p in (tmp_path / "run").rglob("*") if p.is_file()}
    assert before == after


def test_half_written_and_damaged_checkpoints(synth_data, tmp_path):
    c = small_config(synth_data, max_steps=10, ckpt_every=5)
    train(c, tmp_path / "run", progress=False)
    ckpts = tmp_path / "run" / "checkpoints"
    # What an interrupted save leaves behind (a temporary directory) is ignored and cleaned up.
    junk = ckpts / "15.orbax-checkpoint-tmp-1234567"
    shutil.copytree(ckpts / "10", junk)
    c.max_steps = 15
    s = train(c, tmp_path / "run", progress=False)
    assert s["start_step"] == 10 and s["step"] == 15 and not junk.exists()
    # A step directory that lost its files names itself and the fix.
    for f in (ckpts / "15" / "params").rglob("*"):
        if f.is_file():
            f.write_bytes(b"")
    c.max_steps = 20
    with pytest.raises(RuntimeError, match=r"(?s)could not restore the checkpoint at .*15.*Delete that step"):
        train(c, tmp_path / "run", progress=False)


def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(synth_data, tmp_path):
    c = small_config(synth_data, max_steps=4, ckpt_every=2)
    train(c, tmp_path / "run", progress=False)
    _, good, _ = nj.load_checkpoint(tmp_path / "run")
    # The same run continued with an absurd learning rate blows up within a few steps.
    c.update(max_steps=40, lr=1e12, warmup_steps=0, grad_clip=0.0)
    with pytest.raises(NonFiniteLossError, match=r"not finite.*last good checkpoint \(step \d+\)"):
        train(c, tmp_path / "run", progress=False)
    _, params, _ = nj.load_checkpoint(tmp_path / "run")
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))
    assert max(r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")) < 40
    assert jax.tree.structure(params) == jax.tree.structure(good)


def test_bad_data_and_vocab(synth_data, tmp_path):
    with pytest.raises(FileNotFoundError, match="prepare_data.py"):
        train(small_config(tmp_path / "missing"), tmp_path / "w", progress=False)
    short = tmp_path / "short"
    data.prepare("abcdefghij" * 10, CharTokenizer.from_text("abcdefghij"), short)
    with pytest.raises(ValueError, match="fewer than seq_len"):
        train(small_config(short), tmp_path / "w", progress=False)
    c = small_config(synth_data)
    c.model.vocab_size = 10
    with pytest.raises(ValueError, match="has 23 tokens but model.vocab_size=10"):
        train(c, tmp_path / "w", progress=False)
    bad = tmp_path / "bad"
    shutil.copytree(synth_data, bad)
    ids = np.fromfile(bad / "train.bin", np.uint16)
    ids[100] = 99
    ids.tofile(bad / "train.bin")
    with pytest.raises(ValueError, match="token id 99, out of range for vocab_size=23"):
        train(small_config(bad), tmp_path / "w2", progress=False)
    assert not (tmp_path / "w").exists() or not any((tmp_path / "w").rglob("*.json"))
    assert json.loads((synth_data / "meta.json").read_text())["vocab_size"] == len(set(SYNTH)) == 23


def test_profile_traces_exactly_the_asked_steps_and_names_their_ops(synth_data, tmp_path):
    c = small_config(synth_data, profile="3:5")
    train(c, tmp_path / "a", progress=False)
    ops, steps = trace_op_times(tmp_path / "a" / "profile", by_kind=False)
    assert steps == 2
    # Every op the summary names is an instruction of the compiled step (XLA's own HLO text).
    run = build(c, model_config_from(c, vocab_size=len(set(SYNTH))))
    hlo = run.step_fn.lower(*run.abstract_step_args(c.batch_size, c.grad_accum)).compile().as_text()
    names = set(re.findall(r"%([\w.-]+) = ", hlo))
    step_ops = [o for o in ops if o.module == "jit_step_fn"]
    assert step_ops and all(o.count > 0 for o in step_ops) and sum(o.seconds for o in step_ops) > 0
    assert {o.name for o in step_ops} <= names, {o.name for o in step_ops} - names
    assert any("dot" in o.name or o.name.startswith("ynn") for o in step_ops)  # the matmuls are there
    # A window running past the last step still closes the trace and writes it.
    train(small_config(synth_data, profile="18:40"), tmp_path / "b", progress=False)
    assert trace_op_times(tmp_path / "b" / "profile")[1] == 2
    with pytest.raises(ValueError, match="START:END"):
        train(small_config(synth_data, profile="5"), tmp_path / "c", progress=False)
    with pytest.raises(FileNotFoundError, match="--config.profile"):
        trace_op_times(tmp_path / "c")


def test_logged_learning_rate_follows_warmup_then_cosine(synth_data, tmp_path):
    c = small_config(synth_data, lr=1e-2, min_lr=1e-3, warmup_steps=5, max_steps=20, eval_every=20)
    train(c, tmp_path / "w", progress=False)
    lrs = {r["step"]: r["lr"] for r in read_metrics(tmp_path / "w" / "metrics.jsonl") if "lr" in r}

    def expected(i):  # the update that ends at step i + 1 used the rate of step i
        if i < 5:
            return 1e-2 * i / 5
        frac = (i - 5) / (20 - 5)
        return 1e-3 + (1e-2 - 1e-3) * 0.5 * (1 + np.cos(np.pi * frac))

    assert sorted(lrs) == list(range(1, 21))
    np.testing.assert_allclose([lrs[s] for s in range(1, 21)], [expected(s - 1) for s in range(1, 21)],
                               rtol=1e-5, atol=1e-9)


def test_bf16_compute_keeps_fp32_params_and_tracks_the_fp32_run(synth_data, tmp_path):
    runs = {}
    for dtype in ("float32", "bfloat16"):
        c = small_config(synth_data, max_steps=30, eval_every=30, lr=3e-3)
        c.model.dtype = dtype
        train(c, tmp_path / dtype, progress=False)
        runs[dtype] = losses(tmp_path / dtype)
        cfg, params, _ = nj.load_checkpoint(tmp_path / dtype)
        assert cfg.dtype == dtype
        assert {x.dtype for x in jax.tree.leaves(params)} == {np.dtype("float32")}  # master weights
    f32, b16 = runs["float32"], runs["bfloat16"]
    # The synthetic text is uniform over 23 symbols, so both runs head for ln(23) = 3.135 nats.
    np.testing.assert_allclose([b16[s] for s in (1, 10, 30)], [f32[s] for s in (1, 10, 30)], rtol=0.03)
    assert b16[1] != f32[1]  # and the bf16 run really computed in bf16


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_train_like_one(synth_data, tmp_path):
    """Real multi-process JAX (2 processes x 2 CPU devices, gloo) against 1 process x 4 devices:
    the same losses, and one checkpoint that holds the same params."""
    extra = ["--config.max_steps=6", "--config.ckpt_every=3", "--config.eval_every=3",
             "--config.batch_size=8", "--config.mesh.data=2", "--config.mesh.fsdp=2"]

    def env(devices):
        flag = f"--xla_force_host_platform_device_count={devices}"
        return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=flag)

    one = subprocess.run(_train_cmd(synth_data, tmp_path / "one", *extra), capture_output=True, text=True,
                         env=env(4), timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    port = _free_port()
    dist = [f"--coordinator=localhost:{port}", "--num_processes=2"]
    procs = [subprocess.Popen(_train_cmd(synth_data, tmp_path / "two", *extra, *dist, f"--process_id={i}"),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env(2))
             for i in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outs)

    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(b) == list(range(1, 7))
    np.testing.assert_allclose([b[s] for s in range(1, 7)], [a[s] for s in range(1, 7)], rtol=1e-5)
    # Both checkpoints (4 devices; 2 processes) load here, on this process's one device.
    _, pa, _ = nj.load_checkpoint(tmp_path / "one")
    _, pb, _ = nj.load_checkpoint(tmp_path / "two")
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6), pa, pb)
