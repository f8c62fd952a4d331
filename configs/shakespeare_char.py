"""nanoGPT's Shakespeare-char GPU run: 6 layers, 6 heads, 384 wide, 256 context, dropout 0.2,
batch 64, 5000 steps, lr 1e-3. ~10.7M params; val loss ~1.47 on a GPU in minutes."""

from nanojax.train import default_config


def get_config():
    c = default_config("shakespeare-char", vocab_size=0)
    c.data_dir = "data/shakespeare_char"
    c.batch_size = 64
    c.max_steps = 5000
    c.lr = 1e-3
    c.min_lr = 1e-4
    c.warmup_steps = 100
    c.b2 = 0.99
    c.eval_every = 250
    c.eval_iters = 200
    c.log_every = 10
    c.ckpt_every = 500
    return c
