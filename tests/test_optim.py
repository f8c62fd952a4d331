"""The optimizer: make_optimizer against optax.adamw with a decay mask written out here and against
AdamW written out in numpy; which leaves decay; the learning-rate schedule; the fused AdamW kernel
against optax's update."""

import functools
import math

import jax
import numpy as np
import optax
import pytest

import nanojax as nj
from nanojax.model import param_shapes
from nanojax.optim import decay_mask, fused_adamw, lr_schedule, make_optimizer
from nanojax.quant import ffi
from nanojax.train.step import guarded_update

# GPT-2 with every bias (q/k/v biases are 2-D: (heads, head_dim)), tied head, learned positions;
# Llama with q/k/v biases (Qwen2-style) and an untied head.
GPT2 = nj.ModelConfig.preset("gpt2-small", vocab_size=32, n_layer=1, n_head=2, d_model=16, max_seq_len=8,
                             bias=True)
LLAMA = nj.ModelConfig.preset("llama-tiny", vocab_size=32, n_layer=1, n_head=4, n_kv_head=2, d_model=16,
                              d_ff=24, max_seq_len=8, qkv_bias=True)

# optim.py's rule (minGPT's, and nanoGPT's before it decayed every 2-D tensor): the matmul weights
# decay; the embeddings (wte, the tied head too, and wpe), norm scales and every bias, the 2-D
# q/k/v biases included, do not.
GPT2_DECAYS = {
    "wte": False, "wpe": False, "ln_f/scale": False, "ln_f/bias": False,
    "layers/0/ln1/scale": False, "layers/0/ln1/bias": False,
    "layers/0/ln2/scale": False, "layers/0/ln2/bias": False,
    "layers/0/attn/wq": True, "layers/0/attn/wk": True, "layers/0/attn/wv": True, "layers/0/attn/wo": True,
    "layers/0/attn/bq": False, "layers/0/attn/bk": False, "layers/0/attn/bv": False,
    "layers/0/attn/bo": False, "layers/0/mlp/w_in": True, "layers/0/mlp/w_out": True,
    "layers/0/mlp/b_in": False, "layers/0/mlp/b_out": False,
}
LLAMA_DECAYS = {
    "wte": False, "lm_head": True, "ln_f/scale": False,
    "layers/0/ln1/scale": False, "layers/0/ln2/scale": False,
    "layers/0/attn/wq": True, "layers/0/attn/wk": True, "layers/0/attn/wv": True, "layers/0/attn/wo": True,
    "layers/0/attn/bq": False, "layers/0/attn/bk": False, "layers/0/attn/bv": False,
    "layers/0/mlp/w_gate": True, "layers/0/mlp/w_up": True, "layers/0/mlp/w_down": True,
}


