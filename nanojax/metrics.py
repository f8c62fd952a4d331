"""FLOPs per token, MFU against a device peak table, the metrics.jsonl writer, and a per-op
summary of profiler traces."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import platform
import re
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from nanojax.config import ModelConfig
from nanojax.outdir import write_atomic
from nanojax.xla_env import CPU_ISA_FLAGS, read_cpuinfo, xla_tuning
from nanojax.xla_env import describe as describe_tuning

# Dense peak TFLOP/s per device kind and dtype, from the vendors' spec sheets (no sparsity).
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "H100": {"bfloat16": 989.0, "float16": 989.0, "float32": 67.0},  # SXM; TF32 dense is 494.5
    "H200": {"bfloat16": 989.0, "float16": 989.0, "float32": 67.0},
    "A100": {"bfloat16": 312.0, "float16": 312.0, "float32": 19.5},
    "MI300X": {"bfloat16": 1307.0, "float16": 1307.0, "float32": 163.4},
    "MI250X": {"bfloat16": 383.0, "float16": 383.0, "float32": 47.9},
}


def flops_per_token(cfg: ModelConfig, seq_len: int | None = None) -> float:
    """Training FLOPs per token: 6N + 12 * L * T * N_heads * H (PaLM, appendix B).

    N counts every matmul weight: the blocks plus the output head (V * D, tied or not); the
    embedding lookups are gathers and cost nothing. The attention term counts the full T x T
    score matrix, as PaLM does, not the causal half a fused kernel can skip; so MFU is
    comparable with PaLM's and nanoGPT's numbers.
    """
    T = seq_len or cfg.max_seq_len
    n_matmul = cfg.num_params(include_embeddings=False)
    if cfg.tie_embeddings:
        n_matmul += cfg.vocab_size * cfg.d_model
    return 6.0 * n_matmul + 12.0 * cfg.n_layer * T * cfg.n_head * cfg.resolved_head_dim


@functools.cache
def measured_cpu_peak_flops(n: int = 1024, repeats: int = 10, dtype: str = "float32") -> float:
    """This host's (n, n) @ (n, n) matmul throughput (FLOP/s) in `dtype` (float32 or bfloat16)
    through XLA: the CPU's practical peak. For bfloat16 the product is `dense.matmul`'s, which
    runs on the bf16 gemm kernel where this CPU family has one (MKL, oneDNN: ~2-4x fp32) and on
    XLA's dot elsewhere, so a bf16 run's MFU is against what bf16 reaches here, not fp32's rate.

    The best of `repeats` runs, measured once per process and dtype. On a busy machine it reads
    low (and MFU high): compare MFU figures taken on an otherwise idle host.
    """
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"measured_cpu_peak_flops: dtype must be float32 or bfloat16, got {dtype!r}")
    from nanojax import dense

    cpu = jax.devices("cpu")[0]
    a = jax.device_put(jnp.ones((n, n), dtype), cpu)
    mm = jax.jit(lambda x: x @ x) if dtype == "float32" else jax.jit(lambda x: dense.matmul(x, x))
    mm(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        mm(a).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best


def device_peak_flops(dtype: str, device: Any = None) -> float | None:
    """Peak FLOP/s of one device for `dtype`, or None when the kind is unknown (never a guess)."""
    device = device or jax.devices()[0]
    if device.platform == "cpu":
        return measured_cpu_peak_flops(dtype="bfloat16" if dtype == "bfloat16" else "float32")
    kind = device.device_kind.upper()
    for name, table in PEAK_TFLOPS.items():
        if name in kind:
            return table[dtype] * 1e12 if dtype in table else None
    return None


def mfu(tokens_per_sec: float, cfg: ModelConfig, seq_len: int, n_devices: int = 1,
        device: Any = None) -> float | None:
    """Model FLOPs utilisation in [0, 1], or None where the device peak is unknown."""
    peak = device_peak_flops(cfg.dtype, device)
    if not peak:
        return None
    return flops_per_token(cfg, seq_len) * tokens_per_sec / (peak * n_devices)


def usable_cpus() -> int:
    """Logical CPUs this process may run on (its affinity mask; XLA:CPU sizes its pool to it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def cpu_description(threads: str = "", cpuinfo: str | Path = "/proc/cpuinfo",
                    tuning: dict[str, Any] | None = None) -> str:
    """One line naming the host CPU, for the header of a benchmark table: the model name, which
    of CPU_ISA_FLAGS it has, its logical CPUs and physical cores (and how many this process may
    use), `threads`, the caller's account of the threads it ran (e.g. "XLA 2, torch 2"), and the
    XLA:CPU flags nanojax chose for it (`tuning`, default this process's `xla_tuning()`).

    e.g. "Intel(R) Xeon(R) Processor; avx2 avx512f amx_tile; 2 logical CPUs (2 cores), 2 usable;
    threads XLA 2; XLA tuning intel-avx512: added --xla_cpu_...; user XLA_FLAGS: (none)".
    Reads `cpuinfo` (Linux); without one, the model is platform.processor() and the flags unknown.
    """
    info = read_cpuinfo(cpuinfo)
    model = info.model or platform.processor() or platform.machine() or "unknown CPU"
    if info.flags is None:
        isa = "ISA flags unknown"
    else:
        isa = " ".join(f for f in CPU_ISA_FLAGS if f in info.flags) or f"none of {', '.join(CPU_ISA_FLAGS)}"
    cores = f" ({info.cores} core{'s' if info.cores > 1 else ''})" if info.cores else ""
    out = f"{model}; {isa}; {os.cpu_count()} logical CPUs{cores}, {usable_cpus()} usable"
    out += f"; threads {threads}" if threads else ""
    return out + "; " + describe_tuning(xla_tuning() if tuning is None else tuning)


def run_header() -> dict[str, Any]:
    """What a metrics.jsonl header line records about the process that trains: jax version,
    devices, the host CPU (cpu_description) and the XLA:CPU flags nanojax chose (xla_tuning()).
    Written once per (re)start, so a run resumed on another machine shows both."""
    device = jax.devices()[0]
    return {"jax": jax.__version__, "platform": device.platform, "device_kind": device.device_kind,
            "devices": jax.device_count(), "processes": jax.process_count(),
            "cpu": cpu_description(), "xla_tuning": xla_tuning()}


def memory_stats(device: Any = None) -> dict[str, float]:
    """Device memory in use and its peak, in GiB, where the backend reports them (GPUs do;
    XLA:CPU reports nothing, so this is empty there)."""
    device = device or jax.local_devices()[0]
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if not stats:
        return {}
    out = {}
    for key, name in (("bytes_in_use", "mem_in_use_gib"), ("peak_bytes_in_use", "mem_peak_gib")):
        if key in stats:
            out[name] = stats[key] / 2**30
    return out


class MetricsWriter:
    """Appends one JSON object per line to workdir/metrics.jsonl."""

    def __init__(self, path: str | Path, resume_step: int = 0):
        self.path = Path(path)
        if self.path.exists():
            self._truncate_after(resume_step)

    def _truncate_after(self, step: int) -> None:
        # Lines past the restored step came from a run that died before its next checkpoint;
        # the resumed run recomputes those steps, so drop them to keep one line per step. The
        # rewrite is atomic: a kill during it must not lose the history before `step`.
        text = self.path.read_text()
        kept = []
        for line in text.splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except json.JSONDecodeError:  # a line cut short by a crash
                continue
        new = "".join(k + "\n" for k in kept)
        if new != text:
            write_atomic(self.path, new)

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


# ----------------------------------------------------------------------------------------------
# Where the time went: a jax.profiler trace (--config.profile=START:END) summarised by XLA op.

@dataclasses.dataclass(frozen=True)
class OpTime:
    name: str  # an HLO op kind (`dot`, `loop_add_fusion`, ...) or, with by_kind=False, one op;
    #            by kind, a custom call whose target is known is named by it (the kernel it ran)
    module: str  # the executable it belongs to, e.g. `jit_step_fn`
    seconds: float  # summed over the trace, across all threads / streams that ran it
    count: int
    target: str = ""  # a custom call's custom_call_target (e.g. `nanojax_causal_attention_fwd`)


HLO_SUFFIX = ".hlo.txt"  # `<module>.hlo.txt` beside a trace: its executable's HLO (save_hlo_text)
_CUSTOM_CALL = re.compile(r'^\s*(?:ROOT\s+)?%([\w.-]+) = .*\bcustom-call\(.*custom_call_target="([^"]+)"')


def _module_name(line: str) -> str:
    """`jit_step_fn` of HLO text's `HloModule jit_step_fn, entry_computation_layout=...` line."""
    return line.split()[1].rstrip(",")


def custom_call_targets(hlo_text: str) -> dict[tuple[str, str], str]:
    """(module, instruction) -> custom_call_target for every custom call in HLO text as
    `jax.stages.Compiled.as_text()` prints it: which kernel a trace's `ffi_call.386` ran, where the
    trace itself only names the instruction."""
    out: dict[tuple[str, str], str] = {}
    module = "?"
    for line in hlo_text.splitlines():
        if line.startswith("HloModule "):
            module = _module_name(line)
        elif "custom_call_target=" in line and (m := _CUSTOM_CALL.match(line)):
            out[module, m.group(1)] = m.group(2)
    return out


def save_hlo_text(trace_dir: str | Path, compiled: Any) -> Path:
    """Writes a compiled executable's HLO text into `trace_dir` as `<module>.hlo.txt`, where
    trace_op_times reads it to name the custom calls of the trace by their targets.
    compiled: `jitted.lower(*args).compile()` of the function the trace runs."""
    text = compiled.as_text()
    module = next((_module_name(ln) for ln in text.splitlines() if ln.startswith("HloModule ")), "module")
    path = Path(trace_dir) / f"{module}{HLO_SUFFIX}"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, text)
    return path


