"""Every bad input a new user tried: one clear line naming the key, value or file, a non-zero exit
from the scripts, and no file changed.

Most cases call the library directly (validate_config, save_hf, data.prepare, load_hf); a few run
the scripts, to check the `error: ` lines, the exit codes and the absence of tracebacks.
"""

from __future__ import annotations

import hashlib
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import ml_collections
import numpy as np
import pytest

import nanojax as nj
from nanojax import data
from nanojax.interop import hf
from nanojax.outdir import OutputExistsError
from nanojax.tokenizer import CharTokenizer, load_tokenizer
from nanojax.train import ConfigError, default_config, train, validate_config

REPO = Path(__file__).resolve().parent.parent
SYNTH = "".join(np.random.default_rng(0).choice(list("abcdefgh ijklmnop\nqrstu"), size=4_000))
TINY = nj.ModelConfig(vocab_size=23, n_layer=1, n_head=2, d_model=16, max_seq_len=16, bias=False)


def snapshot(*roots: Path) -> dict[str, tuple]:
    """Every file and directory under `roots`: size, mtime and content hash (files)."""
    out = {}
    for root in roots:
        for p in sorted([root, *root.rglob("*")]) if root.exists() else []:
            st = p.lstat()
            if p.is_file():
                out[str(p)] = (st.st_size, st.st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            else:
                out[str(p)] = ("dir", st.st_mode)
    return out


def one_line(e: BaseException, *names: str) -> str:
    """The error's message, checked to be one line naming each of `names`."""
    msg = str(e)
    assert "\n" not in msg, msg
    for name in names:
        assert str(name) in msg, (name, msg)
    return msg


@pytest.fixture(scope="module")
def synth_data(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("synth") / "data"
    data.prepare(SYNTH, CharTokenizer.from_text(SYNTH), d)
    return d


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory) -> Path:
    """A tiny GPT-2 HF directory with a tokenizer.json, written by save_hf."""
    d = tmp_path_factory.mktemp("hf") / "model"
    nj.save_hf(nj.init_params(TINY, jax.random.key(0)), TINY, d, tokenizer=CharTokenizer.from_text(SYNTH))
    return d


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, hf_model) -> Path:
    return hf.hf_to_workdir(hf_model, tmp_path_factory.mktemp("work") / "w")


def small_config(data_dir: Path, **changes: object) -> ml_collections.ConfigDict:
    c = default_config("shakespeare-char-cpu", vocab_size=0)
    c.model.n_layer, c.model.d_model, c.model.max_seq_len = 1, 32, 16
    c.data_dir = str(data_dir)
    c.batch_size = 8
    for key, value in changes.items():  # "model.n_layer": value sets c.model.n_layer
        *parents, leaf = key.split(".")
        node = c
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


# ----------------------------------------------------------------------------------------------
# Training configs: checked as a whole, every problem one line naming key=value and the fix.

