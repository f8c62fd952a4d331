"""The sweep grid: which models (N) train on how many tokens (D), and the ordinary nanojax training
config of each run.

IsoFLOP design (Hoffmann et al. 2022, "Training Compute-Optimal Large Language Models", approach 2):
for each compute budget C, every model size N trains for D = C / (6 N) tokens, its cosine schedule
ending at the last step, so each run is a finished run of its own length, not a truncated long one.

N is Kaplan et al.'s (2020) non-embedding parameter count, `ModelConfig.num_params(include_embeddings
=False)`: the blocks and final norm, without the token and position tables (a tied head is the token
table and is not counted). At these tiny sizes the embeddings are as large as the blocks, and Kaplan
found the non-embedding count gives the cleaner power laws. C = 6 N D is that convention's compute.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import ml_collections

from nanojax.config import ModelConfig
from nanojax.train import default_config


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One run of the sweep. Units: n_params in parameters, tokens in tokens, flops in FLOPs."""

    name: str  # the run's workdir name under SWEEP/runs/
    n_layer: int
    d_model: int
    n_head: int
    steps: int  # optimizer updates; tokens = steps * tokens_per_step
    seed: int
    budget: float  # the nominal IsoFLOP budget C this run belongs to
    n_params: int  # N: non-embedding parameters (Kaplan's convention)
    tokens: int  # D: training tokens actually seen
    flops: float  # 6 N D, the run's actual compute in that convention

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def model_config(sweep: ml_collections.ConfigDict, shape: tuple[int, int, int],
                 vocab_size: int) -> ModelConfig:
    """The ModelConfig of one (n_layer, d_model, n_head) shape of the sweep, on the data's vocab."""
    L, D, H = shape
    d = dict(sweep.train.model.to_dict())
    d.update(n_layer=L, d_model=D, n_head=H, vocab_size=vocab_size)
    return ModelConfig.from_dict(d)


def tokens_per_step(sweep: ml_collections.ConfigDict) -> int:
    t = sweep.train
    return t.batch_size * t.grad_accum * t.model.max_seq_len


def make_grid(sweep: ml_collections.ConfigDict, vocab_size: int) -> list[RunSpec]:
    """Every run of the sweep, cheapest budget first.

    For each budget C and shape, steps = round(C / (6 N tokens_per_step)); a pair whose step count
    falls outside [min_steps, max_steps] is left out (too short to mean anything, or too long for the
    preset's time). Budgets up to `extra_seed_max_flops` are run once per seed in `seeds`, the
    others with the first seed only, so the cheap points show the seed noise the fit goes through.
    """
    if not sweep.sizes or not sweep.budgets or not sweep.seeds:
        raise ValueError("the sweep config needs at least one entry in each of sizes, budgets and seeds; "
                         f"got sizes={sweep.sizes!r}, budgets={sweep.budgets!r}, seeds={sweep.seeds!r}")
    tps = tokens_per_step(sweep)
    runs = []
    for budget in sorted(float(b) for b in sweep.budgets):
        seeds = sweep.seeds if budget <= sweep.extra_seed_max_flops else sweep.seeds[:1]
        for shape in sweep.sizes:
            L, D, H = (int(v) for v in shape)
            n = model_config(sweep, (L, D, H), vocab_size).num_params(include_embeddings=False)
            steps = round(budget / (6.0 * n * tps))
            if not sweep.min_steps <= steps <= sweep.max_steps:
                continue
            for seed in seeds:
                tokens = steps * tps
                runs.append(RunSpec(name=f"C{budget:.0e}_L{L}_d{D}_h{H}_s{steps}_seed{seed}".replace("+", ""),
                                    n_layer=L, d_model=D, n_head=H, steps=steps, seed=int(seed),
                                    budget=budget, n_params=n, tokens=tokens, flops=6.0 * n * tokens))
    if not runs:
        raise ValueError(f"no (budget, size) pair of the sweep gives between min_steps={sweep.min_steps} and "
                         f"max_steps={sweep.max_steps} steps; widen that range, or change budgets / sizes")
    return runs


def run_config(sweep: ml_collections.ConfigDict, spec: RunSpec, data_dir: str) -> ml_collections.ConfigDict:
    """The ordinary training config of one run (what scripts/train.py would build): the sweep's
    `train` section with this run's shape, steps, seed and data; warmup is `warmup_fraction` of the
    steps and the cosine decay ends at the last one; evaluation and a checkpoint at the end only
    (the final whole-split val loss is the number fitted)."""
    c = ml_collections.ConfigDict(sweep.train.to_dict())
    c.model.n_layer, c.model.d_model, c.model.n_head = spec.n_layer, spec.d_model, spec.n_head
    c.model.vocab_size = 0  # the data's
    c.data_dir = str(data_dir)
    c.seed = spec.seed
    c.max_steps = spec.steps
    c.warmup_steps = max(1, math.ceil(sweep.warmup_fraction * spec.steps))
    c.eval_every = spec.steps
    c.ckpt_every = spec.steps
    c.eval_full_at_end = True
    c.log_every = max(1, spec.steps // sweep.curve_points)
    return c


def base_sweep_config(name: str) -> ml_collections.ConfigDict:
    """The fields every sweep config has, with defaults; configs/scaling/*.py start from this."""
    s = ml_collections.ConfigDict()
    s.name = name
    s.tokenizer = "bpe"  # how a text --input is prepared: byte-level BPE of `vocab_size` tokens
    s.vocab_size = 512
    s.val_fraction = 0.1
    s.train = default_config("shakespeare-char-cpu", vocab_size=0)
    s.sizes = ((2, 64, 4),)  # (n_layer, d_model, n_head) per model size
    s.budgets = (1e12,)  # IsoFLOP compute budgets C, in FLOPs (6 N D)
    s.seeds = (0,)
    s.extra_seed_max_flops = 0.0  # budgets up to this run once per seed; the rest once
    s.min_steps = 40
    s.max_steps = 100_000
    s.warmup_fraction = 0.05
    s.curve_points = 100  # ~ metrics.jsonl lines per run (the loss curves)
    # A run is diverged when it raised a non-finite loss, or when its final val loss is above
    # diverged_margin + ln(vocab): worse than guessing uniformly, so it learnt nothing.
    s.diverged_margin = 0.0
    s.fit = ml_collections.ConfigDict({
        "huber_delta": 1e-3,  # Hoffmann et al. appendix D.2
        "n_boot": 200,  # bootstrap resamples of the runs for the intervals
        "top_inits": 16,  # L-BFGS starts: the best of Hoffmann's init grid (see fit.py)
        "boot_inits": 4,
        "interval": 0.9,  # two-sided bootstrap interval
        "seed": 0,
    })
    return s
