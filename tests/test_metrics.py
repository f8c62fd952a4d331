"""FLOPs accounting against XLA's own count of the compiled train step, MFU, metrics.jsonl."""

import json

import pytest

import nanojax as nj
from nanojax.kernels import cpu_attention, cpu_gemm
from nanojax.metrics import (
    PEAK_TFLOPS,
    MetricsWriter,
    cpu_description,
    describe_tuning,
    device_peak_flops,
    flops_per_token,
    mfu,
    xla_tuning,
)
from nanojax.train import build, default_config, model_config_from


@pytest.mark.parametrize("preset,overrides", [
    ("shakespeare-char-cpu", {}),
    ("gpt2-small", {"n_layer": 2, "max_seq_len": 128}),
    ("llama-tiny", {"max_seq_len": 128, "vocab_size": 1000}),
])
def test_analytic_flops_match_xla_cost_analysis_within_10_percent(preset, overrides):
    """The MFU printed in training uses flops_per_token; XLA counts every dot of the real step."""
    c = default_config(preset, **overrides)
    c.batch_size = 4
    cfg = model_config_from(c)
    run = build(c, cfg)
    # XLA does not count a custom call's FLOPs: the attention and dense products as XLA's dots
    with cpu_attention.train_attention_kernel(False), cpu_gemm.gemm_kernel(False):
        compiled = run.step_fn.lower(*run.abstract_step_args(4)).compile()
    ca = compiled.cost_analysis()
    ca = ca[0] if isinstance(ca, list) else ca
    ours = flops_per_token(cfg, cfg.max_seq_len) * 4 * cfg.max_seq_len
    assert abs(ca["flops"] / ours - 1) < 0.10, (ca["flops"], ours)


def test_gpt2_small_flops_per_token():
    # 6N with N = 85M block params + 38.6M head (= 124M minus the 0.8M position table), plus
    # 12 L T d = 12 * 12 * 1024 * 768 for attention: the figures in nanoGPT's MFU comment.
    cfg = nj.ModelConfig.preset("gpt2-small")
    n = cfg.num_params() - cfg.max_seq_len * cfg.d_model
    assert flops_per_token(cfg) == 6 * n + 12 * 12 * 1024 * 768


def test_mfu_uses_the_device_table(monkeypatch):
    class FakeGPU:
        platform = "gpu"
        device_kind = "NVIDIA H100 80GB HBM3"

    cfg = nj.ModelConfig.preset("gpt2-small", dtype="bfloat16")
    assert device_peak_flops("bfloat16", FakeGPU()) == PEAK_TFLOPS["H100"]["bfloat16"] * 1e12
    util = mfu(100_000, cfg, 1024, device=FakeGPU())
    assert util == pytest.approx(flops_per_token(cfg, 1024) * 1e5 / 989e12)
    FakeGPU.device_kind = "Mystery Accelerator 9000"
    assert device_peak_flops("bfloat16", FakeGPU()) is None and mfu(1e5, cfg, 1024, device=FakeGPU()) is None


def test_cpu_mfu_is_against_the_peak_of_the_runs_dtype(monkeypatch):
    """On a CPU a bf16 run's MFU divides by the measured bf16 matmul rate (the bf16 gemm kernel
    runs at ~2-4x fp32 where it exists), an fp32 run's by the fp32 one."""
    from nanojax import metrics

    with pytest.raises(ValueError, match="float32 or bfloat16"):
        metrics.measured_cpu_peak_flops(dtype="float16")
    asked, rates = [], {"float32": 1e11, "bfloat16": 4e11}
    monkeypatch.setattr(metrics, "measured_cpu_peak_flops",
                        lambda dtype="float32": asked.append(dtype) or rates[dtype])
    cpu = metrics.jax.devices("cpu")[0]
    for dtype, peak in (("float32", 1e11), ("bfloat16", 4e11)):
        cfg = nj.ModelConfig.preset("gpt2-small", dtype=dtype)
        assert mfu(1000, cfg, 256, device=cpu) == pytest.approx(flops_per_token(cfg, 256) * 1000 / peak)
    assert asked == ["float32", "bfloat16"]


def test_metrics_writer_drops_lines_past_the_resume_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "train_loss": 1.0}) + "\n" for s in range(1, 8)) + '{"st')
    w = MetricsWriter(path, resume_step=5)
    w.write({"step": 6, "train_loss": 2.0})
    steps = [json.loads(line)["step"] for line in path.read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_cpu_description_names_the_model_and_only_the_flags_present(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: Test CPU 9000\nflags\t\t: fpu sse2 avx2 avx512f "
                    "avx512_vnni amx_int8 avx512_fp16\n\nprocessor\t: 1\nmodel name\t: Test CPU 9000\n"
                    "flags\t\t: fpu sse2 avx2 avx512f avx512_vnni amx_int8 avx512_fp16\n")
    line = cpu_description("XLA 2, torch 2", cpuinfo=info)
    assert line.startswith("Test CPU 9000; avx2 avx512f avx512_vnni amx_int8; "), line
    assert " logical CPUs, " in line and " usable; threads XLA 2, torch 2; XLA tuning " in line, line
    assert line.endswith(describe_tuning(xla_tuning())), line  # this process's choice of XLA flags
    info.write_text("processor\t: 0\nphysical id\t: 0\ncore id\t: 0\nprocessor\t: 1\nphysical id\t: 0\n"
                    "core id\t: 0\nflags\t: avx2\n")  # one core, two hyperthreads
    assert " logical CPUs (1 core), " in cpu_description(cpuinfo=info)
    info.write_text("model name\t: Old CPU\nflags\t\t: fpu sse2\n")
    assert "; none of avx2, " in cpu_description(cpuinfo=info)
    assert "ISA flags unknown" in cpu_description(cpuinfo=tmp_path / "missing")