def trace_op_times(trace_dir: str | Path, by_kind: bool = True) -> tuple[list[OpTime], int]:
    """XLA op times from the newest trace under `trace_dir`, longest first, and how many train
    steps (outermost `step_fn` dispatches) the trace holds.

    An op is a trace event that XLA tagged with its HLO op and module: on GPU/TPU the device's
    "XLA Ops" line, on CPU the thunks of XLA:CPU's threads. by_kind folds `dot.12`, `dot.40` ...
    into `dot`; control ops (while, call, conditional) are left out, their bodies are counted.
    Custom calls (`ffi_call.N`, `custom-call.N`) carry their targets where a `*.hlo.txt` of their
    executable lies under `trace_dir` (save_hlo_text; train() and bench_train.py write one), and by
    kind are folded by target: the attention kernel's time apart from the gemm kernel's."""
    files = sorted(Path(trace_dir).glob("**/*.xplane.pb"), key=lambda p: p.stat().st_mtime)
    if not files:
        raise FileNotFoundError(f"no *.xplane.pb under {trace_dir}: was it written with "
                                "--config.profile=START:END, and did the run reach END?")
    targets: dict[tuple[str, str], str] = {}
    for hlo in Path(trace_dir).glob(f"**/*{HLO_SUFFIX}"):
        targets.update(custom_call_targets(hlo.read_text()))
    pd = jax.profiler.ProfileData.from_file(str(files[-1]))
    seconds: dict[tuple[str, str], float] = {}
    counts: dict[tuple[str, str], int] = {}
    named: dict[tuple[str, str], str] = {}
    steps: list[tuple[float, float]] = []
    for plane in pd.planes:
        on_device = plane.name.startswith("/device:")
        for line in plane.lines:
            if on_device and line.name != "XLA Ops":
                continue
            for ev in line.events:
                if ev.name == "PjitFunction(step_fn)":
                    steps.append((ev.start_ns, ev.start_ns + ev.duration_ns))
                    continue
                stats = dict(ev.stats)
                op, module = stats.get("hlo_op"), stats.get("hlo_module")
                if on_device:  # every event on a device's op line is an op, tagged or not
                    op, module = op or ev.name, module or "?"
                if not op or not module:
                    continue
                kind = re.sub(r"\.\d+$", "", str(op))
                if kind in ("while", "call", "conditional"):
                    continue
                target = targets.get((str(module), str(op)), "")
                key = (target or kind if by_kind else str(op), str(module))
                seconds[key] = seconds.get(key, 0.0) + ev.duration_ns * 1e-9
                counts[key] = counts.get(key, 0) + 1
                named[key] = target
    n_steps, end = 0, float("-inf")
    for start, stop in sorted(steps):  # a dispatch is recorded as nested events
        if start >= end:
            n_steps, end = n_steps + 1, stop
    ops = [OpTime(name, module, seconds[name, module], counts[name, module], named[name, module])
           for name, module in seconds]
    return sorted(ops, key=lambda o: -o.seconds), n_steps