def by_name(tree):
    return {jax.tree_util.keystr(path, simple=True, separator="/"): leaf
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def random_tree(cfg, seed, scale=0.1):
    """A params-shaped tree of random fp32 values (numpy: no init to compile)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: (scale * rng.standard_normal(s.shape)).astype(np.float32),
                        param_shapes(cfg))


def mask_from(table, params):
    """The decay mask as a tree built from `table`, not from optim.py."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: table[jax.tree_util.keystr(path, simple=True, separator="/")], params)


@pytest.mark.parametrize("cfg, table", [(GPT2, GPT2_DECAYS), (LLAMA, LLAMA_DECAYS)], ids=["gpt2", "llama"])
def test_decay_mask_decays_the_matmul_weights_only(cfg, table):
    assert by_name(decay_mask(param_shapes(cfg))) == table
    assert by_name(decay_mask(random_tree(cfg, 0))) == table


def _grads(cfg, n_steps):
    """Random gradients, every other step 1000x larger, so clipping at 1 acts on some steps only."""
    return [random_tree(cfg, 100 + i, 1e-2 if i % 2 else 10.0) for i in range(n_steps)]


def _run(opt, params, grads):
    """The params after each of len(grads) updates (one compiled step)."""

    @jax.jit
    def step(params, state, g):
        updates, state = opt.update(g, state, params)
        return optax.apply_updates(params, updates), state

    state = jax.jit(opt.init)(params)
    trail = []
    for g in grads:
        params, state = step(params, state, g)
        trail.append(params)
    return trail


HYPER = {"weight_decay": 0.1, "b1": 0.9, "b2": 0.95, "eps": 1e-8}


@pytest.mark.parametrize("clip", [1.0, 0.0], ids=["clip1", "noclip"])
def test_make_optimizer_equals_optax_adamw_with_the_mask_written_out(clip):
    """Six steps on the GPT-2 tree, the rate warming up then decaying: bit for bit the params of
    clip_by_global_norm(clip) (none at 0) + optax.adamw with GPT2_DECAYS as its mask."""
    params = random_tree(GPT2, 0)
    schedule = lr_schedule(1e-2, 2, 6, 1e-3)
    ours = make_optimizer(schedule, grad_clip=clip, **HYPER)
    chain = [optax.clip_by_global_norm(clip)] if clip else []
    ref = optax.chain(*chain, optax.adamw(schedule, mask=mask_from(GPT2_DECAYS, params), **HYPER))
    grads = _grads(GPT2, 6)
    for got, want in zip(_run(ours, params, grads), _run(ref, params, grads), strict=True):
        jax.tree.map(np.testing.assert_array_equal, got, want)


def test_make_optimizer_equals_adamw_written_out_in_numpy():
    """Clip to global norm 1, Adam with bias correction, decoupled decay lr * wd * p on the masked
    leaves, at the warmup-cosine rate of the step (Loshchilov & Hutter 2019, algorithm 2)."""
    lr, warmup, total, min_lr, clip = 1e-2, 2, 6, 1e-3, 1.0
    wd, b1, b2, eps = HYPER["weight_decay"], HYPER["b1"], HYPER["b2"], HYPER["eps"]
    params = random_tree(LLAMA, 0)
    grads = _grads(LLAMA, total)
    opt = make_optimizer(lr_schedule(lr, warmup, total, min_lr), grad_clip=clip, **HYPER)
    trail = _run(opt, params, grads)

    def rate(t):  # t = 0, 1, ...: the step's count before the update
        return nanogpt_get_lr(t, lr, warmup, total, min_lr)

    p = {k: np.asarray(v, np.float64) for k, v in by_name(params).items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(x) for k, x in p.items()}
    for t, (g_tree, got) in enumerate(zip(grads, trail, strict=True)):
        g = {k: np.asarray(x, np.float64) for k, x in by_name(g_tree).items()}
        norm = math.sqrt(sum((x * x).sum() for x in g.values()))
        g = {k: x * min(1.0, clip / norm) for k, x in g.items()}
        for k in p:
            m[k] = b1 * m[k] + (1 - b1) * g[k]
            v[k] = b2 * v[k] + (1 - b2) * g[k] ** 2
            step = (m[k] / (1 - b1 ** (t + 1))) / (np.sqrt(v[k] / (1 - b2 ** (t + 1))) + eps)
            p[k] = p[k] - rate(t) * (step + (wd * p[k] if LLAMA_DECAYS[k] else 0.0))
        for k, x in by_name(got).items():
            np.testing.assert_allclose(x, p[k], rtol=2e-5, atol=1e-7, err_msg=f"step {t + 1}, {k}")


def test_with_zero_gradients_only_the_decayed_leaves_shrink():
    """A step with zero gradients moves nothing but the decay: the masked leaves become
    (1 - lr * wd) times themselves, the others stay bit for bit."""
    lr, wd = 0.1, 0.5
    params = random_tree(LLAMA, 0)
    zeros = jax.tree.map(np.zeros_like, params)
    new = by_name(_run(make_optimizer(lr, weight_decay=wd), params, [zeros])[0])
    for k, x in by_name(params).items():
        if LLAMA_DECAYS[k]:
            np.testing.assert_allclose(new[k], (1 - lr * wd) * x, rtol=1e-6, err_msg=k)
        else:
            np.testing.assert_array_equal(new[k], x, err_msg=k)


def nanogpt_get_lr(it: int, learning_rate: float, warmup_iters: int, lr_decay_iters: int,
                   min_lr: float) -> float:
    """nanoGPT's train.py get_lr (github.com/karpathy/nanoGPT at 3adf61e), written out here as the
    oracle: the rate of iteration `it` = 0, 1, ..., whose update follows it."""
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it > lr_decay_iters:
        return min_lr
    decay_ratio = (it - warmup_iters) / (lr_decay_iters - warmup_iters)
    coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))
    return min_lr + coeff * (learning_rate - min_lr)


@pytest.mark.parametrize("lr,warmup,total,min_lr", [(1e-3, 100, 2000, 1e-4), (1.0, 10, 110, 0.1),
                                                    (3e-3, 0, 50, 3e-4)])
def test_lr_schedule_is_nanogpts_get_lr(lr, warmup, total, min_lr):
    """Every update's rate, and past the end, equals nanoGPT's: the warmup's first update already
    moves (lr / (warmup + 1), where optax's linear warmup gives 0), the ramp reaches lr at
    `warmup`, then cosine to min_lr at `total`. The first case is the quickstart's."""
    steps = np.arange(total + 20)
    got = np.asarray(lr_schedule(lr, warmup, total, min_lr)(steps))
    want = [nanogpt_get_lr(int(t), lr, warmup, total, min_lr) for t in steps]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=0)
    assert got[0] > 0


def test_lr_schedule_with_warmup_longer_than_the_run_ramps_over_the_run():
    """nanoGPT would never reach lr; here the warmup is cut to the run: a linear ramp from
    lr / (total + 1) to lr * total / (total + 1), rising, never past the peak."""
    short = lr_schedule(1.0, 100, 20, 0.1)
    ramp = np.asarray(short(np.arange(20)))
    np.testing.assert_allclose(ramp, np.arange(1, 21) / 21, rtol=1e-6)


