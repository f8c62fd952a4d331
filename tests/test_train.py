"""Training's loop and scripts: exact resume after kills and signals and on another mesh,
workdirs and checkpoints (imported, foreign, damaged, half-written), the non-finite stop, bad data,
the scripts' flags end to end, profiles, metrics lines, and two processes training as one.

Most tests share one tiny run, conftest's `trained` (tests/train_run.py): configs/
shakespeare_char_cpu.py with OVERRIDES, the same overrides the script tests pass as --config.*
flags. Tests that only read it use it as is; tests that write copy it first. The persistent
compilation cache (conftest) lets every run of that config, in this process or a subprocess,
load the step compiled once. What one step computes is test_train_step.py's.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import checkpoint_steps
from train_run import ALPHABET, CONFIG_FILE, OVERRIDES, REPO, STEPS, SYNTH, base_config, losses

import nanojax as nj
from nanojax import data
from nanojax import sharding as shd
from nanojax.metrics import MetricsWriter, cpu_description, read_metrics, trace_op_times
from nanojax.quant import ffi
from nanojax.tokenizer import CharTokenizer
from nanojax.train import NonFiniteLossError, WorkdirMismatchError, build, loss_fn, model_config_from, train

pytestmark = pytest.mark.usefixtures("compile_cache")


def train_cmd(data_dir, workdir, *extra):
    """scripts/train.py with OVERRIDES as --config.* flags: the script's twin of base_config."""
    flags = [f"--config.{k}={v}" for k, v in {**OVERRIDES, "data_dir": data_dir}.items()]
    return [sys.executable, str(REPO / "scripts/train.py"), f"--config={CONFIG_FILE}",
            f"--workdir={workdir}", *flags, *extra]


def script_env(compile_cache, devices=1):
    flag = f"--xla_force_host_platform_device_count={devices}"
    return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=flag, **compile_cache)


# Runs a script as `python SCRIPT ARGS` does, acting right after the metrics line of step AT is
# written (by the process that writes metrics: the first of several): once checkpoint WAIT is on
# disk (if not 0), it sleeps SLEEP seconds, then sends itself SIG (if not 0). A signal or a delay
# at a known step, without racing the run from outside.
AT_STEP = """
import os, runpy, sys, time
from nanojax.metrics import MetricsWriter
at, wait, sig, sleep = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
write = MetricsWriter.write
def write_then_act(self, rec):
    write(self, rec)
    if rec.get("step") == at and "grad_norm" in rec:
        done = self.path.parent / "checkpoints" / str(wait)
        for _ in range(6000):
            if not wait or done.is_dir():
                break
            time.sleep(0.01)
        time.sleep(sleep)
        if sig:
            os.kill(os.getpid(), sig)
MetricsWriter.write = write_then_act
sys.argv = sys.argv[5:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def at_step(cmd, at, *, wait=0, sig=0, sleep=0.0):
    """`cmd` (a python script's command line) run under AT_STEP."""
    return [sys.executable, "-c", AT_STEP, str(at), str(wait), str(int(sig)), str(sleep), *cmd[1:]]


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


def step_lines(workdir):
    """The step of every training line in metrics.jsonl, in file order."""
    return [r["step"] for r in read_metrics(Path(workdir) / "metrics.jsonl") if "grad_norm" in r]


def copy_run(src, dst):
    shutil.copytree(src, dst)
    return dst


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
    p = subprocess.run(at_step(cmd, 10, sig=signal.SIGKILL, wait=8), capture_output=True, text=True,
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
    p = subprocess.run(at_step(cmd + ["--config.mesh.fsdp=2"], 17, sig=signal.SIGINT), capture_output=True,
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
    # The kernels' custom calls carry the targets XLA's HLO gives them (train() wrote the step's HLO
    # beside the trace), one op at a time and, by kind, folded under those targets.
    calls = dict(re.findall(r'%([\w.-]+) = [^\n]*custom-call\([^\n]*custom_call_target="(\w+)"', hlo))
    assert calls or not ffi.kernels_available()  # the norm and AdamW kernels run wherever they build
    traced = {o.name: o.target for o in step_ops if o.name in calls}
    assert traced and traced == {name: calls[name] for name in traced}, traced
    assert all(o.target == "" for o in step_ops if o.name not in calls)
    kinds = {o.name for o in trace_op_times(tmp_path / "a" / "profile")[0] if o.module == "jit_step_fn"}
    assert set(traced.values()) <= kinds and not any(k.startswith(("ffi_call", "custom-call")) for k in kinds)
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
    steps, and one checkpoint that holds the reference's params. The first process reaches the
    last step's evaluations 3 s after the second (as after writing a profile, or on a slower host),
    and both still finish: their 200 + 31 eval calls' collectives stay in step."""
    work = copy_run(trained, tmp_path / "two")
    shutil.rmtree(work / "checkpoints" / str(STEPS))
    mesh = ["--config.mesh.data=2", "--config.mesh.fsdp=2"]
    dist = [f"--coordinator=localhost:{_free_port()}", "--num_processes=2"]
    evals = "--config.eval_iters=200"  # enough calls to deadlock when all dispatched at once (60 did not)
    cmds = [train_cmd(synth_data, work, *mesh, *dist, evals, f"--process_id={i}") for i in range(2)]
    cmds[0] = at_step(cmds[0], STEPS, sleep=3)
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=script_env(compile_cache, devices=2))
             for cmd in cmds]
    try:
        outs = [p.communicate(timeout=120)[0] for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        outs = [p.communicate()[0] for p in procs]
        pytest.fail("the two processes hung (a deadlocked collective?):\n"
                    + "\n".join(o[-2000:] for o in outs))
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outs)

    a, b = losses(trained), losses(work)
    assert sorted(b) == list(range(1, STEPS + 1))
    np.testing.assert_allclose([b[s] for s in range(STEPS - 3, STEPS + 1)],
                               [a[s] for s in range(STEPS - 3, STEPS + 1)], rtol=1e-5)
    # The checkpoint the 2 processes wrote loads here, on this process's one device.
    _, pa, _ = nj.load_checkpoint(trained)
    _, pb, _ = nj.load_checkpoint(work)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6), pa, pb)
