"""Whole-split validation loss of nanojax workdirs and nanoGPT checkpoints, scored the same way.

    python scripts/eval_whole_split.py --data_dir=data/shakespeare_char --workdir=out/a --workdir=out/b
    python scripts/eval_whole_split.py --data_dir=data/shakespeare_char \
        --nanogpt_dir=/tmp/nanogpt --nanogpt_ckpt=/tmp/out-shakespeare-char/ckpt.pt

Every target of the split (tokens[1:]) is predicted exactly once, from non-overlapping windows of
the model's context length: window r reads tokens[r*T : (r+1)*T] and predicts the same span
shifted by one; the last window may be shorter. The printed number is the mean loss per target
in nats. A nanojax workdir is scored by its own evaluation path (the function train() uses for
metrics.jsonl's `val_loss_full`: data.full_split_batches + the jitted eval-sum step); a nanoGPT
ckpt.pt is loaded into nanoGPT's own `GPT` class (imported from --nanogpt_dir, a checkout that is
not part of nanojax) and scored with torch over windows cut here independently. Before scoring,
the script checks that every model sees the same tokens: nanoGPT's val.bin (next to its
checkpoint's dataset in --nanogpt_dir/data) must equal --data_dir's token for token, and the
number of targets scored must be len(split) - 1 on both sides.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
from absl import flags

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nanojax import cli  # noqa: E402

flags.DEFINE_string("data_dir", None, "nanojax data dir (prepare_data.py) whose split is scored.",
                    required=True)
flags.DEFINE_string("split", "val", "Which split to score: val or train.")
flags.DEFINE_multi_string("workdir", [], "A nanojax training workdir (repeatable).")
flags.DEFINE_multi_string("nanogpt_ckpt", [], "A nanoGPT ckpt.pt (repeatable); needs --nanogpt_dir.")
flags.DEFINE_string("nanogpt_dir", None, "A nanoGPT checkout (github.com/karpathy/nanoGPT): its model.py "
                    "defines the GPT class the checkpoints load into.")
flags.DEFINE_integer("batch_size", 64, "Windows per forward call (any value gives the same loss).")
flags.DEFINE_string("out", None, "Also write {path: {loss, targets, seq_len}} as JSON here.")
FLAGS = flags.FLAGS


def nanojax_whole_split_loss(params, cfg, tokens: np.ndarray, batch_size: int = 64) -> tuple[float, int]:
    """(mean loss in nats, targets scored) over a whole split with nanojax's evaluation path.

    params/cfg: a model (nj.load_checkpoint). tokens: (n,) integer ids. Windows of cfg.max_seq_len
    come from data.full_split_batches and the per-token losses from train.step's eval-sum step,
    the pair train() uses for `val_loss_full`; the sum is kept in float64 on the host."""
    import jax

    from nanojax.data import full_split_batches
    from nanojax.train.step import make_eval_sum_step

    eval_sum = jax.jit(make_eval_sum_step(cfg))
    total, count = 0.0, 0.0
    for x, y, w in full_split_batches(tokens, cfg.max_seq_len, batch_size):
        total += float(eval_sum(params, x, y, w))
        count += float(w.sum())
    return total / count, int(count)


def torch_whole_split_loss(logits_fn: Callable, tokens: np.ndarray, seq_len: int,
                           batch_size: int = 64) -> tuple[float, int]:
    """(mean loss in nats, targets scored) over a whole split for a torch model.

    logits_fn(x, y) -> logits: x and y int64 torch tensors (B, t), t <= seq_len; logits float (B, t, V).
    Windows are cut here with plain slicing (not nanojax's full_split_batches): the full ones in
    batches, then the last, shorter one alone, so no padding or weights are involved."""
    import torch
    import torch.nn.functional as F

    ids = torch.from_numpy(np.asarray(tokens, dtype=np.int64))
    n, T = len(ids), seq_len
    n_full = (n - 1) // T  # windows whose T targets all exist
    total, count = 0.0, 0

    def score(x: torch.Tensor, y: torch.Tensor) -> None:
        nonlocal total, count
        logits = logits_fn(x, y)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).double(), y.reshape(-1), reduction="sum")
        total += float(loss)
        count += y.numel()

    with torch.no_grad():
        for first in range(0, n_full, batch_size):
            rows = range(first, min(first + batch_size, n_full))
            x = torch.stack([ids[r * T:(r + 1) * T] for r in rows])  # (B, T)
            y = torch.stack([ids[r * T + 1:(r + 1) * T + 1] for r in rows])  # (B, T)
            score(x, y)
        if n_full * T < n - 1:  # the remainder: targets n_full*T+1 .. n-1
            score(ids[n_full * T:n - 1][None], ids[n_full * T + 1:n][None])
    return total / count, count


def load_nanogpt(ckpt_path: str | Path, nanogpt_dir: str | Path):
    """(model in eval mode, its checkpoint's config dict) from a nanoGPT ckpt.pt, built with the
    GPT class of the checkout at nanogpt_dir. torch.load(weights_only=True): tensors and plain
    values only, no pickled code."""
    import torch

    model_py = Path(nanogpt_dir) / "model.py"
    if not model_py.exists():
        raise FileNotFoundError(f"--nanogpt_dir={nanogpt_dir}: no model.py there; point it at a checkout of "
                                "github.com/karpathy/nanoGPT.")
    sys.path.insert(0, str(Path(nanogpt_dir).resolve()))
    from model import GPT, GPTConfig  # nanoGPT's own model.py, the outside oracle

    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    model = GPT(GPTConfig(**ckpt["model_args"]))
    # torch.compile'd runs save their weights under "_orig_mod."; nanoGPT's sample.py strips it too.
    state = {k.removeprefix("_orig_mod."): v for k, v in ckpt["model"].items()}
    model.load_state_dict(state)
    model.eval()
    return model, ckpt.get("config", {})


def _nanogpt_logits(model) -> Callable:
    # nanoGPT's forward returns logits for every position only when given targets.
    return lambda x, y: model(x, y)[0]


def main(argv):
    del argv
    from nanojax.data import load_split

    if not FLAGS.workdir and not FLAGS.nanogpt_ckpt:
        cli.fail("nothing to score: give --workdir=DIR and/or --nanogpt_ckpt=FILE (each repeatable).")
    if FLAGS.nanogpt_ckpt and not FLAGS.nanogpt_dir:
        cli.fail("--nanogpt_ckpt needs --nanogpt_dir=PATH, a nanoGPT checkout whose model.py defines GPT.")
    tokens = np.asarray(load_split(FLAGS.data_dir, FLAGS.split, 1))
    print(f"{FLAGS.data_dir} {FLAGS.split}: {len(tokens):,} tokens, {len(tokens) - 1:,} targets")
    results = {}
    for workdir in FLAGS.workdir:
        import nanojax as nj

        cfg, params, _ = nj.load_checkpoint(workdir)
        loss, count = nanojax_whole_split_loss(params, cfg, tokens, FLAGS.batch_size)
        results[workdir] = {"loss": loss, "targets": count, "seq_len": cfg.max_seq_len}
    for path in FLAGS.nanogpt_ckpt:
        model, ck_config = load_nanogpt(path, FLAGS.nanogpt_dir)
        dataset = ck_config.get("dataset", "shakespeare_char")
        theirs = Path(FLAGS.nanogpt_dir) / "data" / dataset / f"{FLAGS.split}.bin"
        if theirs.exists():  # the same text must mean the same ids, token for token
            other = np.fromfile(theirs, dtype=np.uint16)
            if len(other) != len(tokens) or not np.array_equal(other, tokens):
                cli.fail(f"{theirs} ({len(other):,} tokens) differs from {FLAGS.data_dir}'s {FLAGS.split} "
                         f"split ({len(tokens):,}): prepare both from the same text with a sorted-character "
                         "vocab (nanoGPT's prepare.py and scripts/prepare_data.py --tokenizer=char agree).")
        else:
            print(f"warning: {theirs} not found; cannot check nanoGPT trained on these token ids")
        T = model.config.block_size
        loss, count = torch_whole_split_loss(_nanogpt_logits(model), tokens, T, FLAGS.batch_size)
        results[path] = {"loss": loss, "targets": count, "seq_len": T}
    for path, r in results.items():
        if r["targets"] != len(tokens) - 1:
            cli.fail(f"{path}: scored {r['targets']} targets, expected {len(tokens) - 1}")
        print(f"{r['loss']:.4f}  {path}  ({r['targets']:,} targets, windows of {r['seq_len']})")
    if len({r["seq_len"] for r in results.values()}) > 1:
        print("warning: the models have different context lengths, so their windows differ")
    if FLAGS.out:
        Path(FLAGS.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    cli.run(main)
