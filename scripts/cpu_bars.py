"""The CPU speed and quality bars, read back from the files `scripts/bench_cpu.sh` writes.

    python scripts/cpu_bars.py --dir=out/bench_cpu

One row per bar: what nanojax measured, what it was measured against (side by side in the same
process), the ratio, the goal and whether it is met. A bar whose file is missing says so (not
measured) rather than guessing. The goals are the speed issue's:
  - fp32 training step >= 1.5x nanoGPT as shipped (PyTorch eager) at the quickstart shape, and
    >= 1.3x PyTorch eager (HF GPT-2) at GPT-2 124M;
  - fp32 decode at batch 1 (llama-134m) >= llama.cpp F32, the same weights;
  - on a CPU with native bf16 (AVX512_BF16 or AMX): bf16 training (fp32 master weights) >= 1.5x
    nanojax's own fp32, and its whole-split val loss within 1% of fp32's.
Files in --dir: train_quickstart.json and train_gpt2.json (`bench_train.py --json`), decode.json
(`bench_decode.py --json`), quality_float32/metrics.jsonl and quality_bfloat16/metrics.jsonl
(`scripts/train.py` runs of the quickstart config). A bf16 row reads train_<shape>_bf16.json where
there is one (a `--bf16_ab` run with nanojax's two sides only), else the shape's own file's
"nanojax bf16" side.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from absl import app, flags

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nanojax.metrics import read_metrics  # noqa: E402

flags.DEFINE_string("dir", "out/bench_cpu", "The folder scripts/bench_cpu.sh wrote.")
FLAGS = flags.FLAGS

TRAIN_GOALS = {  # (file, shape, baseline side, goal, row label)
    "quickstart": ("train_quickstart.json", "shakespeare", "nanoGPT (torch eager)", 1.5,
                   "fp32 training, quickstart shape (12 x 64), vs nanoGPT as shipped"),
    "gpt2": ("train_gpt2.json", "gpt2", "torch eager", 1.3,
             "fp32 training, GPT-2 124M (2 x 256), vs PyTorch eager"),
}
BF16_GOAL = 1.5
LOSS_TOLERANCE = 0.01  # bf16's whole-split val loss within 1% of fp32's
DECODE_GOAL = 1.0


def _load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _final_full_loss(metrics: Path) -> float | None:
    """The last `val_loss_full` a run's metrics.jsonl recorded (None if it has none)."""
    if not metrics.is_file():
        return None
    full = [rec["val_loss_full"] for rec in read_metrics(metrics) if "val_loss_full" in rec]
    return full[-1] if full else None


def native_bf16(cpu_line: str) -> bool:
    """Whether a `metrics.cpu_description` line lists a native bf16 ISA."""
    isa = cpu_line.split(";")[1].split() if cpu_line.count(";") >= 1 else []
    return any(flag in isa for flag in ("avx512_bf16", "amx_bf16"))