# (changes, devices, processes, expected lines: each a list of substrings of one line)
CONFIG_CASES = {
    "batch_size_0": ({"batch_size": 0}, 1, 1, [["batch_size=0", ">= 1", "--config.batch_size"]]),
    "grad_accum_0": ({"grad_accum": 0}, 1, 1, [["grad_accum=0", ">= 1", "--config.grad_accum"]]),
    "lr_negative": ({"lr": -1.0}, 1, 1, [["lr=-1.0", "> 0", "--config.lr"]]),
    "lr_inf": ({"lr": math.inf}, 1, 1, [["lr=inf", "--config.lr"]]),
    "min_lr_nan": ({"min_lr": math.nan}, 1, 1, [["min_lr=nan", "--config.min_lr"]]),
    "ckpt_every_0": ({"ckpt_every": 0}, 1, 1, [["ckpt_every=0", "--config.ckpt_every"]]),
    "batch_size_negative": ({"batch_size": -4}, 1, 1, [["batch_size=-4", ">= 1"]]),
    "min_lr_above_lr": ({"min_lr": 0.5}, 1, 1, [["min_lr=0.5", "lr=0.001", "--config.min_lr"]]),
    "counters_0": ({"eval_every": 0, "eval_iters": 0, "log_every": 0, "keep_checkpoints": 0,
                    "max_steps": 0, "warmup_steps": -1}, 1, 1,
                   [["max_steps=0"], ["warmup_steps=-1"], ["eval_every=0"], ["eval_iters=0"],
                    ["log_every=0"], ["keep_checkpoints=0"]]),
    "optimizer": ({"weight_decay": -0.1, "grad_clip": -1.0, "b1": 1.0, "seed": -1}, 1, 1,
                  [["seed=-1"], ["weight_decay=-0.1"], ["b1=1.0", "[0, 1)"], ["grad_clip=-1.0"]]),
    "model_dims": ({"model.n_layer": 0, "model.dropout": 1.0, "model.d_model": -8}, 1, 1,
                   [["model.n_layer=0"], ["model.d_model=-8"], ["model.dropout=1.0", "[0, 1)"]]),
    "heads_vs_width": ({"model.d_model": 30}, 1, 1, [["model.d_model=30", "model.n_head=4"]]),
    "kv_heads": ({"model.n_kv_head": 3}, 1, 1, [["model.n_kv_head=3", "model.n_head=4", "[1, 2, 4]"]]),
    "batch_vs_data_fsdp": ({"batch_size": 12, "mesh.data": 4, "mesh.fsdp": 2}, 8, 1,
                           [["batch_size=12", "data x fsdp = 4 x 2 = 8", "--config.batch_size=16"]]),
    "batch_vs_processes": ({"batch_size": 6, "mesh.data": 1, "mesh.tensor": 4}, 4, 4,
                           [["batch_size=6", "4 processes", "batch_size=8"]]),
    "heads_vs_tensor": ({"mesh.tensor": 3}, 3, 1, [["model.n_head=4", "mesh.tensor=3", "mesh.tensor=2"]]),
    "mesh_vs_devices": ({"mesh.data": 3}, 8, 1, [["mesh.data=3", "3 devices", "this run has 8"]]),
    "mesh_two_free": ({"mesh.fsdp": -1}, 8, 1, [["mesh.data=-1", "mesh.fsdp=-1", "at most one"]]),
    "mesh_zero": ({"mesh.tensor": 0}, 8, 1, [["mesh.tensor=0", "--config.mesh.tensor"]]),
    "profile": ({"profile": "5"}, 1, 1, [["profile='5'", "START:END"]]),
    "sequence_needs_manual": ({"mesh.data": 1, "mesh.sequence": 2}, 2, 1,
                              [["mesh.sequence=2", "--config.sharding_mode=manual"]]),
    "seq_len_vs_sequence": ({"sharding_mode": "manual", "mesh.data": 1, "mesh.sequence": 3}, 3, 1,
                            [["model.max_seq_len=16", "mesh.sequence=3", "max_seq_len=18",
                              "--config.mesh.sequence=2"]]),
    "sequence_across_processes": ({"sharding_mode": "manual", "mesh.data": 1, "mesh.sequence": 2}, 2, 2,
                                  [["mesh.sequence=2", "2 processes", "mesh.data x mesh.fsdp = 1"]]),
    "manual_kv_heads_vs_tensor": ({"sharding_mode": "manual", "model.n_kv_head": 1, "mesh.data": 1,
                                   "mesh.tensor": 2}, 2, 1, [["model.n_kv_head=1", "mesh.tensor=2"]]),
    "manual_mlp_vs_tensor": ({"sharding_mode": "manual", "model.d_ff": 30, "mesh.data": 1, "mesh.tensor": 4},
                             4, 1, [["model.d_ff=30", "mesh.tensor=4", "multiple of 4"]]),
    "manual_dropout": ({"sharding_mode": "manual", "model.dropout": 0.1}, 1, 1,
                       [["model.dropout=0.1", "--config.sharding_mode=auto"]]),
    "mode_and_remat": ({"sharding_mode": "magic", "remat": "most"}, 1, 1,
                       [["sharding_mode='magic'", "auto", "manual"], ["remat='most'", "dots_no_batch"]]),
    "lora": ({"lora.rank": 4, "lora.alpha": -1.0, "lora.dropout": 1.0, "lora.quantize": "int3"}, 1, 1,
             [["lora.alpha=-1.0", "--config.lora.alpha"], ["lora.dropout=1.0", "[0, 1)"],
              ["lora.quantize='int3'", "'int8' or 'int4'"], ["lora.base=''", "--config.lora.base"]]),
    "vocab_below_data": ({"model.vocab_size": 10}, 1, 1,
                         [["model.vocab_size=10", "has 23 tokens but model.vocab_size=10"]]),
    "context_above_data": ({"model.max_seq_len": 1000}, 1, 1,
                           [["val.bin holds 400 tokens, fewer than seq_len + 1 = 1001",
                             "model.max_seq_len"]]),
    "all_together": ({"batch_size": 0, "lr": -1.0, "ckpt_every": 0, "model.n_layer": 0}, 1, 1,
                     [["batch_size=0"], ["lr=-1.0"], ["ckpt_every=0"], ["model.n_layer=0"]]),
}


