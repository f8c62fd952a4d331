"""Where a profiled step's time went, by XLA op, from a trace that training wrote.

    python scripts/train.py --config=configs/shakespeare_char_cpu.py --workdir=out/sc \
        --config.profile=100:105
    python scripts/trace_summary.py --trace_dir=out/sc/profile            # by op kind
    python scripts/trace_summary.py --trace_dir=out/sc/profile --by_op    # every op on its own

Times are summed over everything that ran the op (both CPU worker threads, or the GPU's
streams), so on a multi-threaded CPU the column can add up to more than the wall time. For the
timeline itself, open the trace in xprof / TensorBoard or Perfetto. The C++ kernels' custom calls
(`ffi_call.N` in the trace) are named by their targets (`nanojax_onednn_gemm_bf16`,
`nanojax_causal_attention_bwd`, ...) from the step's compiled HLO, which training writes beside the
trace (profile/jit_step_fn.hlo.txt).
"""

import sys
from pathlib import Path

from absl import app, flags

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nanojax.metrics import trace_op_times  # noqa: E402

flags.DEFINE_string("trace_dir", None, "A workdir's profile/ folder (or any jax.profiler trace).")
flags.DEFINE_integer("top", 25, "Rows to print.")
flags.DEFINE_bool("by_op", False, "One row per HLO op instead of per op kind.")
flags.mark_flags_as_required(["trace_dir"])
FLAGS = flags.FLAGS


def main(argv):
    del argv
    try:
        ops, steps = trace_op_times(FLAGS.trace_dir, by_kind=not FLAGS.by_op)
    except FileNotFoundError as e:
        raise app.UsageError(str(e)) from None
    total = sum(o.seconds for o in ops)
    per = f"ms/step ({steps} steps)" if steps else "ms (whole trace)"
    print(f"{'op' + (' kind' if not FLAGS.by_op else ''):48s} {'executable':22s} {per:>22s} {'share':>7s} "
          f"{'calls':>7s}")
    for o in ops[:FLAGS.top]:
        ms = o.seconds * 1e3 / max(steps, 1)
        name = f"{o.name} ({o.target})" if o.target and o.target != o.name else o.name
        print(f"{name[:48]:48s} {o.module[:22]:22s} {ms:22.3f} {o.seconds / total:7.1%} {o.count:7d}")
    print(f"{'all ops':48s} {'':22s} {total * 1e3 / max(steps, 1):22.3f}")


if __name__ == "__main__":
    app.run(main)
