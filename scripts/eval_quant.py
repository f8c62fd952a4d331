"""Quality of quantized inference on a trained workdir: whole-split val loss, KL to fp32, bytes.

    python scripts/eval_quant.py --workdir=out/sc_cpu                       # int8, int4 g32/64/128
    python scripts/eval_quant.py --workdir=out/sc_cpu --schemes=int8,int4:32 --out=quality.json

Prints a markdown table (docs/quantization.md holds one); the float row is the run's
whole-split val loss.
"""

import json
import sys
from pathlib import Path

from absl import flags

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import nanojax as nj  # noqa: E402
from nanojax import cli  # noqa: E402
from nanojax.data import load_split  # noqa: E402
from nanojax.quant.quality import format_table, quality_report  # noqa: E402

flags.DEFINE_string("workdir", None, "A training workdir.", required=True)
flags.DEFINE_string("data_dir", None, "Data dir (default: the one in the workdir's config.json).")
flags.DEFINE_string("split", "val", "Which split to score.")
flags.DEFINE_list("schemes", ["int8", "int4:32", "int4:64", "int4:128"], "scheme[:group_size], ...")
flags.DEFINE_integer("batch_size", 64, "Windows per forward call.")
flags.DEFINE_string("out", None, "Also write the rows as JSON here.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    cfg, params, _ = nj.load_checkpoint(FLAGS.workdir)
    data_dir = FLAGS.data_dir or json.loads((Path(FLAGS.workdir) / "config.json").read_text())["train"][
        "data_dir"]
    tokens = load_split(data_dir, FLAGS.split, cfg.max_seq_len, cfg.vocab_size)
    schemes = []
    for s in FLAGS.schemes:
        name, _, group = s.partition(":")
        schemes.append((name, int(group) if group else None))
    rows = quality_report(params, cfg, tokens, schemes, FLAGS.batch_size)
    print(format_table(rows))
    if FLAGS.out:
        Path(FLAGS.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    cli.run(main)
