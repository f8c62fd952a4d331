"""nanoGPT's CPU quickstart on Tiny Shakespeare, characters: 4 layers, 4 heads, 128 wide,
64 context, batch 12, 2000 steps, lr 1e-3, no dropout. About 0.8M params; val loss ~1.88."""

from nanojax.train import default_config


def get_config():
    c = default_config("shakespeare-char-cpu", vocab_size=0)  # 0: the data's vocab (65 chars)
    c.data_dir = "data/shakespeare_char"
    c.batch_size = 12
    c.max_steps = 2000
    c.lr = 1e-3
    c.min_lr = 1e-4
    c.warmup_steps = 100
    c.b2 = 0.99
    c.eval_every = 250
    c.eval_iters = 20
    c.ckpt_every = 250
    return c
