"""The manual (shard_map) train step against the one-device step, its collectives against
docs/sharding.md, FSDP memory against 1/N, remat's temporaries, and 2 processes against 1.

Everything runs in subprocesses with 8 simulated CPU devices (or 2 real processes x 4 over gloo):
one per test module for the fast checks, whose numbers come back as JSON and are judged here.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import nanojax as nj

REPO = Path(__file__).resolve().parent.parent
STEPS = 3
A, B, T = 1, 8, 16  # one micro-batch of 8 rows of 16 tokens: T splits 4 ways, B 8 ways
CLIP = 0.5  # below the first steps' gradient norm (~0.9), so the manual step's clip is exercised
LLAMA = dict(preset="llama-tiny", vocab_size=64, max_seq_len=T, d_model=32, d_ff=64)  # GQA 4 over 2
GPT2 = dict(preset="gpt2-small", vocab_size=64, max_seq_len=T, n_head=4, n_layer=2, d_model=32)
MANUAL_MESHES = {"data8": dict(data=8), "fsdp8": dict(data=1, fsdp=8),
                 "fsdp4_tensor2": dict(data=1, fsdp=4, tensor=2), "2x2x2": dict(data=2, fsdp=2, tensor=2),
                 "fsdp2_seq4": dict(data=1, fsdp=2, sequence=4)}
AUTO_MESHES = ("data8", "fsdp8", "fsdp4_tensor2", "2x2x2")
# The fast run: 4 of the 5 manual meshes on Llama, one on GPT-2; the slow run does the rest.
FAST = {"llama": ("data8", "fsdp8", "2x2x2", "fsdp2_seq4"), "gpt2": ("fsdp4_tensor2",)}
# (family, mesh, remat) whose per-layer collectives are counted in the lowered step.
COUNTED = (("llama", "fsdp4_tensor2", "none"), ("llama", "fsdp4_tensor2", "full"), ("gpt2", "2x2x2", "none"),
           ("llama", "fsdp2_seq4", "none"), ("llama", "fsdp2_seq4", "full"))


def model_cfg(family: str, **changes) -> nj.ModelConfig:
    return nj.ModelConfig.from_dict({**(LLAMA if family == "llama" else GPT2), **changes})


# ----------------------------------------------------------------------------------------------
# What runs in the subprocesses.


def _host_params(cfg, seed: int = 0):
    """N(0, 0.02) params drawn by numpy (+1 on norm scales), the same in every process and mesh."""
    import jax

    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: (rng.normal(0, 0.02, s.shape) + (s.init == "ones")).astype(np.float32),
                        nj.model.param_specs(cfg), is_leaf=lambda s: isinstance(s, nj.model.ParamSpec))


def _batch():
    rng = np.random.default_rng(1)
    return (rng.integers(0, 64, (A, B, T)).astype(np.int32), rng.integers(0, 64, (A, B, T)).astype(np.int32))


def _runner():
    """(run, lowered_text): run(cfg, sizes or None, mode) trains STEPS steps from the same params
    and batch and returns losses, host params and memory_analysis; lowered_text(cfg, sizes) is the
    manual step's lowered StableHLO."""
    import jax
    import optax
    from jax.experimental import multihost_utils

    from nanojax import sharding as shd
    from nanojax.model import param_shapes
    from nanojax.train import manual
    from nanojax.train.step import make_train_step

    # SGD with momentum (its state mirrors the params, like Adam's, without Adam's blow-up of
    # reduction-order noise in tiny gradients); the auto step clips in the optimizer, the manual
    # one with its own all-reduced norm.
    sgd = optax.sgd(0.5, momentum=0.9)
    clipped, unclipped = optax.chain(optax.clip_by_global_norm(CLIP), sgd), optax.chain(optax.identity(), sgd)
    x, y = _batch()

    def setup(cfg, sizes, mode):
        mesh = shd.make_mesh(**sizes) if sizes else shd.make_mesh(devices=jax.devices()[:1])
        p_sh = shd.param_shardings(cfg, mesh)
        o_sh = shd.opt_state_shardings(clipped, param_shapes(cfg), p_sh, mesh)
        if mode == "manual":
            fn = manual.make_manual_train_step(cfg, unclipped, CLIP, mesh, manual.specs_of(p_sh),
                                               manual.specs_of(o_sh))
            b_sh = manual.manual_batch_sharding(mesh)
        else:
            fn = make_train_step(cfg, clipped, 0, mesh=mesh)
            b_sh = shd.batch_sharding(mesh, 3)
        step = jax.jit(fn, in_shardings=(p_sh, o_sh, b_sh, b_sh, shd.replicated(mesh)),
                       out_shardings=(p_sh, o_sh, shd.replicated(mesh)), donate_argnums=(0, 1))
        return step, p_sh, o_sh, b_sh

    def put(host, sharding):  # works on one process and on several (each passes the whole array)
        return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])

    def run(cfg, sizes, mode):
        step, p_sh, o_sh, b_sh = setup(cfg, sizes, mode)
        host = _host_params(cfg)
        params = jax.tree.map(put, host, p_sh)
        state = jax.tree.map(put, jax.tree.map(np.asarray, clipped.init(host)), o_sh)
        xb, yb = put(x, b_sh), put(y, b_sh)
        compiled = step.lower(params, state, xb, yb, np.int32(0)).compile()
        losses = []
        for s in range(STEPS):
            params, state, m = compiled(params, state, xb, yb, np.int32(s))
            losses.append(float(m["loss"]))
        mem = compiled.memory_analysis()
        gathered = multihost_utils.process_allgather(params, tiled=True)
        return {"losses": losses, "params": jax.tree.map(np.asarray, gathered),
                "argument_bytes": mem.argument_size_in_bytes, "temp_bytes": mem.temp_size_in_bytes}

    def lowered_text(cfg, sizes):
        step, *_ = setup(cfg, sizes, "manual")
        params = param_shapes(cfg)
        xs = jax.ShapeDtypeStruct((A, B, T), np.int32)
        return step.lower(params, jax.eval_shape(clipped.init, params), xs, xs,
                          jax.ShapeDtypeStruct((), np.int32)).as_text()

    return run, lowered_text


