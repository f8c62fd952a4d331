"""Compile a config's train step and print what XLA says it costs, without training.

    python scripts/cost.py --config=configs/shakespeare_char_cpu.py
    python scripts/cost.py --config=configs/gpt2_124m.py --config.grad_accum=1 --config.batch_size=2

Prints cost_analysis() FLOPs and bytes next to nanojax's analytic FLOPs (metrics.flops_per_token),
and memory_analysis(): arguments (params + optimizer state + batch), outputs and temporaries, per
device. Any mesh, on simulated CPU devices (--devices=N, set before JAX starts):

    python scripts/cost.py --config=configs/gpt2_124m.py --devices=8 --config.mesh.data=1 \
        --config.mesh.fsdp=8 --config.sharding_mode=manual --config.remat=full --config.batch_size=8
"""

import os
import re
import sys
from pathlib import Path

# --devices must reach XLA before jax is imported.
_devices = next((m.group(1) for a in sys.argv if (m := re.fullmatch(r"--devices=(\d+)", a))), None)
if _devices:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={_devices}").strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import nanojax  # noqa: E402,F401
from nanojax import data as data_lib  # noqa: E402
from nanojax.kernels import cpu_attention, cpu_gemm  # noqa: E402
from nanojax.metrics import flops_per_token  # noqa: E402
from nanojax.train import build, model_config_from  # noqa: E402

config_flags.DEFINE_config_file("config", None, "A configs/*.py file.", lock_config=True)
flags.DEFINE_integer("devices", None, "Simulate this many CPU devices (for --config.mesh.* meshes).")
flags.mark_flags_as_required(["config"])
FLAGS = flags.FLAGS


def step_cost(config) -> dict:
    """Analytic and compiled cost of one optimizer step of `config` (a training ConfigDict)."""
    vocab = None
    if not config.model.vocab_size:
        try:
            vocab = data_lib.load_meta(config.data_dir)["vocab_size"]
        except FileNotFoundError as e:
            raise app.UsageError(f"{e}\nOr give the vocabulary: --config.model.vocab_size=N") from None
    cfg = model_config_from(config, vocab)
    run = build(config, cfg)
    # XLA counts the FLOPs of the ops it compiles, not of custom calls: trace the attention and the
    # dense products as XLA's dots here, so its count covers the whole step (the CPU kernels do the
    # same work).
    with cpu_attention.train_attention_kernel(False), cpu_gemm.gemm_kernel(False):
        compiled = run.step_fn.lower(*run.abstract_step_args(config.batch_size, config.grad_accum)).compile()
    ca = compiled.cost_analysis()
    ca = ca[0] if isinstance(ca, list) else ca
    mem = compiled.memory_analysis()
    params, opt_state = run.abstract_step_args(config.batch_size, config.grad_accum)[:2]
    nbytes = lambda tree: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))  # noqa: E731
    tokens = config.batch_size * config.grad_accum * cfg.max_seq_len
    return {
        "cfg": cfg,
        "tokens": tokens,
        "analytic_flops": flops_per_token(cfg, cfg.max_seq_len) * tokens,
        "xla_flops": ca.get("flops", float("nan")),
        "xla_bytes": ca.get("bytes accessed", float("nan")),
        "memory": mem,
        "mesh": run.mesh,
        "mode": config.get("sharding_mode", "auto"),
        "param_bytes": nbytes(params),
        "opt_bytes": nbytes(opt_state),
    }


def main(argv):
    del argv
    c = step_cost(FLAGS.config)
    cfg, mem = c["cfg"], c["memory"]
    gib = 2.0**30
    print(f"model: {cfg.num_params():,} params ({cfg.num_params(False):,} non-embedding), "
          f"{c['tokens']:,} tokens per step")
    print(f"FLOPs per step: XLA cost_analysis {c['xla_flops']:.4g}, analytic 6N + attention "
          f"{c['analytic_flops']:.4g} (ratio {c['xla_flops'] / c['analytic_flops']:.3f})")
    print(f"bytes accessed per step (XLA): {c['xla_bytes'] / gib:.3f} GiB")
    print(f"state: params {c['param_bytes'] / gib:.3f} GiB, optimizer {c['opt_bytes'] / gib:.3f} GiB")
    mesh = ", ".join(f"{a}={n}" for a, n in c["mesh"].shape.items())
    print(f"mesh: {mesh} ({c['mesh'].size} devices), sharding_mode={c['mode']}, remat={cfg.remat}")
    if mem is not None:
        mib = 2.0**20
        print(f"memory per device: arguments {mem.argument_size_in_bytes / mib:.3f} MiB (params + optimizer "
              f"+ batch), outputs {mem.output_size_in_bytes / mib:.3f} MiB, aliased (donated) "
              f"{mem.alias_size_in_bytes / mib:.3f} MiB, temporaries {mem.temp_size_in_bytes / mib:.3f} MiB")
        whole = c["param_bytes"] + c["opt_bytes"]
        print(f"  params + optimizer whole: {whole / mib:.3f} MiB; per device they are "
              f"{mem.argument_size_in_bytes / whole:.3f} of it (arguments include the batch)")


if __name__ == "__main__":
    app.run(main)
