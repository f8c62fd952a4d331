"""Quantize a trained workdir or an HF model directory into a quantized model directory.

    python scripts/quantize.py --workdir=out/sc_cpu --scheme=int8 --out=out/sc_cpu_int8
    python scripts/quantize.py --hf_dir=path/to/llama --scheme=int4 --group_size=32 --out=out/llama_q4
    python scripts/sample.py --workdir=out/sc_cpu_int8 --prompt="ROMEO:"

The output holds model.safetensors, quant.json and the tokenizer (nanojax/quant/io.py): safe
formats only, no pickle; nj.load_quantized(out) restores the same records.
"""

import sys
from pathlib import Path

from absl import app, flags

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import nanojax as nj  # noqa: E402
from nanojax import cli  # noqa: E402
from nanojax.quant import save_quantized, weight_bytes  # noqa: E402

flags.DEFINE_string("workdir", None, "A training workdir (or use --hf_dir).")
flags.DEFINE_string("hf_dir", None, "A Hugging Face model dir (config.json, safetensors, tokenizer.json).")
flags.DEFINE_enum("scheme", "int8", ["int8", "int4"], "int8 (per output channel) or int4 (group-wise).")
flags.DEFINE_integer("group_size", None, "Inputs per scale (int4: 32, 64 or 128; default 32; int8: "
                     "default one scale per output channel).")
flags.DEFINE_boolean("embeddings", True, "Also hold the embedding tables and the head in int8.")
flags.DEFINE_enum("kernel_activations", "fp32", ["fp32", "int8"],
                  "x inside the quantized CPU kernels: fp32 (exact), or int8 per 32-block on a VNNI CPU "
                  "(llama.cpp's Q8_0 scheme: faster, docs/quantization.md).")
flags.DEFINE_string("out", None, "Output directory.", required=True)
FLAGS = flags.FLAGS


def main(argv):
    del argv
    if bool(FLAGS.workdir) == bool(FLAGS.hf_dir):
        raise app.UsageError("pass exactly one of --workdir or --hf_dir")
    if FLAGS.workdir:
        cfg, params, tok = nj.load_checkpoint(FLAGS.workdir)
    else:
        from nanojax.tokenizer import load_tokenizer

        cfg, params = nj.load_hf(FLAGS.hf_dir)
        try:
            tok = load_tokenizer(FLAGS.hf_dir)
        except FileNotFoundError:
            tok = None
    q = nj.quantize(params, cfg, FLAGS.scheme, FLAGS.group_size, embeddings=FLAGS.embeddings,
                    kernel_activations=FLAGS.kernel_activations)
    out = save_quantized(q, cfg, FLAGS.out, tokenizer=tok)
    before, after = weight_bytes(params), weight_bytes(q)
    print(f"{out}: {FLAGS.scheme} weights {after:,} bytes ({after / before:.3f}x of {before:,})")


if __name__ == "__main__":
    cli.run(main)