def bars(folder: Path) -> tuple[list[tuple[str, str, str, str, str, str]], list[str]]:
    """(rows, cpu lines): rows of (bar, nanojax, against, ratio, goal, met)."""
    rows, cpus = [], []
    train = {}
    for key, (fname, shape, base, goal, label) in TRAIN_GOALS.items():
        rec = _load(folder / fname)
        ms = (rec or {}).get("ms_per_step", {}).get(shape)
        if rec:
            cpus.append(rec["cpu"])
        if rec and rec.get("dtype", "float32") != "float32":
            rows.append((label, "-", "-", "-", f">= {goal}x", f"not measured ({fname}'s nanojax side is "
                         f"{rec['dtype']}: run bench_train.py without --dtype)"))
            continue
        if ms and "nanojax" in ms:
            train[key] = ms  # for the bf16 rows, whether or not the baseline ran
        if not ms or "nanojax" not in ms or base not in ms:
            rows.append((label, "-", "-", "-", f">= {goal}x", f"not measured (no {base} side in {fname})"))
            continue
        ratio = ms[base] / ms["nanojax"]
        rows.append((label, f"{ms['nanojax']:.1f} ms/step", f"{ms[base]:.1f} ms/step", f"{ratio:.2f}x",
                     f">= {goal}x", "yes" if ratio >= goal else "no"))
    dec = _load(folder / "decode.json")
    label = "fp32 decode, llama-134m batch 1, vs llama.cpp F32"
    tps = {r["label"]: r for r in (dec or {}).get("rows", [])
           if r["shape"] == "llama-134m" and r["batch"] == 1}
    if dec:
        cpus.append(dec["cpu"])
    if "nanojax fp32" in tps and "llama.cpp F32" in tps:
        nj, cpp = tps["nanojax fp32"], tps["llama.cpp F32"]
        ratio = nj["tps"] / cpp["tps"]
        same = f"; greedy tokens {cpp['same']}/{dec['new_tokens']} equal" if cpp["same"] is not None else ""
        rows.append((label, f"{nj['tps']:.1f} tok/s", f"{cpp['tps']:.1f} tok/s", f"{ratio:.2f}x",
                     f">= {DECODE_GOAL}x", ("yes" if ratio >= DECODE_GOAL else "no") + same))
    else:
        rows.append((label, "-", "-", "-", f">= {DECODE_GOAL}x",
                     "not measured (no decode.json with both rows)"))
    bf16_here = bool(cpus) and native_bf16(cpus[0])
    for key, name in (("quickstart", "quickstart shape"), ("gpt2", "GPT-2 124M")):
        label = f"bf16 vs fp32 training, {name}"
        ms = train.get(key, {})
        own = _load(folder / TRAIN_GOALS[key][0].replace(".json", "_bf16.json"))
        if own:  # nanojax's fp32 and bf16 alone in their process
            ms = own.get("ms_per_step", {}).get(TRAIN_GOALS[key][1], {})
            cpus.append(own["cpu"])
            bf16_here = native_bf16(cpus[0])
        if cpus and not bf16_here:
            rows.append((label, "-", "-", "-", f">= {BF16_GOAL}x", "n/a: no native bf16 on this CPU"))
        elif "nanojax bf16" in ms:
            ratio = ms["nanojax"] / ms["nanojax bf16"]
            rows.append((label, f"{ms['nanojax bf16']:.1f} ms/step", f"{ms['nanojax']:.1f} ms/step (fp32)",
                         f"{ratio:.2f}x", f">= {BF16_GOAL}x", "yes" if ratio >= BF16_GOAL else "no"))
        else:
            rows.append((label, "-", "-", "-", f">= {BF16_GOAL}x", "not measured (no bf16 side)"))
    f32 = _final_full_loss(folder / "quality_float32" / "metrics.jsonl")
    b16 = _final_full_loss(folder / "quality_bfloat16" / "metrics.jsonl")
    label = "bf16 whole-split val loss vs fp32's, quickstart"
    if f32 is None or b16 is None:
        rows.append((label, "-", "-", "-", f"within {LOSS_TOLERANCE:.0%}", "not measured (no quality runs)"))
    else:
        rel = b16 / f32 - 1
        rows.append((label, f"{b16:.4f}", f"{f32:.4f} (fp32)", f"{rel:+.2%}", f"within {LOSS_TOLERANCE:.0%}",
                     "yes" if abs(rel) <= LOSS_TOLERANCE else "no"))
    return rows, cpus


def main(argv):
    del argv
    rows, cpus = bars(Path(FLAGS.dir))
    # model; ISA flags; CPUs (the rest of a line names each bench's own threads)
    machines = sorted({";".join(c.split(";")[:3]) for c in cpus})
    for cpu in machines or ["(no benchmark file found)"]:
        print(f"CPU: {cpu}")
    if len(machines) > 1:
        print("WARNING: the files come from different machines; their ratios are each their own machine's")
    print("| bar | nanojax | against | ratio | goal | met |")
    print("|---|---:|---:|---:|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    app.run(main)
