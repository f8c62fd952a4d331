"""Sharding: the train step on 8 simulated devices equals one device, with every param, optimizer
moment, batch and pinned activation laid out where the rules table puts it."""

import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import nanojax as nj
from nanojax import sharding as shd

REPO = Path(__file__).resolve().parent.parent


def _spec_size(spec: P, mesh) -> int:
    """How many ways `spec` splits an array on `mesh` (product of the mesh axes it names)."""
    names = [n for part in spec if part for n in ((part,) if isinstance(part, str) else part)]
    return math.prod(mesh.shape[n] for n in names)


def assert_laid_out(what: str, arr: jax.Array, spec: P, mesh) -> None:
    """arr's sharding is `spec` on `mesh`, and each device holds 1/n of its bytes (n the number of
    ways the spec splits it)."""
    assert arr.sharding.is_equivalent_to(NamedSharding(mesh, spec), arr.ndim), (
        f"{what}: sharded {arr.sharding.spec}, expected {spec}")
    n = _spec_size(spec, mesh)
    for shard in arr.addressable_shards:
        assert shard.data.nbytes * n == arr.nbytes, (what, shard.data.shape, arr.shape, spec)


def _host_params(cfg, seed: int):
    """Random params drawn by numpy from the param specs (no RNG kernel to compile on 8 devices):
    N(0, 0.02) everywhere, plus 1 on norm scales, so biases are nonzero too."""
    rng = np.random.default_rng(seed)
    specs = nj.model.param_specs(cfg)
    return jax.tree.map(lambda s: (rng.normal(0, 0.02, s.shape) + (s.init == "ones")).astype(np.float32),
                        specs, is_leaf=lambda s: isinstance(s, nj.model.ParamSpec))


def _leaf(tree, dotted: str):
    for key in dotted.split("."):
        tree = tree[int(key)] if key.isdigit() else tree[key]
    return tree


def _sharding_constraints(jaxpr) -> set[tuple[tuple[int, ...], P]]:
    """(shape, spec) of every with_sharding_constraint in a jaxpr, nested jaxprs included."""
    from test_model import all_equations

    return {(e.invars[0].aval.shape, e.params["sharding"].spec)
            for e in all_equations(jaxpr) if e.primitive.name == "sharding_constraint"}