# The fused AdamW kernel (csrc/adamw.cc) against optax, which the step ran before it.
needs_kernels = pytest.mark.skipif(not ffi.kernels_available(), reason="the CPU kernels did not build")


def _optax_steps(opt, params, grads, losses):
    """Params and state after each guarded optax update (train/step.py's path without the kernel)."""

    @jax.jit
    def step(params, state, g, loss):
        p, s, _ = guarded_update(opt, None, params, state, g, loss, optax.tree.norm(g), 0)
        return p, s

    state, trail = jax.jit(opt.init)(params), []
    for g, loss in zip(grads, losses, strict=True):
        params, state = step(params, state, g, loss)
        trail.append((params, state))
    return trail


@pytest.fixture(scope="module")
def adamw_case():
    """Six updates of the GPT-2 tree plus a leaf of 70,001 elements (two of the kernel's chunks and
    a ragged tail): clipped, unclipped, one skipped (NaN loss), at a warming-up then decaying rate;
    optax's guarded updates of them; and the fused update, jitted once for every loop."""
    params = {**random_tree(GPT2, 0), "big": np.full((70_001,), 0.5, np.float32)}
    grads = [{**g, "big": np.linspace(-s, s, 70_001, dtype=np.float32)}
             for g, s in zip(_grads(GPT2, 6), [10.0, 1e-2] * 3, strict=True)]
    losses = [1.0, 1.0, 1.0, float("nan"), 1.0, 1.0]
    schedule = lr_schedule(1e-2, 2, 6, 1e-3)
    mask = functools.partial(decay_mask, embeddings=True)  # wte decays too: the mask is followed
    opt = make_optimizer(schedule, mask=mask, **HYPER)
    want = _optax_steps(opt, params, grads, losses)
    fused = jax.jit(fused_adamw(schedule, mask=mask, **HYPER))
    return params, grads, losses, want, jax.jit(opt.init)(params), fused


@needs_kernels
@pytest.mark.parametrize("isa", ["", "avx2", "scalar"], ids=["widest", "avx2", "scalar"])
def test_fused_adamw_equals_the_optax_update(isa, adamw_case, monkeypatch):
    """The params and every state leaf of optax's guarded update, to fp32 rounding (a few ulps of
    each leaf's largest value, compounded over the steps), on every loop of the kernel."""
    monkeypatch.setenv("NANOJAX_KERNEL_ISA", isa)  # read at each call
    p, grads, losses, want, state, fused = adamw_case
    for t, (g, loss, (want_p, want_s)) in enumerate(zip(grads, losses, want, strict=True)):
        before = p
        p, state = fused(p, g, state, optax.tree.norm(g), np.isfinite(loss))
        assert jax.tree.structure(state) == jax.tree.structure(want_s)
        for got, ref in zip(jax.tree.leaves((p, state)), jax.tree.leaves((want_p, want_s)), strict=True):
            scale = float(np.abs(ref).max())  # optax's XLA loops may contract a * b + c into an fma
            np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6 * scale, err_msg=f"update {t + 1}")
        if not np.isfinite(loss):  # a skipped step changes no bit
            jax.tree.map(np.testing.assert_array_equal, p, before)


@needs_kernels
def test_build_puts_the_fused_update_in_the_one_device_cpu_step(monkeypatch):
    """build() traces the kernel's custom call into the step; NANOJAX_ADAMW_KERNEL=0 keeps optax's
    update (the train tests run the kernel's step end to end: resume, losses, quality)."""
    from nanojax.train import build, default_config, model_config_from

    c = default_config("shakespeare-char-cpu", vocab_size=32, n_layer=1, max_seq_len=8)
    c.update(batch_size=2, max_steps=3, warmup_steps=1)
    x = np.zeros((1, 2, 8), np.int32)
    for flag in ("1", "0"):
        monkeypatch.setenv("NANOJAX_ADAMW_KERNEL", flag)
        run = build(c, model_config_from(c))
        params, opt_state, *_ = run.abstract_step_args(batch_size=2)
        hlo = run.step_fn.lower(params, opt_state, x, x, np.int32(0)).as_text()
        assert ("nanojax_adamw" in hlo) == (flag == "1"), flag


@needs_kernels
def test_adamw_kernel_rejects_mismatched_leaves():
    z = np.zeros((3, 4), np.float32)
    with pytest.raises(ValueError, match="float32 of one shape"):
        ffi.adamw(np.zeros(11, np.float32), np.zeros(1, np.float32), [z], [z], [z],
                  [np.zeros((4, 3), np.float32)])
    with pytest.raises(ValueError, match="hyper"):
        ffi.adamw(np.zeros(10, np.float32), np.zeros(1, np.float32), [z], [z], [z], [z])
