"""Convert between Hugging Face model directories and nanojax workdirs (logic: nanojax/interop/hf.py).

    # HF -> nanojax workdir (config.json, tokenizer.json, orbax checkpoint at step 0)
    python scripts/convert.py --hf_dir=path/to/hf_model --workdir=out/imported [--dtype=bfloat16]
    python scripts/sample.py --workdir=out/imported --prompt="ROMEO:"

    # nanojax workdir -> HF (model.safetensors, config.json, tokenizer.json)
    python scripts/convert.py --workdir=out/shakespeare_char_cpu --out_hf_dir=out/hf_export

The directory written (--workdir on import, --out_hf_dir on export) must be new or empty;
--overwrite replaces it whole once the conversion is complete, so nothing of the old one remains.
"""

import sys
from pathlib import Path

from absl import app, flags, logging

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import nanojax  # noqa: E402,F401  (tunes malloc before JAX allocates)
from nanojax import cli  # noqa: E402
from nanojax.interop import hf  # noqa: E402

flags.DEFINE_string("hf_dir", None, "HF model directory to import (config.json + *.safetensors).")
flags.DEFINE_string("workdir", None, "nanojax workdir: written on import, read on export.", required=True)
flags.DEFINE_string("out_hf_dir", None, "Export: the HF directory to write.")
flags.DEFINE_string("dtype", None, "Import: param dtype (float32, bfloat16, float16); default: as saved.")
flags.DEFINE_string("tokenizer", None, "Import: tokenizer.json to use when hf_dir has none.")
flags.DEFINE_integer("step", None, "Export: checkpoint step (default: latest).")
flags.DEFINE_bool("overwrite", False, "Replace the output directory if it is not empty (refused otherwise).")
FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; every option is a --flag")
    if FLAGS.verbosity <= 0:
        logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO; --v=1 brings it back
    if bool(FLAGS.hf_dir) == bool(FLAGS.out_hf_dir):
        raise app.UsageError("pass exactly one of --hf_dir (import into --workdir) or --out_hf_dir "
                             "(export --workdir)")
    if FLAGS.hf_dir:
        out = hf.hf_to_workdir(FLAGS.hf_dir, FLAGS.workdir, dtype=FLAGS.dtype, tokenizer=FLAGS.tokenizer,
                               overwrite=FLAGS.overwrite)
    else:
        out = hf.workdir_to_hf(FLAGS.workdir, FLAGS.out_hf_dir, step=FLAGS.step, overwrite=FLAGS.overwrite)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    cli.run(main, user_errors=(RuntimeError,))  # RuntimeError: a checkpoint that cannot be restored
