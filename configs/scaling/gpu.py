"""A GPT-2-scale sweep for one GPU, on a corpus you prepare (OpenWebText, FineWeb, ...) with the
GPT-2 tokenizer: 10M to 300M non-embedding parameters at four budgets from 1e17 to 3e18 FLOPs.
Roughly 3e18 / (0.4 MFU x 790 TFLOP/s bf16) ~ 2.6 h for the largest budget on one H100, ~5 h in all.

    python scripts/prepare_data.py --input=owt.txt --tokenizer=file \\
        --tokenizer_file=gpt2/tokenizer.json --out_dir=data/owt
    python scripts/scaling.py --preset=gpu --input=data/owt --workdir=out/scaling_gpu
"""

from nanojax.scaling import base_sweep_config


def get_config():
    s = base_sweep_config("gpu")
    s.tokenizer = "bpe"  # only used when --input is a text file; a prepared data dir is used as is
    s.vocab_size = 50257
    t = s.train
    t.model.max_seq_len = 1024
    t.model.bias = False
    t.model.dropout = 0.0
    t.model.dtype = "bfloat16"
    t.batch_size = 64
    t.grad_accum = 2  # 128 x 1024 = 131k tokens a step
    t.lr, t.min_lr = 6e-4, 6e-5
    t.b2 = 0.95
    t.eval_iters = 20
    t.eval_full_at_end = True
    s.sizes = ((4, 384, 6), (6, 512, 8), (8, 640, 10), (10, 768, 12), (12, 1024, 16), (16, 1280, 20))
    s.budgets = (1e17, 3e17, 1e18, 3e18)
    s.seeds = (0, 1)
    s.extra_seed_max_flops = 1e17
    s.min_steps, s.max_steps = 500, 200_000
    s.fit.n_boot = 400
    return s
