"""Train (or resume) a model.

    python scripts/train.py --config=configs/shakespeare_char_cpu.py --workdir=out/shakespeare_char_cpu
    python scripts/train.py --config=configs/shakespeare_char.py --workdir=out/sc --config.batch_size=32

Rerunning the same command resumes from the latest checkpoint in the workdir.
"""

import sys
from pathlib import Path

from absl import app, flags, logging
from ml_collections import config_flags

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import nanojax  # noqa: E402,F401  (tunes malloc before JAX allocates)
from nanojax.train import NonFiniteLossError, WorkdirMismatchError, train  # noqa: E402

config_flags.DEFINE_config_file("config", None, "A configs/*.py file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Run directory: checkpoints, config.json, metrics.jsonl.")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def main(argv):
    del argv
    if FLAGS.verbosity <= 0:
        logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO; --v=1 brings it back
    try:
        summary = train(FLAGS.config, FLAGS.workdir)
    except (NonFiniteLossError, WorkdirMismatchError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if summary["interrupted"]:
        print(f"interrupted: checkpoint saved at step {summary['step']}; rerun the same command to resume.")
        return 128 + summary["interrupted"]
    val = summary.get("val_loss")
    print(f"done: step {summary['step']}, train loss {summary['train_loss']:.4f}"
          + (f", val loss {val:.4f}" if val is not None else ""))
    return 0


if __name__ == "__main__":
    app.run(main)
