"""Checkpoint integrity and crash safety: a damaged step is refused by name and training falls
back past it to exactly the uninterrupted losses; kills at random moments never cost a resume or
the metrics history; config.json and metrics.jsonl are replaced, never rewritten in place."""

import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import checkpoint_steps, cpu_config

import nanojax as nj
from nanojax import data
from nanojax.checkpoint import (
    RECORD_KEY,
    STEP_METADATA_FILE,
    Checkpointer,
    CheckpointMismatchError,
    CorruptCheckpointError,
    fingerprints,
)
from nanojax.tokenizer import CharTokenizer
from nanojax.train import train

REPO = Path(__file__).resolve().parent.parent
CONFIG_FILE = REPO / "configs/shakespeare_char_cpu.py"
# The smallest run that still has every part: 12 steps, a checkpoint every 2 (the last 3 kept),
# two evaluations. The same overrides go to train() here and to scripts/train.py as flags.
STEPS = 12
OVERRIDES = {"model.n_layer": 1, "model.n_head": 2, "model.d_model": 16, "model.max_seq_len": 8,
             "batch_size": 2, "max_steps": STEPS, "warmup_steps": 2, "eval_every": 6, "eval_iters": 1,
             "ckpt_every": 2, "keep_checkpoints": 3}
_rng = np.random.default_rng(1)
SYNTH = "".join(_rng.choice(list("abcdefgh ijklmnop\nqrstu"), size=20_000))


def config(data_dir, **extra):
    """configs/shakespeare_char_cpu.py with OVERRIDES: what scripts/train.py builds from flags."""
    return cpu_config(data_dir, OVERRIDES, extra)


def history(workdir):
    """Every complete metrics.jsonl record, in order, without the timing fields (which differ)."""
    keep = ("step", "train_loss", "val_loss", "grad_norm", "lr")
    lines = (Path(workdir) / "metrics.jsonl").read_text().splitlines()
    out = []
    for line in lines:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a line a kill cut short
            continue
        if "header" not in rec:  # one per (re)start, describing the process: not the history
            out.append({k: rec[k] for k in keep if k in rec})
    return out


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    d = tmp_path_factory.mktemp("synth")
    data.prepare(SYNTH, CharTokenizer.from_text(SYNTH), d)
    return d


@pytest.fixture(scope="module")
def baseline(synth, tmp_path_factory, compile_cache):
    """The uninterrupted reference run; every case works on a copy of it."""
    workdir = tmp_path_factory.mktemp("baseline") / "run"
    train(config(synth), workdir, progress=False)
    assert checkpoint_steps(workdir) == [STEPS - 4, STEPS - 2, STEPS]
    return workdir


# ----------------------------------------------------------------------------------------------
# Damage of every kind: refused by name, skipped on resume, the same losses in the end


def _params_data_files(step_dir):
    """The data files of a step's params (values and b-tree nodes), largest first."""
    return sorted((p for p in (step_dir / "params").glob("**/d/*") if p.is_file()),
                  key=lambda p: (-p.stat().st_size, p.name))


def _listing(directory):
    return {str(p.relative_to(directory)): p.stat().st_size for p in directory.rglob("*")}