@pytest.mark.parametrize("name", list(CONFIG_CASES))
def test_config_problems_are_each_one_line_naming_key_value_and_fix(name, synth_data):
    changes, devices, processes, expected = CONFIG_CASES[name]
    before = snapshot(synth_data)
    with pytest.raises(ConfigError) as e:
        validate_config(small_config(synth_data, **changes), n_devices=devices, n_processes=processes)
    lines = e.value.problems
    assert str(e.value).splitlines() == lines
    assert len(lines) == len(expected), lines
    for line, parts in zip(lines, expected, strict=True):
        for part in parts:
            assert part in line, (part, line)
    assert snapshot(synth_data) == before


def test_good_configs_pass(synth_data):
    validate_config(small_config(synth_data), n_devices=1, n_processes=1)
    validate_config(small_config(synth_data, batch_size=8, **{"mesh.data": 2, "mesh.fsdp": 2}),
                    n_devices=4, n_processes=2)
    validate_config(small_config(synth_data, **{"model.n_kv_head": 2, "mesh.tensor": 2, "lr": 1e12,
                                                "grad_clip": 0.0, "warmup_steps": 0}), n_devices=2)
    validate_config(small_config(synth_data, **{"sharding_mode": "manual", "remat": "dots", "mesh.data": 1,
                                                "mesh.fsdp": 2, "mesh.tensor": 2, "mesh.sequence": 2}),
                    n_devices=8, n_processes=1)
    for path in ("configs/shakespeare_char_cpu.py", "configs/shakespeare_char.py", "configs/gpt2_124m.py"):
        spec = {}
        exec(compile((REPO / path).read_text(), path, "exec"), spec)  # noqa: S102  (our own configs)
        c = spec["get_config"]()
        c.data_dir = str(synth_data)
        c.model.max_seq_len = 16
        validate_config(c, n_devices=1, n_processes=1)


def test_data_dir_problems(synth_data, tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = {tmp_path / "missing": ["no such directory", "prepare_data.py --input=FILE --out_dir="],
             empty: ["has no meta.json", "prepare_data.py"]}
    for path, parts in cases.items():
        with pytest.raises(ConfigError) as e:
            validate_config(small_config(path), n_devices=1, n_processes=1)
        assert e.value.problems[0].startswith(f"data_dir={str(path)!r}: "), e.value.problems
        assert all(p in e.value.problems[0] for p in parts), e.value.problems
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: not str(p).endswith("train.bin")
                        and real_access(p, mode))
    with pytest.raises(ConfigError, match=r"train.bin is not readable"):
        validate_config(small_config(synth_data), n_devices=1, n_processes=1)


