"""The tiny training run that test_train_step.py and test_train.py share (conftest's `trained`).

Its text is learnable and its config small enough that compiling the step is most of the run's
cost: configs/shakespeare_char_cpu.py with OVERRIDES, the same overrides the script tests pass
as --config.* flags.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from conftest import cpu_config

import nanojax as nj
from nanojax.metrics import read_metrics

REPO = Path(__file__).resolve().parent.parent
ALPHABET = "abcdefgh ijklmnop\nqrstu"  # 23 symbols


def _markov_text(n: int = 40_000, p_follow: float = 0.8, seed: int = 0) -> str:
    """Each symbol is followed by its own fixed successor 80% of the time, else by a uniform pick.
    Every symbol is equally frequent, so a model that learns nothing (or only symbol counts)
    sits at ln 23 = 3.14 nats, while one that learns the pairs heads for ~1.08 nats."""
    rng = np.random.default_rng(seed)
    successor = rng.permutation(len(ALPHABET))
    follow = rng.random(n) < p_follow
    pick = rng.integers(0, len(ALPHABET), n)
    ids = [0]
    for i in range(1, n):
        ids.append(successor[ids[-1]] if follow[i] else pick[i])
    return "".join(ALPHABET[i] for i in ids)


SYNTH = _markov_text()
LN_VOCAB = math.log(len(ALPHABET))

# Checkpoints every 4 steps (the last two kept: 20 and 24), val loss at 12 and 24.
STEPS = 24
OVERRIDES = {
    "model.n_layer": 1, "model.n_head": 2, "model.d_model": 32, "model.max_seq_len": 16,
    "batch_size": 8, "grad_accum": 2, "max_steps": STEPS, "lr": 1e-2, "min_lr": 1e-3, "warmup_steps": 4,
    "eval_every": 12, "eval_iters": 2, "ckpt_every": 4, "seed": 5,
}
CONFIG_FILE = REPO / "configs/shakespeare_char_cpu.py"
TINY = nj.ModelConfig.preset("shakespeare-char-cpu", vocab_size=len(ALPHABET), n_layer=1, n_head=2,
                             d_model=32, max_seq_len=16)  # OVERRIDES' model


def base_config(data_dir, changes=None):
    """configs/shakespeare_char_cpu.py with OVERRIDES and `changes` ({"model.dtype": ...})."""
    return cpu_config(data_dir, OVERRIDES, changes)


def losses(workdir) -> dict[int, float]:
    """{step: train loss} of every training line in workdir/metrics.jsonl."""
    return {r["step"]: r["train_loss"] for r in read_metrics(Path(workdir) / "metrics.jsonl")
            if "grad_norm" in r}