def _param_error(got, ref) -> float:
    """Largest |got - ref| over every param, in units of (1e-6 + 1e-4 |ref|): <= 1 is a match."""
    import jax

    errs = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b) / (1e-6 + 1e-4 * np.abs(b)))), got, ref)
    return max(jax.tree.leaves(errs))


def collective_counts(text: str) -> dict[str, int]:
    import re

    names = re.findall(r"stablehlo\.(all_gather|reduce_scatter|all_reduce|collective_permute)", text)
    return {n: names.count(n) for n in ("all_gather", "reduce_scatter", "all_reduce", "collective_permute")}


def checks(which: str) -> dict:
    """The numbers the tests judge. which: "fast" or "slow"."""
    import jax

    assert jax.device_count() == 8, jax.devices()
    run, lowered_text = _runner()
    out: dict = {"losses": {}, "param_error": {}}

    def compare(family, name, sizes, mode, cfg=None, ref=None):
        cfg = cfg or model_cfg(family)
        r = run(cfg, sizes, mode)
        out["losses"][f"{family}/{mode}/{name}"] = r["losses"]
        if ref is not None:
            out["param_error"][f"{family}/{mode}/{name}"] = _param_error(r["params"], ref["params"])
        return r

    for family in ("llama", "gpt2"):
        ref = compare(family, "one_device", None, "auto")
        if which == "fast":
            for name in FAST[family]:
                r = compare(family, name, MANUAL_MESHES[name], "manual", ref=ref)
                if name in ("data8", "fsdp8"):
                    out[f"argument_bytes/{name}"] = r["argument_bytes"]
        else:
            for name, sizes in MANUAL_MESHES.items():
                if name not in FAST[family]:
                    compare(family, name, sizes, "manual", ref=ref)
            for name in AUTO_MESHES:
                compare(family, name, MANUAL_MESHES[name], "auto", ref=ref)
    if which == "fast":
        # Per-layer collectives: the lowered step of 2 layers minus that of 1.
        out["counts"] = {}
        for family, mesh, remat in COUNTED:
            two, one = (collective_counts(lowered_text(model_cfg(family, n_layer=n, remat=remat),
                                                       MANUAL_MESHES[mesh])) for n in (2, 1))
            out["counts"][f"{family}/{mesh}/{remat}"] = {k: two[k] - one[k] for k in two}
        # remat under scan_layers: XLA:CPU's scheduler keeps unrolled layers' recomputation from
        # saving memory (docs/sharding.md), inside a scan it cannot.
        scanned = {}
        for remat in ("none", "full"):
            cfg = model_cfg("llama", scan_layers=True, remat=remat)
            name = f"fsdp8_scan_{remat}"
            scanned[remat] = compare("llama", name, MANUAL_MESHES["fsdp8"], "manual", cfg=cfg)
            out[f"remat_temp_bytes/{remat}"] = scanned[remat]["temp_bytes"]
        out["remat_param_error"] = _param_error(scanned["full"]["params"], scanned["none"]["params"])
    return out


