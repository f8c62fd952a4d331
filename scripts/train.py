"""Train (or resume) a model.

    python scripts/train.py --config=configs/shakespeare_char_cpu.py --workdir=out/shakespeare_char_cpu
    python scripts/train.py --config=configs/shakespeare_char.py --workdir=out/sc --config.batch_size=32

Rerunning the same command resumes from the latest checkpoint in the workdir. The config is
checked as a whole first (nanojax.train.validate_config): every problem is one `error:` line.

Several processes (hosts), each running this same command on its own devices:

    python scripts/train.py ... --coordinator=host0:1234 --num_processes=2 --process_id=0   # host 0
    python scripts/train.py ... --coordinator=host0:1234 --num_processes=2 --process_id=1   # host 1
    python scripts/train.py ... --distributed     # under SLURM / Open MPI: found from the environment

The mesh then spans every process's devices (`--config.mesh.*`); each process loads its own rows
of every batch; all of them write the one checkpoint (the workdir must be on a shared filesystem)
and process 0 writes metrics.jsonl. On CPU the collectives go over gloo. A process waits at most
--init_timeout seconds for the others, printing progress, then says which never joined.
"""

import math
import sys
from pathlib import Path

from absl import app, flags, logging
from ml_collections import config_flags

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import nanojax  # noqa: E402,F401  (tunes malloc before JAX allocates)
from nanojax import cli  # noqa: E402
from nanojax.train import NonFiniteLossError, train  # noqa: E402

config_flags.DEFINE_config_file("config", None, "A configs/*.py file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Run directory: checkpoints, config.json, metrics.jsonl.")
flags.DEFINE_string("coordinator", None, "HOST:PORT of process 0, for a multi-process run.")
flags.DEFINE_integer("num_processes", None, "Processes in a multi-process run (with --coordinator).")
flags.DEFINE_integer("process_id", None, "This process's index, 0..num_processes-1 (with --coordinator).")
flags.DEFINE_bool("distributed", False, "Multi-process run configured from the cluster's environment.")
flags.DEFINE_float("init_timeout", 120.0, "Seconds a multi-process start waits for every process to join.")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def _init_distributed() -> None:
    explicit = (FLAGS.coordinator, FLAGS.num_processes, FLAGS.process_id)
    if not FLAGS.distributed and all(v is None for v in explicit):
        return
    if not FLAGS.distributed and any(v is None for v in explicit):
        raise app.UsageError("a multi-process run needs all of --coordinator, --num_processes and "
                             "--process_id (or --distributed to read them from SLURM / Open MPI)")
    n, i = FLAGS.num_processes, FLAGS.process_id
    if n is not None and (n < 1 or i is None or not 0 <= i < n):
        raise app.UsageError(f"--process_id={i} with --num_processes={n}: need 0 <= process_id < "
                             "num_processes")
    cli.init_distributed(FLAGS.coordinator, n, i, timeout=FLAGS.init_timeout)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; every option is a --flag")
    if FLAGS.verbosity <= 0:
        logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO; --v=1 brings it back
    _init_distributed()
    summary = train(FLAGS.config, FLAGS.workdir)
    if summary["interrupted"]:
        print(f"interrupted: checkpoint saved at step {summary['step']}; rerun the same command to resume.")
        return 128 + summary["interrupted"]
    if math.isnan(summary["train_loss"]):  # resumed at max_steps: no step ran
        print(f"done: the run in {FLAGS.workdir} had already reached step {summary['step']}; raise "
              "--config.max_steps to train on, or pass a new --workdir to start over.")
        return 0
    val, full = summary.get("val_loss"), summary.get("val_loss_full")
    print(f"done: step {summary['step']}, train loss {summary['train_loss']:.4f}"
          + (f", val loss {val:.4f}" if val is not None else "")
          + (f", whole-split val loss {full:.4f}" if full is not None else ""))
    return 0


if __name__ == "__main__":
    cli.run(main, user_errors=(NonFiniteLossError,))
