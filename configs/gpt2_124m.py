"""GPT-2 124M (12 layers, 12 heads, 768 wide, 1024 context) from scratch, nanoGPT's recipe:
0.5M tokens per update (batch 16 x 32 micro-batches x 1024 on one device), lr 6e-4 cosine to 6e-5
over 600k steps, warmup 2000, weight decay 0.1, betas (0.9, 0.95). Data: a BPE-tokenized corpus
prepared with scripts/prepare_data.py --tokenizer=bpe (or GPT-2's own tokenizer.json)."""

from nanojax.train import default_config


def get_config():
    c = default_config("gpt2-small")
    c.model.dtype = "bfloat16"
    c.data_dir = "data/openwebtext"
    c.batch_size = 16
    c.grad_accum = 32
    c.max_steps = 600_000
    c.lr = 6e-4
    c.min_lr = 6e-5
    c.warmup_steps = 2000
    c.b2 = 0.95
    c.eval_every = 1000
    c.eval_iters = 200
    c.log_every = 10
    c.ckpt_every = 1000
    return c