def multiprocess_main(coordinator: str, n_processes: int, process_id: int) -> None:
    """Manual step on data 2 x fsdp 2 x tensor 2 over however many processes; prints losses."""
    if n_processes > 1:
        from nanojax.cli import init_distributed

        init_distributed(coordinator, n_processes, process_id, timeout=120)
    import jax

    assert jax.device_count() == 8, jax.devices()
    run, _ = _runner()
    r = run(model_cfg("llama"), MANUAL_MESHES["2x2x2"], "manual")
    print("LOSSES " + json.dumps(r["losses"]), flush=True)


# ----------------------------------------------------------------------------------------------
# The tests.


def _env(devices: int) -> dict[str, str]:
    # LLVM optimisation level 0 roughly halves compile time; it changes kernel speed, not the
    # partitioning, the collectives or the numbers compared.
    flags = f"--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0"
    return dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))


def _run_checks(which: str) -> dict:
    p = subprocess.run([sys.executable, __file__, which], capture_output=True, text=True, env=_env(8),
                       timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-6000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def fast() -> dict:
    return _run_checks("fast")


def _assert_matches_one_device(res: dict, names: list[str]) -> None:
    for key in names:
        family = key.split("/")[0]
        np.testing.assert_allclose(res["losses"][key], res["losses"][f"{family}/auto/one_device"], rtol=1e-5,
                                   err_msg=key)
        assert res["param_error"][key] <= 1.0, (key, res["param_error"][key])


def test_manual_step_matches_one_device(fast):
    """3 SGD steps (clipped) of the shard_map step on data 8, fsdp 8, data 2 x fsdp 2 x tensor 2 and
    fsdp 2 x sequence 4 (ring attention; RoPE at global positions) for Llama-GQA, and fsdp 4 x
    tensor 2 for GPT-2 (learned positions, biases, tied head): the one-device losses within 1e-5
    relative and the same params."""
    names = [f"{fam}/manual/{m}" for fam, meshes in FAST.items() for m in meshes]
    assert len(names) == 5
    _assert_matches_one_device(fast, names)
    # The steps did move the loss, so equal losses are not three copies of the initial one.
    ref = fast["losses"]["llama/auto/one_device"]
    assert ref[0] - ref[-1] > 0.05, ref


def expected_per_layer(family: str, mesh: str, remat: str) -> dict[str, int]:
    """The collectives docs/sharding.md lists for one block of the manual step, from the param
    table (nj.model.param_specs) and the mesh: per weight split on fsdp one all-gather forward
    (again in the backward under remat) and one reduce-scatter of its gradient; 2 all-reduces
    forward and 2 backward for tensor parallelism (+1 under remat: the recomputed attention sum;
    the MLP's is not needed); per weight whose gradient still needs summing over data, sequence or
    (not split on it) fsdp, one all-reduce; 2 collective-permutes (K and V) per ring hop, S - 1 hops
    forward, as many backward, and again when recomputed."""
    cfg = model_cfg(family)
    sizes = {"data": 1, "fsdp": 1, "sequence": 1, "tensor": 1, **MANUAL_MESHES[mesh]}
    layer = nj.model.param_specs(cfg)["layers"][0]
    leaves = [s for part in layer.values() for s in part.values()]
    f = sizes["fsdp"]
    split_fsdp = [s for s in leaves
                  if f > 1 and "embed" in s.axes and s.shape[s.axes.index("embed")] % f == 0]
    summed = [s for s in leaves if sizes["data"] > 1 or sizes["sequence"] > 1
              or (sizes["fsdp"] > 1 and s not in split_fsdp)]
    again = remat != "none"
    tensor_sums = (4 + again) if sizes["tensor"] > 1 else 0
    return {"all_gather": len(split_fsdp) * (1 + again), "reduce_scatter": len(split_fsdp),
            "all_reduce": tensor_sums + len(summed),
            "collective_permute": 2 * (sizes["sequence"] - 1) * (2 + again)}


def test_manual_step_has_the_documented_collectives_per_layer(fast):
    for family, mesh, remat in COUNTED:
        key = f"{family}/{mesh}/{remat}"
        assert fast["counts"][key] == expected_per_layer(family, mesh, remat), key
    # Spelled out for one case (docs/sharding.md's table): Llama's 9 weights per block.
    assert fast["counts"]["llama/fsdp4_tensor2/none"] == {
        "all_gather": 9, "reduce_scatter": 9, "all_reduce": 4, "collective_permute": 0}


def test_fsdp_argument_bytes_fall_one_over_n(fast):
    """Params, momenta and batch per device: fsdp 8 holds ~1/8 of what data 8 (fsdp 1) holds."""
    ratio = fast["argument_bytes/fsdp8"] * 8 / fast["argument_bytes/data8"]
    assert 0.9 <= ratio <= 1.1, (ratio, fast["argument_bytes/fsdp8"], fast["argument_bytes/data8"])


def test_remat_full_lowers_temp_bytes_with_equal_numbers(fast):
    """Llama with scan_layers on fsdp 8, manual step: remat=full's temporaries are under 0.7x
    remat=none's, with the same losses and params after 3 steps."""
    none, full = fast["remat_temp_bytes/none"], fast["remat_temp_bytes/full"]
    assert full < 0.7 * none, (full, none)
    np.testing.assert_allclose(fast["losses"]["llama/manual/fsdp8_scan_full"],
                               fast["losses"]["llama/manual/fsdp8_scan_none"], rtol=1e-6)
    assert fast["remat_param_error"] <= 1.0, fast["remat_param_error"]  # so the gradients were equal


@pytest.mark.slow
def test_every_mesh_in_both_modes_matches_one_device():
    """The rest of the matrix: the 5 manual meshes and the 4 auto ones, GPT-2 and Llama."""
    res = _run_checks("slow")
    names = [k for k in res["losses"] if not k.endswith("one_device")]
    assert len(names) == 2 * (len(MANUAL_MESHES) + len(AUTO_MESHES)) - sum(len(v) for v in FAST.values())
    _assert_matches_one_device(res, names)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_of_four_devices_match_one_of_eight():
    """Real multi-controller JAX: 2 processes x 4 CPU devices (gloo) run the manual step on
    data 2 x fsdp 2 x tensor 2 and get the losses of 1 process x 8 devices."""
    coordinator = f"localhost:{_free_port()}"
    procs = [subprocess.Popen([sys.executable, __file__, "multi", coordinator, "2", str(i)], text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=_env(4))
             for i in range(2)]
    single = subprocess.run([sys.executable, __file__, "multi", "-", "1", "0"], capture_output=True,
                            text=True, env=_env(8), timeout=600)
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert single.returncode == 0, single.stderr[-3000:]
    assert all(p.returncode == 0 for p in procs), "".join(o[-3000:] for o in outs)

    def losses(text):
        return json.loads([ln for ln in text.splitlines() if ln.startswith("LOSSES ")][-1][7:])

    ref = losses(single.stdout)
    for out in outs:
        np.testing.assert_allclose(losses(out), ref, rtol=1e-5)


if __name__ == "__main__":
    if sys.argv[1] == "multi":
        multiprocess_main(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    else:
        print(json.dumps(checks(sys.argv[1])))
