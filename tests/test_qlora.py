"""QLoRA: LoRA over a quantized, frozen base through the same matmul seam, with no LoRA code that
knows about quantization.

The base is quantized by `nj.quantize` (int8 per channel; int4 group 32) and compared with the same
model whose weights are those records dequantized (`nanojax.quant.dequantize`), and, for training,
with LoRA over the fp32 base.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import nanojax as nj
from nanojax.dense import Weight
from nanojax.lora import init_lora
from nanojax.optim import make_optimizer
from nanojax.quant import dequantize
from nanojax.train.step import loss_fn, make_train_step

# d_ff 192: int4's groups (32, 64, 128) must divide every input dim (llama-tiny's 176 does not)
CFG = nj.ModelConfig.preset("llama-tiny", n_layer=2, max_seq_len=32, d_ff=192)


@pytest.fixture(scope="module")
def bases():
    params = jax.device_get(jax.jit(nj.init_params, static_argnums=0)(CFG, jax.random.key(0)))
    qparams = nj.quantize(params, CFG, "int8", embeddings=False)
    assert isinstance(qparams["layers"][0]["attn"]["wq"], Weight)
    return qparams, dequantize(qparams)


def _adapter(seed=1):
    a = init_lora(CFG, jax.random.key(seed), rank=4, targets="q,v,o,down", alpha=8.0)
    rng = np.random.default_rng(seed)
    return a.replace(weights=jax.tree.map(lambda x: jnp.asarray(rng.normal(0, 0.1, x.shape), jnp.float32),
                                          a.weights))


def test_lora_over_a_weight_record_equals_lora_over_its_dequantized_arrays(bases):
    qparams, deq = bases
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, CFG.vocab_size, (2, 12)), jnp.int32)
    adapter = _adapter()
    forward = jax.jit(nj.forward, static_argnames="cfg")
    got = np.asarray(forward(qparams, tokens, CFG, lora=adapter))
    want = np.asarray(forward(deq, tokens, CFG, lora=adapter))
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    assert np.abs(want - np.asarray(forward(deq, tokens, CFG))).max() > 1e-3  # the adapter acts
    # per-row adapters over the quantized base too
    out = nj.generate(qparams, CFG, [[1, 2, 3], [4, 5]], max_new_tokens=6, lora=[adapter, None])
    assert out == nj.generate(deq, CFG, [[1, 2, 3], [4, 5]], max_new_tokens=6, lora=[adapter, None])


def _lora_losses(base, steps=30):
    template = init_lora(CFG, jax.random.key(2), rank=4, targets="q,v,o,down", alpha=8.0)
    opt = make_optimizer(optax.constant_schedule(1e-2), weight_decay=0.0,
                         mask=lambda t: jax.tree.map(lambda _: True, t))

    def loss(w, x, y, cfg, rng, base):
        return loss_fn(base, x, y, cfg, rng, lora=template.replace(weights=w))

    step = jax.jit(make_train_step(CFG, opt, 0, loss=loss))
    rng = np.random.default_rng(0)
    # a learnable signal: only 8 of the 512 tokens occur (ln 512 = 6.2 nats -> ln 8 = 2.1)
    seqs = rng.integers(0, 8, (steps, 1, 8, 33))
    w, o = template.weights, opt.init(template.weights)
    out = []
    for s in range(steps):
        x, y = jnp.asarray(seqs[s, :, :, :-1], jnp.int32), jnp.asarray(seqs[s, :, :, 1:], jnp.int32)
        w, o, m = step(w, o, x, y, np.int32(s), base)
        out.append(float(m["loss"]))
    return np.asarray(out)


def test_lora_over_a_weight_record_trains_like_over_its_dequantized_arrays(bases):
    qparams, deq = bases
    q, d = _lora_losses(qparams), _lora_losses(deq)
    # the same run up to float rounding ((x q) s against x (q s)), compounded over the steps
    np.testing.assert_allclose(q, d, atol=2e-3)
    assert q[-5:].mean() < q[0] - 0.3, q  # it learns


def test_qlora_int4_trains_like_fp32_lora():
    params = jax.device_get(nj.init_params(CFG, jax.random.key(0)))
    q4 = nj.quantize(params, CFG, "int4", group_size=32)
    fp, qq = _lora_losses(params, steps=40), _lora_losses(q4, steps=40)
    assert qq[-5:].mean() < qq[0] - 0.3, qq  # QLoRA learns
    assert abs(qq[-5:].mean() - fp[-5:].mean()) < 0.1, (qq, fp)  # and tracks the fp32-base run
