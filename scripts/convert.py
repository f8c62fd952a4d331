"""Convert between Hugging Face model directories and nanojax workdirs (logic: nanojax/hf.py).

    # HF -> nanojax workdir (config.json, tokenizer.json, orbax checkpoint at step 0)
    python scripts/convert.py --hf_dir=path/to/hf_model --workdir=out/imported [--dtype=bfloat16]
    python scripts/sample.py --workdir=out/imported --prompt="ROMEO:"

    # nanojax workdir -> HF (model.safetensors, config.json, tokenizer.json)
    python scripts/convert.py --workdir=out/shakespeare_char_cpu --out_hf_dir=out/hf_export
"""

import sys
from pathlib import Path

from absl import app, flags

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import nanojax  # noqa: E402,F401  (tunes malloc before JAX allocates)
from nanojax import hf  # noqa: E402

flags.DEFINE_string("hf_dir", None, "HF model directory to import (config.json + *.safetensors).")
flags.DEFINE_string("workdir", None, "nanojax workdir: written on import, read on export.", required=True)
flags.DEFINE_string("out_hf_dir", None, "Export: the HF directory to write.")
flags.DEFINE_string("dtype", None, "Import: param dtype (float32, bfloat16, float16); default: as saved.")
flags.DEFINE_string("tokenizer", None, "Import: tokenizer.json to use when hf_dir has none.")
flags.DEFINE_integer("step", None, "Export: checkpoint step (default: latest).")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    if bool(FLAGS.hf_dir) == bool(FLAGS.out_hf_dir):
        print("error: pass exactly one of --hf_dir (import into --workdir) or --out_hf_dir "
              "(export --workdir)", file=sys.stderr)
        return 2
    try:
        if FLAGS.hf_dir:
            out = hf.hf_to_workdir(FLAGS.hf_dir, FLAGS.workdir, dtype=FLAGS.dtype, tokenizer=FLAGS.tokenizer)
        else:
            out = hf.workdir_to_hf(FLAGS.workdir, FLAGS.out_hf_dir, step=FLAGS.step)
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    app.run(main)
