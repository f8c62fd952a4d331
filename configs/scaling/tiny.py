"""The tiny scaling sweep: Tiny Shakespeare, byte-level BPE of 512 tokens, GPT-2-style models of
7k to 1.8M non-embedding parameters at three IsoFLOP budgets (1e11, 3e11, 1e12 FLOPs of 6ND), the
two cheaper ones with two seeds: 28 runs, 51,849 steps. About 11 minutes on 2 idle CPU cores, 766 s
of CPU in all (docs/scaling.md has the measurements).

    python scripts/scaling.py --preset=tiny --input=tinyshakespeare.txt --workdir=out/scaling_tiny
"""

from nanojax.scaling import base_sweep_config


def get_config():
    s = base_sweep_config("tiny")
    s.tokenizer, s.vocab_size = "bpe", 512
    t = s.train
    t.model.max_seq_len = 64
    t.model.bias = False
    t.model.dropout = 0.0
    t.batch_size = 16  # 1024 tokens a step
    t.lr, t.min_lr = 2e-3, 2e-4
    t.b2 = 0.99
    t.eval_iters = 4  # the fitted loss is the whole-split one at the end; this is only logged
    # (n_layer, d_model, n_head): measured ~5, 12, 19, 29, 50 ms a step on the Xeon's 2 cores (idle)
    # for 32..128 wide. The loss-optimal size at these budgets is near the small end: a first pass
    # without the 24-wide size (and max_steps 6000) put two of three IsoFLOP minima outside the sizes.
    s.sizes = ((1, 24, 2), (1, 32, 2), (2, 48, 2), (2, 64, 4), (3, 96, 4), (4, 128, 4), (4, 192, 6))
    s.budgets = (1e11, 3e11, 1e12)
    s.seeds = (0, 1)
    s.extra_seed_max_flops = 3e11  # the two cheapest budgets twice: the seed noise of the fit
    s.min_steps, s.max_steps = 40, 14_000  # leaves out 7k params at 1e12 (23k steps), 1.8M below it
    s.fit.n_boot = 100
    return s
