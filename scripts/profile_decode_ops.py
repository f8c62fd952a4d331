"""Where one `nj.generate` decode step's time goes, per HLO op and per source-level category.

    python scripts/profile_decode_ops.py --preset=llama-134m                  # greedy, batch 1
    python scripts/profile_decode_ops.py --preset=llama-134m --n_layer=2 --by_op
    python scripts/profile_decode_ops.py --quant=int4 --kernel_activations=int8   # nj.quantize'd

Random weights, prompt 16 + 128 new tokens. Two calls run under jax.profiler after a warm-up; for
each decode op the median time of one call times its calls per step is reported (medians: on a
shared machine single calls get preempted for 50-100 us). Ops are named from the compiled HLO
(XLA_FLAGS=--xla_dump_to is set here, before jax starts) and grouped: the matmuls, the attention
dots, the greedy argmax, RoPE + the K cache write, the V cache write, q's RoPE and the rest.
docs/performance/decode.md ("Decode: the non-matmul ops") has a table made with it.
"""

import os
import re
import statistics
import sys
import tempfile
from pathlib import Path

from absl import app, flags

flags.DEFINE_string("preset", "llama-134m", "ModelConfig preset.")
flags.DEFINE_integer("n_layer", 0, "Override the preset's layer count (0: keep it).")
flags.DEFINE_integer("batch", 1, "Prompts per call.")
flags.DEFINE_integer("new_tokens", 128, "New tokens per prompt.")
flags.DEFINE_float("temperature", 0.0, "0 is greedy.")
flags.DEFINE_enum("quant", "fp32", ["fp32", "int8", "int4"], "Weights: fp32, or nj.quantize(scheme).")
flags.DEFINE_integer("group_size", 32, "int4 group size (int8 is per channel).")
flags.DEFINE_enum("kernel_activations", "fp32", ["fp32", "int8"], "nj.quantize's kernel_activations.")
flags.DEFINE_bool("by_op", False, "Also print every non-matmul op (name, median, source op).")
FLAGS = flags.FLAGS


def _categorize(op: str, hlo: str, comps: dict[str, str]) -> str:
    m = re.search(r"%" + re.escape(op) + r" = (.*)", hlo)
    line = m.group(1) if m else ""
    called = re.search(r"calls=%([\w.-]+)", line)
    body = comps.get(called.group(1), "") if called else ""
    meta = re.search(r'op_name="([^"]*)"', line)
    meta = meta.group(1) if meta else ""
    if "custom_call_target" in line:  # the CPU kernels: decode attention, or a matmul
        return "attention dots" if "attention" in line else "matmuls"
    if op.startswith("dot"):
        return "attention dots" if "batch_dims" in line else "matmuls"
    if re.search(r"reduce(_max|_min)?$", meta) and re.search(r"\[\d+,\d{4,}\]", line + body):
        return "argmax over the vocabulary"
    if "dynamic-update-slice" in body:
        return "K: RoPE + cache write" if "concatenate" in body else "V / other: cache write"
    if "concatenate" in body:
        return "q: RoPE"
    if "pad" in op:
        return "window growth (pad)"
    return "other (norms, softmax, adds, ...)"


def main(argv):
    del argv
    dump = tempfile.mkdtemp(prefix="nanojax_decode_hlo_")
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_dump_to={dump} --xla_dump_hlo_module_re=.*decode_loop.*").strip()
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import jax
    import numpy as np

    import nanojax as nj

    over = {"n_layer": FLAGS.n_layer} if FLAGS.n_layer else {}
    cfg = nj.ModelConfig.preset(FLAGS.preset, **over)
    params = nj.init_params(cfg, jax.random.key(0))
    if FLAGS.quant != "fp32":
        params = nj.quantize(params, cfg, FLAGS.quant, FLAGS.group_size if FLAGS.quant == "int4" else None,
                             kernel_activations=FLAGS.kernel_activations)
    prompts = np.random.default_rng(0).integers(0, cfg.vocab_size, (FLAGS.batch, 16)).tolist()
    kw = dict(max_new_tokens=FLAGS.new_tokens, temperature=FLAGS.temperature)
    nj.generate(params, cfg, prompts, **kw)  # compile
    trace = tempfile.mkdtemp(prefix="nanojax_decode_trace_")
    jax.profiler.start_trace(trace)
    for _ in range(2):
        nj.generate(params, cfg, prompts, **kw)
    jax.profiler.stop_trace()

    durs: dict[str, list[int]] = {}
    pd = jax.profiler.ProfileData.from_file(str(sorted(Path(trace).glob("**/*.xplane.pb"))[-1]))
    for plane in pd.planes:
        for line in plane.lines:
            for ev in line.events:
                st = dict(ev.stats)
                op, module = st.get("hlo_op"), st.get("hlo_module")
                if op and module and "decode" in str(module) and \
                        re.sub(r"\.\d+$", "", str(op)) not in ("while", "call", "conditional"):
                    durs.setdefault(str(op), []).append(ev.duration_ns)
    # The largest window's module names the ops (the smaller windows compile the same program).
    hlo = Path(sorted(Path(dump).glob("*decode_loop*cpu_after_optimizations.txt"))[-1]).read_text()
    comps = {m.group(1): m.group(2) for m in re.finditer(r"^%([\w.-]+) .*?\{\n(.*?)^\}", hlo, re.M | re.S)}
    steps = 2 * (FLAGS.new_tokens - 1)
    cats: dict[str, list[float]] = {}
    rows = []
    for op, d in durs.items():
        per_step, median_us = len(d) / steps, statistics.median(d) / 1e3
        c = cats.setdefault(_categorize(op, hlo, comps), [0.0, 0.0])
        c[0] += per_step
        c[1] += per_step * median_us
        rows.append((per_step * median_us, op, per_step, median_us))
    print(f"{cfg.n_layer} layers, d_model {cfg.d_model}, vocab {cfg.vocab_size}, batch {FLAGS.batch}, "
          f"weights {FLAGS.quant} (kernel activations {FLAGS.kernel_activations}), "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"{'category':36s} {'ops/step':>9s} {'us/step':>9s}")
    for name, (n, us) in sorted(cats.items(), key=lambda kv: -kv[1][1]):
        print(f"{name:36s} {n:9.1f} {us:9.1f}")
    rest = sum(us for name, (_, us) in cats.items() if name not in ("matmuls", "attention dots"))
    print(f"{'all but the matmuls and attention':36s} {'':9s} {rest:9.1f}")
    if FLAGS.by_op:
        for _us, op, n, med in sorted(rows, reverse=True):
            if not op.startswith("dot") and not op.startswith("custom-call"):
                src = re.search(r"%" + re.escape(op) + r" = .*?op_name=\"([^\"]*)\"", hlo)
                print(f"  {op:45s} {n:4.1f}/step median {med:7.1f} us  "
                      f"{src.group(1).split('/')[-1] if src else ''}")


if __name__ == "__main__":
    app.run(main)
