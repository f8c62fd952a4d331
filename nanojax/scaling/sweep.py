"""Running a sweep: the corpus (prepared once, fingerprinted), each run an ordinary training workdir
under SWEEP/runs/ trained by nanojax.train.train (so it resumes, and a finished run is skipped), and
the record of each run that the fits read (SWEEP/results.json).

    SWEEP/sweep.json      the sweep config and the corpus fingerprint (a sweep is one corpus)
    SWEEP/data/           train.bin, val.bin, the tokenizer (when --input is a text file)
    SWEEP/runs/NAME/      one training workdir per run: checkpoints/, config.json, metrics.jsonl
    SWEEP/results.json    one record per run: N, D, C, final loss, diverged?, profile summary, curve
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np

from nanojax import data as data_lib
from nanojax.metrics import read_metrics, write_atomic
from nanojax.scaling.grid import RunSpec, make_grid, run_config
from nanojax.tokenizer import CharTokenizer, HFTokenizer

SWEEP_FILE = "sweep.json"
RESULTS_FILE = "results.json"
_HASH_CHUNK = 64 << 20  # bytes hashed from each end of a big file (a GPU corpus is many GB)


class CorpusMismatchError(ValueError):
    """The sweep directory was made from another corpus or tokenizer."""


def _file_digest(path: Path) -> str:
    """sha256 of the size and of the first and last 64 MiB: the whole of any small file, and enough
    of a big token file to tell corpora apart without reading gigabytes."""
    h = hashlib.sha256()
    size = path.stat().st_size
    h.update(str(size).encode())
    with path.open("rb") as f:
        h.update(f.read(_HASH_CHUNK))
        if size > 2 * _HASH_CHUNK:
            f.seek(size - _HASH_CHUNK)
            h.update(f.read())
        elif size > _HASH_CHUNK:
            h.update(f.read())
    return h.hexdigest()


def fingerprint(data_dir: str | Path) -> dict[str, str]:
    """What identifies a prepared corpus: digests of train.bin, val.bin and the tokenizer file."""
    d = Path(data_dir)
    tok = next((d / f for f in ("tokenizer.json", "tokenizer_char.json") if (d / f).exists()), None)
    if tok is None:
        raise FileNotFoundError(f"{d} holds no tokenizer file; prepare it with scripts/prepare_data.py")
    return {"train": _file_digest(d / "train.bin"), "val": _file_digest(d / "val.bin"),
            "tokenizer": _file_digest(tok)}


def prepare_corpus(sweep: ml_collections.ConfigDict, input_path: str | Path, sweep_dir: str | Path) -> Path:
    """The data dir of the sweep. A prepared data dir (meta.json inside) is used as it is; a text
    file is tokenized once into SWEEP/data (byte-level BPE of sweep.vocab_size, or characters),
    then reused. Either way the corpus must match the fingerprint the sweep dir was made with:
    a sweep dir from another corpus or tokenizer raises CorpusMismatchError, changing nothing."""
    src, sweep_dir = Path(input_path), Path(sweep_dir)
    saved = json.loads((sweep_dir / SWEEP_FILE).read_text()) if (sweep_dir / SWEEP_FILE).exists() else None
    text_digest = None
    if src.is_dir():
        data_dir = src
        data_lib.load_meta(src)  # names the fix when it is not a prepared dir
    elif src.is_file():
        text_digest = _file_digest(src)
        data_dir = sweep_dir / "data"
        if saved and saved.get("input_digest") not in (None, text_digest):
            _refuse(sweep_dir, saved, f"the text file {src} differs from the one it was made from")
        if not (data_dir / data_lib.META).exists():
            text = data_lib.read_text(src)
            tok = (HFTokenizer.train_bpe(text, sweep.vocab_size) if sweep.tokenizer == "bpe"
                   else CharTokenizer.from_text(text))
            data_lib.prepare(text, tok, data_dir, sweep.val_fraction, overwrite=True)
    else:
        raise FileNotFoundError(f"--input={src}: no such file or directory; give a UTF-8 text file or a "
                                "data dir made by scripts/prepare_data.py")
    fp = fingerprint(data_dir)
    if saved and saved.get("fingerprint") != fp:
        what = [k for k in fp if saved.get("fingerprint", {}).get(k) != fp[k]]
        _refuse(sweep_dir, saved, f"{data_dir} differs in {', '.join(what)}")
    if not saved:
        sweep_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(sweep_dir / SWEEP_FILE, json.dumps(
            {"input": str(src.absolute()), "input_digest": text_digest, "data_dir": str(data_dir.absolute()),
             "fingerprint": fp, "config": sweep.to_dict()}, indent=2, default=str))
    return data_dir


def _refuse(sweep_dir: Path, saved: dict, why: str) -> None:
    raise CorpusMismatchError(
        f"{sweep_dir} holds a sweep made from another corpus or tokenizer ({saved.get('input')}): {why}. "
        "Its runs cannot be fitted together with new ones, and nothing was changed. Use a new "
        "--workdir for this corpus, or the original --input to continue that sweep.")


def run_record(spec: RunSpec, workdir: Path, vocab_size: int, margin: float = 0.0,
               error: str | None = None) -> dict[str, Any]:
    """The record of one run for the fits, from its metrics.jsonl: final loss (the whole-split val
    loss), diverged or not, the loss curve, and the profile summary (medians over logged steps after
    the first, which holds compilation: step time split into device wait and host, tokens/s, MFU)."""
    rec: dict[str, Any] = {**spec.to_dict(), "loss": None, "diverged": False, "finished": False}
    metrics = read_metrics(workdir / "metrics.jsonl") if (workdir / "metrics.jsonl").exists() else []
    steps = [m for m in metrics if "step_time_s" in m]
    rec["curve"] = [[m["step"] * spec.tokens // spec.steps, m["train_loss"]] for m in steps]
    timed = steps[1:] or steps
    if timed:
        med = {k: float(np.median([m[k] for m in timed if m.get(k) is not None] or [math.nan]))
               for k in ("step_time_s", "device_wait_s", "host_s", "tokens_per_sec", "mfu")}
        rec["profile"] = med
    final = [m for m in metrics if m.get("step") == spec.steps and "val_loss_full" in m]
    if final:
        rec["finished"] = True
        rec["loss"] = float(final[-1]["val_loss_full"])
    if error is not None:
        rec.update(diverged=True, reason=error)
    elif rec["loss"] is not None and not rec["loss"] <= math.log(vocab_size) + margin:
        rec.update(diverged=True, reason=f"final val loss {rec['loss']:.3f} is above ln(vocab)="
                                         f"{math.log(vocab_size):.3f}: no better than guessing uniformly")
    return rec


def run_sweep(sweep: ml_collections.ConfigDict, input_path: str | Path, sweep_dir: str | Path, *,
              progress: bool = True, log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Trains every run of the grid that is not finished (resuming any that was cut short), and
    writes SWEEP/results.json. A rerun of a finished sweep trains nothing. Returns the records."""
    from nanojax.train import NonFiniteLossError, train

    sweep_dir = Path(sweep_dir)
    data_dir = prepare_corpus(sweep, input_path, sweep_dir)
    vocab = int(data_lib.load_meta(data_dir)["vocab_size"])
    runs = make_grid(sweep, vocab)
    old = {}
    if (sweep_dir / RESULTS_FILE).exists():
        old = {r["name"]: r for r in load_results(sweep_dir)}
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=sum(r.flops for r in runs), desc="sweep", unit="FLOP", unit_scale=True,
                   dynamic_ncols=True)
    done = dict(old)  # every record so far, rewritten after each run (a kill loses at most one)
    records = []
    for spec in runs:
        wd = sweep_dir / "runs" / spec.name
        prev = old.get(spec.name)
        if prev and (prev["finished"] or prev["diverged"]):
            records.append(prev)  # finished (or diverged) before: skipped, not retrained
            status = "skipped (done)"
        else:
            t0, error = time.perf_counter(), None
            try:
                summary = train(run_config(sweep, spec, str(data_dir)), wd, progress=False)
            except NonFiniteLossError as e:
                summary, error = {}, f"non-finite loss: {str(e).split('.')[0]}"
            if summary.get("interrupted"):  # Ctrl-C / SIGTERM: the run saved a checkpoint; stop here
                if bar:
                    bar.close()
                raise KeyboardInterrupt(f"sweep interrupted during {spec.name}; rerun to resume it")
            rec = run_record(spec, wd, vocab, sweep.diverged_margin, error)
            rec["wall_s"] = time.perf_counter() - t0
            records.append(rec)
            done[spec.name] = rec
            _write_results(sweep_dir, list(done.values()))
            status = "DIVERGED" if rec["diverged"] else f"loss {rec['loss']:.4f}"
            p = rec.get("profile", {})
            if p:
                status += (f", {p['step_time_s'] * 1e3:.1f} ms/step ({p['device_wait_s'] * 1e3:.1f} device "
                           f"wait + {p['host_s'] * 1e3:.1f} host), {p['tokens_per_sec']:,.0f} tok/s, MFU "
                           f"{p['mfu']:.1%}, {rec['wall_s']:.0f} s")
        if bar:
            bar.update(spec.flops)
            bar.write(f"{spec.name}: N={spec.n_params:,} D={spec.tokens:,} C={spec.flops:.2e}: {status}")
        else:
            log(f"{spec.name}: {status}")
    if bar:
        bar.close()
    _write_results(sweep_dir, records)
    return records


def _write_results(sweep_dir: Path, records: list[dict[str, Any]]) -> None:
    write_atomic(sweep_dir / RESULTS_FILE, json.dumps({"runs": records}, indent=1))


def load_results(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """The run records of a sweep dir (SWEEP/results.json), as run_sweep wrote them."""
    path = Path(sweep_dir) / RESULTS_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: {sweep_dir} is not a sweep dir (or no run has "
                                "finished yet); run scripts/scaling.py --workdir there first")
    return json.loads(path.read_text())["runs"]