def eight_device_checks() -> None:
    """Runs in a subprocess with 8 simulated CPU devices (the test below); raises on a failure."""
    import optax
    from test_model import layer_structure, while_trip_counts

    from nanojax.model import param_shapes
    from nanojax.train import build, default_config, make_train_step

    assert jax.device_count() == 8, jax.devices()
    # Llama: N=4 query heads over K=2 kv heads, H=8, F=64, L=2. GPT-2: a tied head and a learned
    # position table are the other ways activations meet FSDP-sharded tables; biases everywhere.
    llama = nj.ModelConfig.preset("llama-tiny", vocab_size=64, max_seq_len=8, d_model=32, d_ff=64)
    gpt2 = nj.ModelConfig.preset("gpt2-small", vocab_size=64, max_seq_len=8, n_head=4, n_layer=2, d_model=32)
    # SGD with momentum: its state mirrors the params (so it is sharded like them) and, unlike
    # Adam's g / sqrt(v), it does not blow reduction-order noise in tiny gradients up to a full step.
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.5, momentum=0.9))
    rng = np.random.default_rng(0)
    A, B, T = 3, 8, 8  # 3 micro-batches (A != L, so the scans tell apart) of 8 rows
    x = rng.integers(0, 64, (A, B, T)).astype(np.int32)
    y = rng.integers(0, 64, (A, B, T)).astype(np.int32)

    def run(cfg, mesh, steps=3):
        """`steps` SGD steps of the jitted, sharded step from the same params and batch."""
        p_sh = shd.param_shardings(cfg, mesh)
        o_sh = shd.opt_state_shardings(opt, param_shapes(cfg), p_sh, mesh)
        b_sh, repl = shd.batch_sharding(mesh, 3), shd.replicated(mesh)
        host = _host_params(cfg, seed=0)  # the same for every mesh (and for scan_layers / remat)
        params = jax.device_put(host, p_sh)
        state = jax.device_put(opt.init(host), o_sh)
        xb, yb = shd.put_batch(x, b_sh), shd.put_batch(y, b_sh)
        step = jax.jit(make_train_step(cfg, opt, 0, mesh=mesh), in_shardings=(p_sh, o_sh, b_sh, b_sh, repl),
                       out_shardings=(p_sh, o_sh, repl), donate_argnums=(0, 1))
        traced = step.trace(params, state, xb, yb, np.int32(0))
        compiled = traced.lower().compile()
        losses = []
        for s in range(steps):
            params, state, m = compiled(params, state, xb, yb, np.int32(s))
            losses.append(float(m["loss"]))
        return dict(params=params, state=state, losses=losses, batch=xb, jaxpr=traced.jaxpr,
                    hlo=compiled.as_text(), p_sh=p_sh, mesh=mesh)

    def check_same_numbers(got, ref, what):
        np.testing.assert_allclose(got["losses"], ref["losses"], rtol=1e-5, err_msg=what)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=what),
                     jax.device_get(got["params"]), jax.device_get(ref["params"]))

    def check_layout(r, cfg, what, spelled_out):
        """Params and momenta follow param_shardings leaf by leaf, the spelled-out leaves (dotted
        paths) have the spec worked out by hand from RULES, the batch is split on B, and so is the
        embedded activation."""
        mesh, params = r["mesh"], r["params"]
        for path, spec in spelled_out.items():
            assert_laid_out(f"{what} {path}", _leaf(params, path), spec, mesh)
        momentum = optax.tree_utils.tree_get(r["state"], "trace")
        for kind, tree in (("param", params), ("momentum", momentum)):
            jax.tree.map(lambda a, sh, kind=kind: assert_laid_out(f"{what} {kind}", a, sh.spec, mesh),
                         tree, r["p_sh"])
        data_ways = mesh.shape["data"] * mesh.shape["fsdp"]
        assert_laid_out(f"{what} batch", r["batch"], P(None, ("data", "fsdp"), None), mesh)
        assert r["batch"].addressable_shards[0].data.shape == (A, B // data_ways, T)
        # The model pins the embedded tokens (B*T, D) to the batch split and gathers the token
        # table whole along the width (nanojax.model.embed).
        batch_spec = P(("data", "fsdp") if mesh.shape["data"] > 1 else "fsdp", None)
        constraints = _sharding_constraints(r["jaxpr"])
        assert ((B * T, cfg.d_model), batch_spec) in constraints, constraints
        assert ((cfg.vocab_size, cfg.d_model), P("tensor", None)) in constraints, constraints

    def check_layers_in_program(r, cfg, what):
        """remat: one checkpoint per block and micro-batch; scan_layers: a forward and a backward
        scan of L inside the micro-batch scan of A, compiled to while loops of those trip counts."""
        L = cfg.n_layer
        remat, scans = layer_structure(r["jaxpr"])
        assert remat == (A * L if cfg.remat != "none" else 0), (what, remat)
        assert sorted(scans) == sorted([A] + ([L, L] if cfg.scan_layers else [])), (what, scans)
        assert sorted(while_trip_counts(r["hlo"])) == sorted(scans), (what, while_trip_counts(r["hlo"]))

    one = jax.devices()[:1]
    tp = ("fsdp", "tensor")
    ref_llama = run(llama, shd.make_mesh(devices=one))
    # data x fsdp x tensor = 2 x 2 x 2: every axis in use; each weight matrix split 4 ways.
    r = run(llama, shd.make_mesh(2, 2, 2))
    check_same_numbers(r, ref_llama, "llama 2x2x2")
    check_layout(r, llama, "llama 2x2x2", {
        "wte": P("tensor", "fsdp"),
        "lm_head": P(*tp),
        "ln_f.scale": P("fsdp"),
        "layers.0.attn.wq": P(*tp, None),
        "layers.0.attn.wk": P(*tp, None),
        "layers.1.attn.wo": P("tensor", None, "fsdp"),
        "layers.1.mlp.w_gate": P(*tp),
        "layers.1.mlp.w_down": P("tensor", "fsdp"),
    })
    check_layers_in_program(r, llama, "llama 2x2x2")
    # Tensor 4 does not divide the 2 kv heads: those stay whole on the tensor axis. The same mesh
    # runs the stacked-and-scanned, rematerialised layers.
    scanned = llama.replace(scan_layers=True, remat="full")
    r = run(scanned, shd.make_mesh(1, 2, 4))
    check_same_numbers(r, ref_llama, "llama scan+remat 1x2x4")
    check_layout(r, scanned, "llama scan+remat 1x2x4", {
        "layers.0.attn.wq": P("fsdp", "tensor", None),
        "layers.0.attn.wk": P("fsdp", None, None),
        "layers.1.mlp.w_up": P(*tp),
    })
    check_layers_in_program(r, scanned, "llama scan+remat 1x2x4")
    # GPT-2 on fsdp 4 x tensor 2: the MLP weights split on both, biases on one.
    r = run(gpt2, shd.make_mesh(1, 4, 2))
    check_same_numbers(r, run(gpt2, shd.make_mesh(devices=one)), "gpt2 1x4x2")
    check_layout(r, gpt2, "gpt2 1x4x2", {
        "wte": P("tensor", "fsdp"),
        "wpe": P(None, "fsdp"),
        "layers.0.attn.bq": P("tensor", None),
        "layers.0.mlp.w_in": P(*tp),
        "layers.0.mlp.b_in": P("tensor"),
        "layers.1.mlp.w_out": P("tensor", "fsdp"),
        "layers.1.mlp.b_out": P("fsdp"),
    })

    # The training run's own wiring (nanojax.train.build, AdamW): params and both moments are
    # born sharded (init_fn) and stay so after a step, the counts replicated; the batch is split;
    # step 0's loss is the one-device one.
    config = default_config("llama-tiny")
    config.mesh.update(data=2, fsdp=2, tensor=2)
    job = build(config, llama)

    def check_adam_layout(params, opt_state, when):
        for name in ("mu", "nu"):
            moments = optax.tree_utils.tree_get(opt_state, name)
            jax.tree.map(lambda a, sh, w=f"adam {name} {when}": assert_laid_out(w, a, sh.spec, job.mesh),
                         moments, job.param_shardings)
            assert_laid_out(f"adam {name} {when}", _leaf(moments, "layers.0.mlp.w_gate"), P(*tp), job.mesh)
        for _, count in optax.tree_utils.tree_get_all_with_path(opt_state, "count"):  # Adam's, the schedule's
            assert_laid_out(f"count {when}", count, P(), job.mesh)
        assert_laid_out(f"build wq {when}", _leaf(params, "layers.0.attn.wq"), P(*tp, None), job.mesh)

    params, opt_state = job.init_fn(jax.random.key(0, impl="rbg"))  # rbg: a cheaper RNG to compile
    check_adam_layout(params, opt_state, "at init")
    params = jax.device_put(_host_params(llama, seed=0), job.param_shardings)
    xb, yb = shd.put_batch(x, job.batch_sharding), shd.put_batch(y, job.batch_sharding)
    assert_laid_out("build batch", xb, P(None, ("data", "fsdp"), None), job.mesh)
    params, opt_state, m = job.step_fn(params, opt_state, xb, yb, np.int32(0))
    check_adam_layout(params, opt_state, "after a step")
    np.testing.assert_allclose(float(m["loss"]), ref_llama["losses"][0], rtol=1e-5)


def test_train_step_on_8_devices_matches_one_device():
    """eight_device_checks() in a subprocess with 8 CPU devices: Llama on 2x2x2 and (scanned,
    rematerialised) on 1x2x4 and GPT-2 on 1x4x2 give the one-device losses and params; params,
    momenta, Adam's mu/nu, the batch and the pinned activations are split as RULES say; remat and
    scan show in the sharded program. And XLA reshards no activation by replicating it whole (it
    warns when it has to)."""
    # LLVM optimisation level 0 halves the compile time of the six steps; it changes the kernels'
    # speed, not the partitioning or the numbers compared.
    flags = "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
    env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    p = subprocess.run([sys.executable, __file__], capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0 and "OK" in p.stdout, p.stdout + p.stderr
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


if __name__ == "__main__":
    eight_device_checks()
    print("OK")
