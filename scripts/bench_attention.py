"""Attention throughput and memory: nanojax's Pallas FlashAttention vs the XLA path vs cuDNN.

    python scripts/bench_attention.py                                   # CPU defaults (see below)
    python scripts/bench_attention.py --seq_lens=512,1024,2048,4096,8192,16384 --dtype=bfloat16 \\
        --heads=16 --head_dim=128 --tokens=16384                        # a GPU (scripts/bench_gpu.sh)

For every sequence length T (batch = --tokens // T, so each row of the table does the same
number of tokens) and every implementation, causal self-attention is timed forward only and
forward + backward (the vjp of a random upstream gradient), median of --repeats calls after a
warm-up. Columns:
- ms: median wall time of one call.
- TFLOP/s: useful FLOPs / time. Useful FLOPs count only the causal half that a query may see
  (T (T + 1) / 2 query-key pairs), 2 matmuls forward (QK^T, PV) and 5 backward, 2 FLOPs per
  multiply-add: forward 4 B N H pairs, backward 2.5x that. No credit for recomputation (the
  FlashAttention backward recomputes P), nor for masked-off work an implementation still does.
- temp MiB: XLA's `memory_analysis()` of the compiled call: scratch beyond its inputs and
  outputs. The XLA path holds (T, T) scores per head, so it grows as T^2; the kernels' stays
  linear in T.
Implementations: "xla" (nanojax.attention's portable path), "pallas" (nanojax.kernels), "cudnn"
(`jax.nn.dot_product_attention(implementation="cudnn")`, NVIDIA GPUs only; skipped elsewhere), "cpu"
(nanojax.kernels.cpu_attention, the fp32 C++ kernel; AVX-512 CPUs only). The CPU training shapes
(docs/performance/training.md) side by side:
    python scripts/bench_attention.py --impls=xla,cpu --seq_lens=64 --tokens=768 --heads=4 --head_dim=32 \
        --repeats=50                                                    # quickstart: B 12, T 64
    python scripts/bench_attention.py --impls=xla,cpu --seq_lens=256 --tokens=512 --heads=12 \
        --head_dim=64 --repeats=20                                      # GPT-2 124M: B 2, T 256
On CPU the Pallas kernels run in interpret mode, a correctness tool that is not meant to be
fast: they are timed only up to --pallas_cpu_max_len, and the table says so.
"""

import datetime
import statistics
import sys
import time
from pathlib import Path

from absl import app, flags

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from nanojax.attention import _cudnn_available, attention  # noqa: E402
from nanojax.kernels import backend, cpu_attention  # noqa: E402
from nanojax.metrics import cpu_description, usable_cpus  # noqa: E402

flags.DEFINE_list("seq_lens", None, "Sequence lengths (default: 512..16384 on a GPU, 512..2048 on CPU).")
flags.DEFINE_list("impls", ["xla", "pallas", "cudnn"], "Any of xla, pallas, cudnn, cpu.")
flags.DEFINE_integer("tokens", 0, "Batch x T per call (0: 16384 on a GPU, 2048 on CPU).")
flags.DEFINE_integer("heads", 0, "Query heads N (0: 16 on a GPU, 4 on CPU).")
flags.DEFINE_integer("kv_heads", 0, "Key/value heads K (0: N, plain multi-head).")
flags.DEFINE_integer("head_dim", 0, "H (0: 128 on a GPU, 64 on CPU).")
flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "Compute dtype (default: bf16 GPU, fp32 CPU).")
flags.DEFINE_integer("repeats", 0, "Timed calls per cell (0: 10 on a GPU, 3 on CPU).")
flags.DEFINE_integer("pallas_cpu_max_len", 1024, "On CPU, time the interpreted kernels only up to this T.")
FLAGS = flags.FLAGS


def useful_flops(B: int, T: int, N: int, H: int, backward: bool) -> float:
    """Causal attention FLOPs a query may use (module docstring): forward 4 B N H T(T+1)/2;
    forward + backward 3.5x that (the backward's 5 matmuls against the forward's 2)."""
    fwd = 4.0 * B * N * H * T * (T + 1) / 2
    return fwd * 3.5 if backward else fwd


def _fn(impl: str):
    if impl == "cudnn":
        return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
    if impl == "cpu":
        return cpu_attention.causal_attention
    return lambda q, k, v: attention(q, k, v, impl=impl)