def _damage_a_data_file(step_dir: Path, kind: str) -> None:
    """Damages a params data file the step really reads (orbax leaves some of them unused after
    merging its per-process b-trees, and where values land varies from run to run, so plain
    orbax is asked which change it feels). flip: 64 bytes inverted, the size unchanged, where
    orbax still reads the step without a word but gets other values (bit rot that only checksums
    can see); truncate: cut to half; delete: removed."""
    import orbax.checkpoint as ocp

    def read():
        try:
            return jax.tree.map(np.asarray, ocp.StandardCheckpointer().restore(step_dir / "params"))
        except Exception:  # noqa: BLE001  (orbax noticed)
            return None

    def changed():
        got = read()
        if got is None:
            return kind != "flip"
        return not jax.tree.all(jax.tree.map(np.array_equal, got, clean))

    clean = read()
    for f in _params_data_files(step_dir):
        original = f.read_bytes()
        if kind == "flip":
            for at in range(0, len(original) - 64, 64):
                f.write_bytes(original[:at] + bytes(x ^ 0xFF for x in original[at:at + 64])
                              + original[at + 64:])
                if changed():
                    return
        else:
            if kind == "truncate":
                f.write_bytes(original[:len(original) // 2])
            else:
                f.unlink()
            if changed():
                return
        f.write_bytes(original)
    raise AssertionError(f"no {kind} of a data file of {step_dir}/params changes what orbax reads")


def damage(step_dir: Path, kind: str) -> None:
    if kind in ("flip", "truncate", "delete"):
        _damage_a_data_file(step_dir, kind)
    elif kind == "manifest":
        f = step_dir / "params" / "manifest.ocdbt"
        os.truncate(f, f.stat().st_size // 2)
    elif kind == "empty":
        shutil.rmtree(step_dir)
        step_dir.mkdir()
    else:
        raise ValueError(kind)


@pytest.mark.parametrize("kind", ["flip", "truncate", "delete", "manifest", "empty"])
def test_a_damaged_step_is_refused_by_name_and_resume_falls_back_to_the_same_losses(
        kind, synth, baseline, tmp_path, caplog):
    work = tmp_path / "run"
    shutil.copytree(baseline, work)
    latest = work / "checkpoints" / str(STEPS)
    damage(latest, kind)

    # Asked for by number, the damaged step is refused with its directory and what failed.
    with pytest.raises(CorruptCheckpointError, match=rf"step {STEPS} at {latest} is damaged: ") as err:
        nj.load_checkpoint(work, step=STEPS)
    assert "\n" not in str(err.value)
    if kind == "flip":  # the silent case: only the checksums can tell
        assert "differs from the checksum recorded" in str(err.value)
    # Asked for the newest, it skips (and leaves) the damaged step: the previous step's params.
    _, params, _ = nj.load_checkpoint(work)
    _, previous, _ = nj.load_checkpoint(baseline, step=STEPS - 2)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool((np.asarray(a) == np.asarray(b)).all()),
                                     params, previous))
    assert latest.exists()

    before = {name: (work / name).stat().st_ino for name in ("config.json", "metrics.jsonl")}
    damaged = _listing(latest)
    with caplog.at_level(logging.WARNING):
        caplog.clear()
        s = train(config(synth), work, progress=False)
    # One line reports the step, what failed and where it went; training resumed one save back.
    assert s["start_step"] == STEPS - 2 and s["step"] == STEPS, s
    [line] = s["skipped_checkpoints"]
    assert line.startswith(f"checkpoint step {STEPS} at {latest} is damaged: ") and "\n" not in line
    assert line.endswith(f"resuming from step {STEPS - 2}"), line
    # asyncio's "exception was never retrieved" is orbax's reader futures being collected after
    # the failed read (when the garbage collector gets to them: seen once in CI), not a report.
    reports = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and r.name != "asyncio"]
    assert reports == [line], reports
    # The damaged step was moved aside as it was, and a good one saved in its place.
    [aside] = (work / "checkpoints").glob(f"{STEPS}.corrupt-*")
    assert aside.name in line and _listing(aside) == damaged
    assert checkpoint_steps(work) == [STEPS - 4, STEPS - 2, STEPS]
    nj.load_checkpoint(work, step=STEPS)  # verifies
    # Bit for bit the uninterrupted run's metrics, one line per step.
    assert history(work) == history(baseline)
    # config.json and the shortened metrics.jsonl were replaced (a new file renamed over the
    # old: a kill mid-write leaves one or the other), not rewritten in place.
    for name, inode in before.items():
        assert (work / name).stat().st_ino != inode, f"{name} was rewritten in place"


