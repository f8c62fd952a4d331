"""Sharding: the same train step on 8 simulated devices, several mesh shapes, equals one device."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import pytest
from jax.sharding import PartitionSpec as P

import nanojax as nj
from nanojax import sharding as shd

REPO = Path(__file__).resolve().parent.parent

SCRIPT = textwrap.dedent(
    """
    import jax, numpy as np, optax
    import nanojax as nj
    from nanojax import sharding as shd
    from nanojax.train import make_train_step
    from nanojax.model import param_shapes

    assert jax.device_count() == 8, jax.devices()
    llama = nj.ModelConfig.preset("llama-tiny", vocab_size=128, max_seq_len=16, n_head=4, n_kv_head=2)
    # GPT-2 too: a tied head and a learned position table are the other ways activations meet
    # FSDP-sharded tables.
    gpt2 = nj.ModelConfig.preset("gpt2-small", vocab_size=128, max_seq_len=16, n_head=4, n_layer=2,
                                 d_model=64, bias=True)
    # SGD with momentum: its state mirrors the params (so it is sharded like them) and, unlike
    # Adam's g / sqrt(v), it does not blow reduction-order noise in tiny gradients up to a full step.
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.5, momentum=0.9))
    rng = np.random.default_rng(0)
    x = rng.integers(0, 128, (2, 8, 16)).astype(np.int32)  # 2 micro-batches of 8 rows
    y = rng.integers(0, 128, (2, 8, 16)).astype(np.int32)

    def run(cfg, mesh):
        p_sh = shd.param_shardings(cfg, mesh)
        o_sh = shd.opt_state_shardings(opt, param_shapes(cfg), p_sh, mesh)
        b_sh = shd.batch_sharding(mesh, 3)
        init = jax.jit(lambda k: (lambda p: (p, opt.init(p)))(nj.init_params(cfg, k)),
                       out_shardings=(p_sh, o_sh))
        params, state = init(jax.random.key(0))
        repl = shd.replicated(mesh)
        step = jax.jit(make_train_step(cfg, opt, 0, mesh=mesh), in_shardings=(p_sh, o_sh, b_sh, b_sh, repl),
                       out_shardings=(p_sh, o_sh, repl), donate_argnums=(0, 1))
        for s in range(3):
            params, state, m = step(params, state, shd.put_batch(x, b_sh), shd.put_batch(y, b_sh), s)
        wq = params["layers"][0]["attn"]["wq"]
        return jax.device_get(params), float(m["loss"]), str(wq.sharding.spec)

    for name, cfg, shapes in [("llama", llama, [(8, 1, 1), (2, 2, 2), (1, 4, 2), (1, 2, 4)]),
                              ("gpt2", gpt2, [(2, 2, 2)])]:
        ref, ref_loss, _ = run(cfg, shd.make_mesh(devices=jax.devices()[:1]))
        for shape in shapes:
            params, loss, spec = run(cfg, shd.make_mesh(*shape))
            np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
            jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), params, ref)
            print(name, "mesh", shape, "loss", loss, "wq spec", spec)
    print("OK")
    """
)


def test_train_step_on_8_devices_matches_one_device():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
               PYTHONPATH=str(REPO))
    p = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0 and "OK" in p.stdout, p.stdout + p.stderr
    # The params really are split: fsdp on the model width, tensor on the heads.
    assert "llama mesh (2, 2, 2) loss" in p.stdout and "wq spec P('fsdp', 'tensor', None)" in p.stdout
    # And no activation is resharded by replicating it whole (XLA warns when it has to).
    assert "Involuntary full rematerialization" not in p.stderr, p.stderr


def test_logical_rules_replicate_what_does_not_divide():
    mesh = shd.make_mesh(devices=jax.devices()[:1])
    assert shd.logical_to_spec(("embed", "heads"), (64, 4), mesh) == P(None, None)  # size-1 axes
    with pytest.raises(ValueError, match="devices, but 1 are available"):
        shd.make_mesh(data=2, fsdp=1, tensor=1)


def test_every_param_has_logical_axes():
    cfg = nj.ModelConfig.preset("llama-tiny")
    axes = nj.param_axes(cfg)
    known = set(shd.RULES) | {None}
    for a in jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, tuple)):
        assert set(a) <= known, a
