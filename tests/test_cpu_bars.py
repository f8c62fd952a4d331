"""scripts/cpu_bars.py: the verdict table of scripts/bench_cpu.sh, from the benches' JSON files.

The inputs are written here in the shape `bench_train.py --json` and `bench_decode.py --json` give;
the expected ratios are worked out by hand from the speed issue's definitions (a speed-up is the
slower side's time over the faster's; decode compares tokens per second)."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import cpu_bars  # noqa: E402

ZEN5 = ("AMD EPYC; avx2 avx512f avx512_bf16 avx512_vnni; 2 logical CPUs (2 cores), 2 usable; threads XLA 2; "
        "XLA tuning amd-avx512: none")
AVX2 = "AMD EPYC 7B12; avx2; 2 logical CPUs (2 cores), 2 usable; threads XLA 2; XLA tuning amd-avx2: none"


def _write(folder: Path, cpu: str, quick: dict, gpt2: dict, decode: list | None, losses: tuple | None):
    (folder / "train_quickstart.json").write_text(json.dumps(
        {"cpu": cpu, "ms_per_step": {"shakespeare": quick}}))
    (folder / "train_gpt2.json").write_text(json.dumps({"cpu": cpu, "ms_per_step": {"gpt2": gpt2}}))
    if decode is not None:
        (folder / "decode.json").write_text(json.dumps({"cpu": cpu, "new_tokens": 128, "rows": decode}))
    if losses is not None:
        for dtype, loss in zip(("float32", "bfloat16"), losses, strict=True):
            (folder / f"quality_{dtype}").mkdir()
            lines = [{"step": 0, "header": {}},
                     {"step": 2000, "val_loss": loss + 0.01, "val_loss_full": loss}]
            (folder / f"quality_{dtype}" / "metrics.jsonl").write_text(
                "".join(json.dumps(rec) + "\n" for rec in lines))


def _row(rows, start):
    (row,) = [r for r in rows if r[0].startswith(start)]
    return row


def test_every_bar_from_the_files(tmp_path):
    decode = [{"label": "nanojax fp32", "tps": 90.0, "same": None, "shape": "llama-134m", "batch": 1},
              {"label": "llama.cpp F32", "tps": 100.0, "same": 128, "shape": "llama-134m", "batch": 1}]
    _write(tmp_path, ZEN5, {"nanojax": 20.0, "nanojax bf16": 12.5, "nanoGPT (torch eager)": 32.0},
           {"nanojax": 1000.0, "nanojax bf16": 700.0, "torch eager": 1250.0}, decode, (1.90, 1.93))
    rows, cpus = cpu_bars.bars(tmp_path)
    assert _row(rows, "fp32 training, quickstart")[3:] == ("1.60x", ">= 1.5x", "yes")
    assert _row(rows, "fp32 training, GPT-2")[3:] == ("1.25x", ">= 1.3x", "no")
    assert _row(rows, "fp32 decode")[3] == "0.90x" and _row(rows, "fp32 decode")[5].startswith("no;")
    assert _row(rows, "bf16 vs fp32 training, quickstart")[3:] == ("1.60x", ">= 1.5x", "yes")
    assert _row(rows, "bf16 vs fp32 training, GPT-2")[3:] == ("1.43x", ">= 1.5x", "no")
    loss = _row(rows, "bf16 whole-split")
    assert loss[3] == "+1.58%" and loss[5] == "no"  # 1.93 / 1.90 - 1: outside 1%
    assert set(cpus) == {ZEN5}


def test_missing_parts_say_not_measured_and_no_bf16_is_not_applicable(tmp_path):
    _write(tmp_path, AVX2, {"nanojax": 20.0, "nanojax bf16": 12.0},
           {"nanojax": 1000.0, "torch eager": 1400.0}, None, None)
    rows, _ = cpu_bars.bars(tmp_path)
    assert _row(rows, "fp32 training, quickstart")[5].startswith("not measured")  # no nanoGPT side
    assert _row(rows, "fp32 training, GPT-2")[5] == "yes"
    assert _row(rows, "fp32 decode")[5].startswith("not measured")
    assert _row(rows, "bf16 vs fp32 training, quickstart")[5] == "n/a: no native bf16 on this CPU"
    assert _row(rows, "bf16 whole-split")[5].startswith("not measured")
    assert not cpu_bars.native_bf16(AVX2) and cpu_bars.native_bf16(ZEN5)


def test_a_bf16_run_is_not_taken_for_the_fp32_bar(tmp_path):
    _write(tmp_path, ZEN5, {"nanojax": 10.0, "nanoGPT (torch eager)": 40.0}, {"nanojax": 1.0}, None, None)
    record = json.loads((tmp_path / "train_quickstart.json").read_text())
    (tmp_path / "train_quickstart.json").write_text(json.dumps({**record, "dtype": "bfloat16"}))
    rows, _ = cpu_bars.bars(tmp_path)
    assert "is bfloat16" in _row(rows, "fp32 training, quickstart")[5]


def test_the_bf16_row_stands_without_the_baseline(tmp_path):
    _write(tmp_path, ZEN5, {"nanojax": 21.0, "nanojax bf16": 14.0}, {"nanojax": 1.0}, None, None)
    rows, _ = cpu_bars.bars(tmp_path)
    assert _row(rows, "fp32 training, quickstart")[5].startswith("not measured")  # no nanoGPT side
    assert _row(rows, "bf16 vs fp32 training, quickstart")[3:] == ("1.50x", ">= 1.5x", "yes")


def test_a_bf16_run_of_its_own_is_preferred(tmp_path):
    """train_quickstart_bf16.json (nanojax's two sides alone) gives the quickstart's bf16 row; the
    nanoGPT run's file still gives the fp32 row, and GPT-2's bf16 row its own file's side."""
    _write(tmp_path, ZEN5, {"nanojax": 20.0, "nanojax bf16": 14.0, "nanoGPT (torch eager)": 36.0},
           {"nanojax": 1000.0, "nanojax bf16": 640.0, "torch eager": 1500.0}, None, None)
    (tmp_path / "train_quickstart_bf16.json").write_text(json.dumps(
        {"cpu": ZEN5, "ms_per_step": {"shakespeare": {"nanojax": 18.0, "nanojax bf16": 11.25}}}))
    rows, _ = cpu_bars.bars(tmp_path)
    assert _row(rows, "fp32 training, quickstart")[3] == "1.80x"
    assert _row(rows, "bf16 vs fp32 training, quickstart")[1:4] == ("11.2 ms/step", "18.0 ms/step (fp32)",
                                                                     "1.60x")
    assert _row(rows, "bf16 vs fp32 training, GPT-2")[3] == "1.56x"


def test_a_bf16_run_alone_still_gives_its_row(tmp_path):
    """Only the bf16 run's file (no nanoGPT checkout, no torch run): its row, the CPU line from it."""
    (tmp_path / "train_quickstart_bf16.json").write_text(json.dumps(
        {"cpu": ZEN5, "ms_per_step": {"shakespeare": {"nanojax": 16.0, "nanojax bf16": 10.0}}}))
    rows, cpus = cpu_bars.bars(tmp_path)
    assert cpus == [ZEN5]
    assert _row(rows, "bf16 vs fp32 training, quickstart")[3:] == ("1.60x", ">= 1.5x", "yes")
    assert _row(rows, "fp32 training, quickstart")[5].startswith("not measured")