def test_every_step_damaged_is_one_error_line_for_sample_and_train(synth, baseline, tmp_path,
                                                                   compile_cache):
    work = tmp_path / "run"
    shutil.copytree(baseline, work)
    for step, kind in zip((STEPS, STEPS - 2, STEPS - 4), ("flip", "empty", "manifest"), strict=True):
        damage(work / "checkpoints" / str(step), kind)
    env = dict(os.environ, JAX_PLATFORMS="cpu", **compile_cache)
    p = subprocess.run([sys.executable, str(REPO / "scripts/sample.py"), f"--workdir={work}",
                        "--max_new_tokens=5"], capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode != 0 and p.stdout == "", (p.returncode, p.stdout, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: no checkpoint in "), p.stderr
    assert all(f"step {s} at" in lines[0] for s in (STEPS, STEPS - 2, STEPS - 4)), lines[0]
    # Training refuses too, rather than silently starting over; the steps are kept aside.
    metrics = (work / "metrics.jsonl").read_text()
    with pytest.raises(CorruptCheckpointError, match="no checkpoint in .* could be restored.*start over"):
        train(config(synth), work, progress=False)
    assert checkpoint_steps(work) == [] and len(list((work / "checkpoints").glob("*.corrupt-*"))) == 3
    assert (work / "metrics.jsonl").read_text() == metrics


# ----------------------------------------------------------------------------------------------
# The record itself, without training


def test_checksums_see_one_changed_element_and_a_swap_in_every_dtype():
    rng = np.random.default_rng(0)
    for dtype in (jnp.float32, jnp.bfloat16, jnp.float16, jnp.int32, jnp.int8, jnp.uint8, jnp.bool_):
        x = rng.normal(size=(4, 6)) * 10  # numpy: no eager op to compile per dtype
        x = x > 0 if dtype == jnp.bool_ else x.astype(dtype)
        changed, swapped = x.copy(), x.copy()
        changed[2, 3] = x[2, 3] + 1 if dtype != jnp.bool_ else not x[2, 3]
        other = tuple(np.argwhere(x != x[0, 0])[0])  # swap two elements that differ
        swapped[0, 0], swapped[other] = x[other], x[0, 0]
        sums = fingerprints({"x": x, "again": x.copy(), "changed": changed, "swapped": swapped})
        assert len(sums["x"]) == 16 and sums["again"] == sums["x"]  # a pure function of the values
        assert sums["changed"] != sums["x"] and sums["swapped"] != sums["x"], dtype


def _tiny_step(tmp_path, tree, step=1):
    ckpt = Checkpointer(tmp_path / "checkpoints", save_every=1)
    ckpt.save(step, tree, {"count": jnp.zeros((), jnp.int32)}, force=True)
    ckpt.close()
    return Checkpointer(tmp_path / "checkpoints", save_every=1)


def test_a_step_without_a_record_is_accepted_when_finite(tmp_path):
    """Steps saved before checksums existed still load; a NaN in one (training never saves
    one) marks it damaged."""
    good = {"w": jnp.arange(6.0).reshape(2, 3)}
    bad = {"w": jnp.array([[0.0, jnp.nan, 1.0], [2.0, 3.0, 4.0]])}
    ckpt = _tiny_step(tmp_path, good, 1)
    ckpt.save(2, bad, {"count": jnp.zeros((), jnp.int32)}, force=True)
    ckpt.close()
    for step in (1, 2):  # strip the record, as an older nanojax wrote them
        meta_file = tmp_path / "checkpoints" / str(step) / STEP_METADATA_FILE
        meta = json.loads(meta_file.read_text())
        assert RECORD_KEY in meta["custom_metadata"]
        del meta["custom_metadata"][RECORD_KEY]
        meta_file.write_text(json.dumps(meta))
    ckpt = Checkpointer(tmp_path / "checkpoints", save_every=1, read_only=True)
    np.testing.assert_array_equal(ckpt.restore(1, good)["params"]["w"], good["w"])
    with pytest.raises(CorruptCheckpointError, match="params/w holds NaN or inf"):
        ckpt.restore(2, good)
    found = ckpt.restore_newest(good)
    assert found.step == 1 and "step 2" in found.skipped[0] and "skipped it" in found.skipped[0]
    assert (tmp_path / "checkpoints" / "2").exists()  # read_only: nothing moved
    ckpt.close()


def test_another_models_step_is_a_mismatch_not_damage(tmp_path):
    ckpt = _tiny_step(tmp_path, {"w": jnp.ones((2, 3))})
    for other, what in (({"w": jnp.ones((3, 3))}, r"params/w is float32\[2, 3\] in the checkpoint, the "
                                                  r"model expects float32\[3, 3\]"),
                        ({"v": jnp.ones((2, 3))}, "leaves only in the checkpoint: \\['w'\\]")):
        with pytest.raises(CheckpointMismatchError, match=what):
            ckpt.restore_newest(other)
    assert ckpt.all_steps() == [1] and not list((tmp_path / "checkpoints").glob("*.corrupt-*"))
    ckpt.close()


def test_a_failed_restore_leaves_no_tracebacks_behind(tmp_path, monkeypatch, caplog):
    """When one read fails orbax abandons the others; their late reports (through
    sys.unraisablehook and asyncio's logger, long tracebacks each) must not reach the user."""
    import gc

    tree = {f"w{i}": jnp.full((64, 64), float(i)) for i in range(16)}  # many reads in flight
    ckpt = _tiny_step(tmp_path, tree)
    for f in (tmp_path / "checkpoints" / "1" / "params").glob("**/d/*"):
        os.truncate(f, f.stat().st_size // 2)
    reports = []
    monkeypatch.setattr(sys, "unraisablehook", reports.append)
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            with pytest.raises(CorruptCheckpointError, match="orbax could not read it"):
                ckpt.restore(1, tree)
        for _ in range(5):
            gc.collect()
            time.sleep(0.05)
    ckpt.close()
    assert reports == [] and caplog.records == [], (reports, caplog.records)


# ----------------------------------------------------------------------------------------------
# Kills


def test_metrics_rewrite_never_shows_a_partial_history(tmp_path):
    """A process rewriting metrics.jsonl over and over (each time a resume drops a cut line) is
    frozen at random moments: what is on disk then is what a kill at that moment leaves. Every
    snapshot must hold the whole history; a last, cut line is allowed."""
    path = tmp_path / "metrics.jsonl"
    history_text = "".join(json.dumps({"step": s, "train_loss": 1.0 + s, "pad": "x" * 200}) + "\n"
                           for s in range(1, 20_001))  # ~4.5 MB: each rewrite takes a while
    path.write_text(history_text)
    child = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(REPO)!r})
        from nanojax.metrics import MetricsWriter
        path = {str(path)!r}
        MetricsWriter(path, resume_step=20_000)
        print("ready", flush=True)
        while True:
            with open(path, "a") as f:
                f.write('{{"step": 20001, "train_lo')  # what a kill mid-append leaves
            MetricsWriter(path, resume_step=20_000)  # the resume drops it: a full rewrite
    """)
    proc = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, JAX_PLATFORMS="cpu"))
    try:
        assert proc.stdout.readline().strip() == "ready"
        rng = random.Random(0)
        for _ in range(40):
            time.sleep(rng.uniform(0.0, 0.03))
            proc.send_signal(signal.SIGSTOP)
            text = path.read_text()
            proc.send_signal(signal.SIGCONT)
            assert text.startswith(history_text), f"history lost: {len(text)} of {len(history_text)} bytes"
    finally:
        proc.kill()
        proc.wait()


def _train_cmd(data_dir, workdir, **extra):
    flags = {**OVERRIDES, "data_dir": data_dir, **extra}
    return [sys.executable, str(REPO / "scripts/train.py"), f"--config={CONFIG_FILE}", f"--workdir={workdir}",
            *(f"--config.{k}={v}" for k, v in flags.items())]


def _inode(path):
    return path.stat().st_ino if path.exists() else None


@pytest.mark.slow  # ~27 s of SIGKILLed subprocesses; test_train's kill/interrupt test stays fast
def test_killed_at_random_moments_always_resumes_to_the_same_losses(synth, baseline, tmp_path,
                                                                    compile_cache):
    """SIGKILL, many times over, at random moments of the resume (just after config.json is
    replaced: the tokenizer, the metrics rewrite, the compile) and of training (soon after a new
    checkpoint appears: with one save every step, the next is under way). After each kill every
    step up to the newest checkpoint is still in metrics.jsonl with the reference values and no
    step is ever found damaged; the final run ends with the reference losses bit for bit."""
    work = tmp_path / "run"
    env = dict(os.environ, JAX_PLATFORMS="cpu", **compile_cache)
    cmd = _train_cmd(synth, work, ckpt_every=1)  # checkpoints don't change the losses
    reference = history(baseline)
    rng = random.Random(0)
    deadline, kills = time.monotonic() + 40, 0
    while kills < 6 and time.monotonic() < deadline:
        config_inode = _inode(work / "config.json")
        target = max(checkpoint_steps(work), default=0) + rng.randint(1, 2) if work.exists() else 1
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        t0 = time.monotonic()
        while proc.poll() is None and time.monotonic() - t0 < 60:
            if kills % 2 == 0 and _inode(work / "config.json") != config_inode:
                time.sleep(rng.uniform(0.0, 0.05))
                break
            if kills % 2 == 1 and max(checkpoint_steps(work), default=0) >= target:
                time.sleep(rng.uniform(0.0, 0.15))  # saves follow each other ~0.1 s apart
                break
            time.sleep(0.002)
        if proc.poll() is not None:  # it finished (or failed) before the kill
            out = proc.communicate()[0]
            assert proc.returncode == 0, out
            break
        proc.send_signal(signal.SIGKILL)
        out = proc.communicate()[0]
        kills += 1
        assert "damaged" not in out, out
        if (work / "metrics.jsonl").exists():
            got = history(work)
            newest = max(checkpoint_steps(work), default=0)
            assert got == reference[:len(got)], "metrics differ from the reference run"
            assert {r["step"] for r in got} >= set(range(1, newest + 1)), "history lost"
    assert kills >= 4, f"only {kills} kills landed before the run finished; the test proves little"
    final = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert final.returncode == 0, final.stderr[-3000:]
    assert "damaged" not in final.stderr, final.stderr
    assert not list((work / "checkpoints").glob("*.corrupt-*"))
    assert history(work) == reference