def test_unknown_and_missing_keys_in_a_config(synth_data):
    c = small_config(synth_data)
    c.batchsize = 32  # a config file's typo: silently ignored before
    del c["eval_iters"]
    with pytest.raises(ConfigError) as e:
        validate_config(c, n_devices=1, n_processes=1)
    assert e.value.problems == [
        "batchsize: unknown config key; did you mean 'batch_size'?",
        "eval_iters: missing from the config; start configs from nanojax.train.default_config()",
    ]


def test_train_validates_before_writing_anything(synth_data, tmp_path):
    with pytest.raises(ConfigError, match="ckpt_every=0"):
        train(small_config(synth_data, ckpt_every=0), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------------------------
# Never overwrite: a non-empty target is refused untouched; --overwrite replaces it whole.


def _hf_dir_with_extra(path: Path) -> Path:
    nj.save_hf(nj.init_params(TINY, jax.random.key(1)), TINY, path)
    (path / "generation_config.json").write_text('{"eos_token_id": 50256}')
    return path


def test_save_hf_refuses_a_model_dir_and_overwrite_replaces_it_whole(tmp_path):
    target = _hf_dir_with_extra(tmp_path / "out")
    params = nj.init_params(TINY, jax.random.key(2))
    before = snapshot(tmp_path)
    with pytest.raises(OutputExistsError) as e:
        nj.save_hf(params, TINY, target)
    one_line(e.value, target, "generation_config.json", "--overwrite")
    assert snapshot(tmp_path) == before
    nj.save_hf(params, TINY, target, overwrite=True)
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary left beside it
    _, back = nj.load_hf(target)
    np.testing.assert_array_equal(back["wte"], params["wte"])


def test_a_failed_overwrite_changes_nothing(tmp_path):
    target = _hf_dir_with_extra(tmp_path / "out")
    before = snapshot(tmp_path)
    with pytest.raises(TypeError, match="tokenizer"):  # fails after model.safetensors is written
        nj.save_hf(nj.init_params(TINY, jax.random.key(3)), TINY, target, tokenizer=12345, overwrite=True)
    assert snapshot(tmp_path) == before


def test_prepare_refuses_a_data_dir_and_overwrite_replaces_it(tmp_path):
    out = tmp_path / "data"
    data.prepare(SYNTH, CharTokenizer.from_text(SYNTH), out)
    before = snapshot(tmp_path)
    with pytest.raises(OutputExistsError) as e:
        data.prepare(SYNTH[:2000], CharTokenizer.from_text(SYNTH), out)
    one_line(e.value, out, "meta.json")
    assert snapshot(tmp_path) == before
    (out / "stale.txt").write_text("from an older run")
    (out / "input.txt").write_text("the downloaded source")
    meta = data.prepare(SYNTH[:2000], CharTokenizer.from_text(SYNTH), out, overwrite=True,
                        keep=("input.txt",))
    assert meta["train_tokens"] + meta["val_tokens"] == 2000
    assert sorted(p.name for p in out.iterdir()) == [
        "input.txt", "meta.json", "tokenizer_char.json", "train.bin", "val.bin"]
    assert (out / "input.txt").read_text() == "the downloaded source"


def test_hf_to_workdir_refuses_non_empty_and_overwrite_replaces(tmp_path, hf_model):
    work = tmp_path / "w"
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    before = snapshot(tmp_path)
    with pytest.raises(OutputExistsError) as e:
        hf.hf_to_workdir(hf_model, work)
    one_line(e.value, work, "notes.txt")
    assert snapshot(tmp_path) == before
    hf.hf_to_workdir(hf_model, work, overwrite=True)
    assert sorted(p.name for p in work.iterdir()) == ["checkpoints", "config.json", "tokenizer.json"]
    cfg, params, _ = nj.load_checkpoint(work)  # the orbax checkpoint survives the rename
    assert cfg.n_layer == TINY.n_layer and params["wte"].shape == (23, 16)
    with pytest.raises(FileExistsError, match="already holds a run.*--overwrite"):
        hf.hf_to_workdir(hf_model, work)


def test_workdir_to_hf_refuses_an_hf_dir_and_its_own_workdir(tmp_path, workdir):
    target = _hf_dir_with_extra(tmp_path / "out")
    before = snapshot(tmp_path, workdir)
    with pytest.raises(OutputExistsError):
        hf.workdir_to_hf(workdir, target)
    with pytest.raises(ValueError, match="would replace its own input"):
        hf.workdir_to_hf(workdir, workdir, overwrite=True)
    assert snapshot(tmp_path, workdir) == before


# ----------------------------------------------------------------------------------------------
# Input files: named, with what is wrong.


def test_binary_and_non_utf8_text_name_the_file_and_offset(tmp_path):
    cases = {"latin1.txt": ("caf\xe9 au lait".encode("latin-1"), "offset 3", "0xe9"),
             "nul.txt": (b"some text\0\0\0", "NUL byte at offset 9", "binary"),
             "utf16.txt": ("hello".encode("utf-16-le"), "NUL byte at offset 1", "UTF-16")}
    for name, (raw, *parts) in cases.items():
        (tmp_path / name).write_bytes(raw)
        with pytest.raises(ValueError) as e:
            data.read_text(tmp_path / name)
        one_line(e.value, tmp_path / name, *parts)


def test_text_with_nothing_to_learn_is_refused(tmp_path):
    for text, val_fraction, parts in (("\0" * 500, 0.1, ["vocabulary of 1 token", "'\\x00'"]),
                                      ("z" * 500, 0.1, ["vocabulary of 1 token", "'z'"]),
                                      ("hi there", 0.1, ["only 8 tokens", "at least 100"]),
                                      (SYNTH[:200], 0.001, ["val_fraction=0.001", "199 train and 1 val"])):
        with pytest.raises(ValueError) as e:
            data.prepare(text, CharTokenizer.from_text(text), tmp_path / "out", val_fraction)
        one_line(e.value, *parts)
    assert not (tmp_path / "out").exists()


def test_damaged_hf_files_are_named(tmp_path, hf_model):
    import shutil

    trunc = shutil.copytree(hf_model, tmp_path / "trunc")
    raw = (trunc / "model.safetensors").read_bytes()
    (trunc / "model.safetensors").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(hf.HFFormatError) as e:
        nj.load_hf(trunc)
    one_line(e.value, trunc / "model.safetensors", "truncated")

    bad_json = shutil.copytree(hf_model, tmp_path / "json")
    (bad_json / "config.json").write_text((bad_json / "config.json").read_text()[:-10])
    with pytest.raises(hf.HFFormatError) as e:
        nj.load_hf(bad_json)
    one_line(e.value, bad_json / "config.json", "not valid JSON", "line")

    (bad_json / "config.json").write_text("[1, 2]")
    with pytest.raises(hf.HFFormatError) as e:
        nj.load_hf(bad_json)
    one_line(e.value, bad_json / "config.json", "JSON list")

    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    with pytest.raises(ValueError) as e:
        load_tokenizer(tmp_path / "tokenizer.json")
    one_line(e.value, tmp_path / "tokenizer.json", "not a valid tokenizer.json")


# ----------------------------------------------------------------------------------------------
# The scripts: `error: ` lines, exit codes, no traceback, nothing written.


def _run(script: str, *args: str, timeout: float = 120,
         cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, str(REPO / "scripts" / script), *args], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=cwd)


