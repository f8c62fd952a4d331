"""Quality of quantized inference on a trained workdir: whole-split val loss, KL to fp32, bytes.

    python scripts/eval_quant.py --workdir=out/sc_cpu                       # int8, int4 g32/64/128
    python scripts/eval_quant.py --workdir=out/sc_cpu --schemes=int8,int4:32 --out=quality.json
    python scripts/eval_quant.py --workdir=out/sc_cpu --agreement=64   # + greedy agreement at batch 1

Prints a markdown table (docs/quantization.md holds one); the float row is the run's
whole-split val loss. The loss is scored on 64-token windows, past the CPU kernels' KERNEL_MAX_ROWS,
so it runs the exact pure-JAX path. --agreement=N adds greedy decodes at batch 1, where every
product goes through the kernels: N prompts of --prompt_len tokens from the split, --new_tokens
each, per scheme with exact and int8 kernel activations, against the float model's tokens.
"""

import json
import sys
from pathlib import Path

import numpy as np
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
flags.DEFINE_integer("agreement", 0, "Greedy-agreement prompts (0: none).")
flags.DEFINE_integer("prompt_len", 16, "Tokens per agreement prompt.")
flags.DEFINE_integer("new_tokens", 48, "Greedy tokens per agreement prompt.")
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
    if FLAGS.agreement:
        print()
        print(agreement_table(params, cfg, np.asarray(tokens).reshape(-1), schemes))


def agreement_table(params, cfg, split, schemes) -> str:
    """Greedy tokens of each quantized model (both kernel activation modes) against the float one's."""
    rng = np.random.default_rng(0)
    starts = rng.integers(0, split.size - FLAGS.prompt_len, FLAGS.agreement)
    prompts = [split[s:s + FLAGS.prompt_len].tolist() for s in starts]
    n = FLAGS.new_tokens

    def decode(p):
        return [np.asarray(nj.generate(p, cfg, [x], max_new_tokens=n)[0]) for x in prompts]

    ref = decode(params)
    lines = [f"Greedy agreement with float32, {len(prompts)} prompts of {FLAGS.prompt_len} tokens, {n} new "
             "tokens each, batch 1", "| scheme | group | kernel x | tokens equal | first difference at |",
             "|---|---|---|---:|---:|"]
    for scheme, group in schemes:
        for act in ("fp32", "int8"):
            outs = decode(nj.quantize(params, cfg, scheme, group, kernel_activations=act))
            equal = np.mean([np.mean(a == b) for a, b in zip(outs, ref, strict=True)])
            first = np.mean([np.argmax(a != b) if np.any(a != b) else n
                             for a, b in zip(outs, ref, strict=True)])
            g = "channel" if group is None and scheme == "int8" else group
            lines.append(f"| {scheme} | {g} | {act} | {equal:.3f} | {first:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    cli.run(main)
