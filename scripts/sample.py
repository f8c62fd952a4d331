"""Sample from a trained workdir.

    python scripts/sample.py --workdir=out/shakespeare_char_cpu --prompt="ROMEO:" --max_new_tokens=500
"""

import sys
from pathlib import Path

from absl import app, flags

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import nanojax as nj  # noqa: E402

flags.DEFINE_string("workdir", None, "A training workdir.", required=True)
flags.DEFINE_string("prompt", "\n", "Text to continue.")
flags.DEFINE_integer("max_new_tokens", 500, "Tokens to generate.")
flags.DEFINE_float("temperature", 0.8, "0 is greedy.")
flags.DEFINE_integer("top_k", 200, "Sample from the k most likely tokens (0: all).")
flags.DEFINE_integer("seed", 0, "Sampling seed.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    cfg, params, tok = nj.load_checkpoint(FLAGS.workdir)
    ids = tok.encode(FLAGS.prompt)
    budget = min(FLAGS.max_new_tokens, cfg.max_seq_len - len(ids))
    out = nj.generate(params, cfg, [ids], max_new_tokens=budget, temperature=FLAGS.temperature,
                      top_k=FLAGS.top_k or None, seed=FLAGS.seed)[0]
    print(FLAGS.prompt + tok.decode(out))


if __name__ == "__main__":
    app.run(main)
