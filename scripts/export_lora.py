"""Export a LoRA fine-tuning workdir: the adapter in PEFT's format, and/or the merged model.

    python scripts/export_lora.py --workdir=out/lora_run --out_dir=out/peft_adapter
    python scripts/export_lora.py --workdir=out/lora_run --merged_hf_dir=out/merged_hf

--out_dir gets adapter_config.json + adapter_model.safetensors (PeftModel.from_pretrained(base,
out_dir) loads it over the base saved with scripts/convert.py --out_hf_dir). --merged_hf_dir gets
the base with the adapter folded in (W + s A B), a plain HF model. Outputs must be new or empty
unless --overwrite.
"""

import sys
from pathlib import Path

from absl import app, flags, logging

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import nanojax as nj  # noqa: E402
from nanojax import cli  # noqa: E402
from nanojax.train.lora_run import load_lora_workdir  # noqa: E402

flags.DEFINE_string("workdir", None, "A LoRA fine-tuning workdir.", required=True)
flags.DEFINE_string("out_dir", None, "Write the adapter here in PEFT's format.")
flags.DEFINE_string("merged_hf_dir", None, "Write the merged model here as a Hugging Face directory.")
flags.DEFINE_bool("overwrite", False, "Replace an output directory that is not empty.")
FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; every option is a --flag")
    if FLAGS.verbosity <= 0:
        logging.set_verbosity(logging.WARNING)
    if not FLAGS.out_dir and not FLAGS.merged_hf_dir:
        raise app.UsageError("pass --out_dir (PEFT adapter) and/or --merged_hf_dir (merged HF model)")
    cfg, base, adapter, tok = load_lora_workdir(FLAGS.workdir)
    if FLAGS.out_dir:
        out = nj.save_lora(adapter, cfg, FLAGS.out_dir, overwrite=FLAGS.overwrite)
        print(f"wrote {out} (rank {adapter.rank}, targets {', '.join(adapter.targets)})")
    if FLAGS.merged_hf_dir:
        out = nj.save_hf(nj.merge_lora(base, cfg, adapter), cfg, FLAGS.merged_hf_dir, tokenizer=tok,
                         overwrite=FLAGS.overwrite)
        print(f"wrote {out} (merged)")
    return 0


if __name__ == "__main__":
    cli.run(main)