def measure(impl: str, B: int, T: int, N: int, K: int, H: int, dtype, backward: bool,
            repeats: int) -> dict:
    """Times one cell: {"ms", "tflops", "temp_mib"} (median of `repeats` calls after a warm-up)."""
    ks = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(ks[0], (B, T, N, H), dtype)
    k = jax.random.normal(ks[1], (B, T, K, H), dtype)
    v = jax.random.normal(ks[2], (B, T, K, H), dtype)
    do = jax.random.normal(ks[3], (B, T, N, H), dtype)
    f = _fn(impl)
    if backward:
        call = jax.jit(lambda q, k, v, do: jax.vjp(f, q, k, v)[1](do))
        args = (q, k, v, do)
    else:
        call = jax.jit(f)
        args = (q, k, v)
    compiled = call.lower(*args).compile()
    mem = compiled.memory_analysis()
    temp = getattr(mem, "temp_size_in_bytes", None) if mem is not None else None
    jax.block_until_ready(compiled(*args))  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t0)
    sec = statistics.median(times)
    return {"ms": sec * 1e3, "tflops": useful_flops(B, T, N, H, backward) / sec / 1e12,
            "temp_mib": None if temp is None else temp / 2**20}


def device_line() -> str:
    dev = jax.devices()[0]
    if dev.platform == "cpu":
        where = cpu_description(f"XLA {usable_cpus()}")
    else:
        where = f"{dev.device_kind} ({dev.platform}, {getattr(dev.client, 'platform_version', '')})"
    return f"{where}; jax {jax.__version__}; {datetime.date.today().isoformat()}"


def run(seq_lens: list[int], impls: list[str], tokens: int, N: int, K: int, H: int, dtype,
        repeats: int, pallas_cpu_max_len: int) -> list[str]:
    """The table's lines (markdown); each cell 'ms / TFLOP/s / temp MiB', or why it is empty."""
    on_cpu = backend.interpret_default()
    lines = [f"device: {device_line()}",
             f"shape: batch = {tokens} // T, heads {N} (kv {K}), head_dim {H}, "
             f"{jnp.dtype(dtype).name}, causal",
             "cells: ms / useful TFLOP/s / temp MiB (compiled scratch)", ""]
    if on_cpu and "pallas" in impls:
        lines.insert(3, f"note: on CPU 'pallas' runs in Pallas interpret mode (a correctness tool, not a "
                        f"fast path), timed only up to T = {pallas_cpu_max_len}")
    header = "| T | pass | " + " | ".join(impls) + " |"
    lines += [header, "|" + "---|" * (2 + len(impls))]
    for T in seq_lens:
        B = max(1, tokens // T)
        for backward in (False, True):
            cells = []
            for impl in impls:
                if impl == "cudnn" and not (_cudnn_available() and jnp.dtype(dtype).itemsize == 2):
                    cells.append("n/a (NVIDIA GPU, bf16/fp16 only)")
                    continue
                if impl == "cpu" and not (cpu_attention.available(H) and jnp.dtype(dtype) == jnp.float32):
                    cells.append("n/a (fp32 on an AVX-512 CPU, H % 16 == 0, only)")
                    continue
                if impl == "pallas" and on_cpu and T > pallas_cpu_max_len:
                    cells.append("skipped (interpret mode)")
                    continue
                try:
                    r = measure(impl, B, T, N, K, H, dtype, backward, repeats)
                except Exception as e:  # one failing cell (e.g. out of memory) keeps the table going
                    cells.append(f"failed: {type(e).__name__}: {str(e).splitlines()[0][:80]}")
                    continue
                temp = "?" if r["temp_mib"] is None else f"{r['temp_mib']:.1f}"
                cells.append(f"{r['ms']:.2f} / {r['tflops']:.3g} / {temp}")
            row = f"| {T} | {'fwd+bwd' if backward else 'fwd'} | " + " | ".join(cells) + " |"
            lines.append(row)
            print(row, flush=True)
    return lines


def main(argv):
    del argv
    gpu = not backend.interpret_default()
    seq_lens = [int(t) for t in (FLAGS.seq_lens or ([512, 1024, 2048, 4096, 8192, 16384] if gpu
                                                    else [512, 1024, 2048]))]
    bad = [i for i in FLAGS.impls if i not in ("xla", "pallas", "cudnn", "cpu")]
    if bad:
        raise app.UsageError(f"--impls: unknown {bad}; expected any of xla, pallas, cudnn, cpu")
    N = FLAGS.heads or (16 if gpu else 4)
    K = FLAGS.kv_heads or N
    if N % K:
        raise app.UsageError(f"--kv_heads={K} must divide --heads={N}")
    dtype = jnp.dtype(FLAGS.dtype or ("bfloat16" if gpu else "float32"))
    lines = run(seq_lens, FLAGS.impls, FLAGS.tokens or (16384 if gpu else 2048), N, K,
                FLAGS.head_dim or (128 if gpu else 64), dtype, FLAGS.repeats or (10 if gpu else 3),
                FLAGS.pallas_cpu_max_len)
    print("\n".join(lines))


if __name__ == "__main__":
    app.run(main)