def _errors(p: subprocess.CompletedProcess, code: int) -> list[str]:
    """The stderr lines, checked: exit `code`, no traceback, every line an `error: ` line."""
    assert p.returncode == code, (p.returncode, p.stderr[-2000:])
    assert "Traceback" not in p.stderr and "Check failure" not in p.stderr, p.stderr[-2000:]
    lines = p.stderr.strip().splitlines()
    assert lines and all(line.startswith("error: ") for line in lines), p.stderr[-2000:]
    return lines


def test_train_script_reports_every_config_problem_then_debug_shows_the_traceback(synth_data, tmp_path):
    base = ["--config=configs/shakespeare_char_cpu.py", f"--workdir={tmp_path / 'w'}",
            f"--config.data_dir={synth_data}"]
    before = snapshot(tmp_path, synth_data)
    p = _run("train.py", *base, "--config.batch_size=0", "--config.grad_accum=0", "--config.lr=-1",
             "--config.ckpt_every=0", cwd=REPO)
    lines = _errors(p, 1)
    assert [line.split(":")[1].strip() for line in lines] == [
        "batch_size=0", "grad_accum=0", "lr=-1.0", "ckpt_every=0"], lines
    p = _run("train.py", *base, "--config.model.n_layers=3", cwd=REPO)
    assert _errors(p, 2) == [
        "error: --config.model.n_layers=3: unknown config key 'model.n_layers' (not found in "
        "configs/shakespeare_char_cpu.py); did you mean --config.model.n_layer?"]
    p = _run("train.py", *base, "--config.lr=-1", "--debug", cwd=REPO)
    assert p.returncode == 1 and "Traceback" in p.stderr and "ConfigError: lr=-1.0" in p.stderr
    assert snapshot(tmp_path, synth_data) == before


def test_prepare_and_convert_scripts_refuse_with_one_line(tmp_path, synth_data, workdir):
    (tmp_path / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    target = _hf_dir_with_extra(tmp_path / "hf_out")
    before = snapshot(tmp_path, synth_data, workdir)
    p = _run("prepare_data.py", f"--input={tmp_path / 'image.png'}", f"--out_dir={tmp_path / 'd'}")
    assert _errors(p, 1) == [f"error: {tmp_path / 'image.png'} is not UTF-8 text: byte 0x89 at offset 0 "
                             "is invalid start byte. Give a plain UTF-8 text file (convert with e.g. "
                             "`iconv -t UTF-8`)."]
    p = _run("prepare_data.py", f"--input={tmp_path / 'image.png'}", f"--out_dir={synth_data}")
    [line] = _errors(p, 1)
    assert str(synth_data) in line and "not empty" in line and "--overwrite" in line
    p = _run("convert.py", f"--workdir={workdir}", f"--out_hf_dir={target}")
    [line] = _errors(p, 1)
    assert f"{target} is not empty" in line and "generation_config.json" in line
    p = _run("sample.py")
    assert _errors(p, 2) == ["error: pass exactly one of --workdir or --hf_dir"]
    assert snapshot(tmp_path, synth_data, workdir) == before


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_a_process_started_alone_gives_up_naming_the_missing_one(synth_data, tmp_path):
    port = _free_port()
    p = _run("train.py", "--config=configs/shakespeare_char_cpu.py", f"--workdir={tmp_path / 'w'}",
             f"--config.data_dir={synth_data}", f"--coordinator=localhost:{port}", "--num_processes=2",
             "--process_id=0", "--init_timeout=4", cwd=REPO, timeout=60)
    assert p.returncode == 1, p.stderr[-3000:]
    assert "Traceback" not in p.stderr and "Check failure" not in p.stderr, p.stderr[-3000:]
    lines = p.stderr.strip().splitlines()
    assert f"waiting for 1 of 2 processes at localhost:{port}" in lines[0], lines
    assert [line for line in lines if line.startswith("error: ")] == [lines[-1]]
    assert lines[-1] == (
        f"error: process 1 of 2 never joined the coordinator at localhost:{port} within "
        f"--init_timeout=4 s. Start it with the same command with --coordinator=localhost:{port} "
        "--num_processes=2 --process_id=1, or raise --init_timeout.")
    assert not (tmp_path / "w").exists()
