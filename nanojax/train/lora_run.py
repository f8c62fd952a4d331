"""LoRA fine-tuning: the frozen base, its fingerprint, and the compiled run over the adapter only.

    python scripts/train.py --config=configs/shakespeare_char_cpu.py --workdir=out/ft \\
        --config.lora.rank=8 --config.lora.targets=q,v --config.lora.base=out/base

With `lora.rank > 0` the model is the base's (a training workdir or an HF directory); the
"params" the loop trains, checkpoints and resumes are the adapter's weights (LoraAdapter.weights),
and the optimizer state is theirs alone. The base is an extra, non-donated argument of the jitted
step, differentiated nowhere (value_and_grad w.r.t. the adapter), so it has no gradient and no
optimizer state and comes out bitwise as it went in. config.json records the base's path and a
fingerprint of its arrays; a resume (or `load_lora_workdir`) refuses a base that changed.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import jax
import ml_collections

from nanojax import sharding as shd
from nanojax.checkpoint import Checkpointer, fingerprints
from nanojax.config import ModelConfig
from nanojax.lora import LoraAdapter, LoraError, init_lora
from nanojax.model import Params
from nanojax.optim import lr_schedule, make_optimizer
from nanojax.quant import quantize
from nanojax.train.step import Run, loss_fn, make_eval_step, make_eval_sum_step, make_train_step


def lora_enabled(config: ml_collections.ConfigDict) -> bool:
    lora = config.get("lora")
    return lora is not None and bool(lora.get("rank", 0))


def load_base(path: str | Path) -> tuple[ModelConfig, Params]:
    """(cfg, params) of a base model: a nanojax training workdir (its newest checkpoint) or a
    Hugging Face directory (config.json + safetensors)."""
    from nanojax.checkpoint import load_checkpoint
    from nanojax.interop import load_hf

    path = Path(path)
    if (path / "checkpoints").is_dir():
        cfg, params, _ = load_checkpoint(path)
        return cfg, params
    if (path / "config.json").is_file() and any(path.glob("*.safetensors*")):
        return load_hf(path)
    raise LoraError(f"lora.base={str(path)!r} is neither a nanojax training workdir (with checkpoints/) nor "
                    "a Hugging Face model directory (config.json + *.safetensors); set --config.lora.base")


def base_fingerprint(params: Params) -> str:
    """A short hash of every array of the base (checkpoint.py's per-leaf checksums, by path)."""
    text = json.dumps(fingerprints(params), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def adapter_template(config: ml_collections.ConfigDict, cfg: ModelConfig, key: jax.Array) -> LoraAdapter:
    """A fresh adapter from config.lora (alpha 0 means the rank: scaling 1)."""
    c = config.lora
    return init_lora(cfg, key, rank=c.rank, targets=c.targets, alpha=c.alpha or c.rank,
                     dropout=c.dropout, rslora=c.rslora)


def quantize_base(config: ml_collections.ConfigDict, cfg: ModelConfig, base: Params) -> Params:
    """The base as the run uses it: quantized by `nj.quantize` when config.lora.quantize names a
    scheme (QLoRA: "int8" per channel, "int4" group 32; embeddings stay float), else unchanged."""
    scheme = config.lora.get("quantize", "")
    return quantize(base, cfg, scheme, embeddings=False) if scheme else base


def build_lora(config: ml_collections.ConfigDict, cfg: ModelConfig, base: Params) -> tuple[Run, LoraAdapter]:
    """Run over the adapter's weights, the base bound into every call (see the module docstring).

    Returns (run, template): run.step_fn(weights, opt_state, x, y, step) etc. as in `build`,
    template the adapter whose static fields (targets, rank, alpha, ...) the weights go with.
    """
    mesh = shd.make_mesh(**config.mesh.to_dict())
    template = adapter_template(config, cfg, jax.random.key(config.seed))
    schedule = lr_schedule(config.lr, config.warmup_steps, config.max_steps, config.min_lr)
    # Every adapter matrix decays alike (optim.decay_mask would read B's key "b" as a bias).
    optimizer = make_optimizer(schedule, weight_decay=config.weight_decay, b1=config.b1, b2=config.b2,
                               grad_clip=config.grad_clip,
                               mask=lambda tree: jax.tree.map(lambda _: True, tree))
    repl = shd.replicated(mesh)  # the adapter is small: every device holds all of it
    base = quantize_base(config, cfg, base)
    # A quantized base (QLoRA) is replicated: the logical-axis rules name plain arrays only.
    p_sh = repl if config.lora.get("quantize") else shd.param_shardings(cfg, mesh)
    base = jax.device_put(base, p_sh)
    batch_sh, eval_sh = shd.batch_sharding(mesh, ndim=3), shd.batch_sharding(mesh)

    def loss(weights, x, y, cfg, rng, base):
        return loss_fn(base, x, y, cfg, rng, lora=template.replace(weights=weights))

    step = jax.jit(make_train_step(cfg, optimizer, config.seed, schedule, mesh, loss=loss,
                                   use_dropout=cfg.dropout > 0 or template.dropout > 0),
                   in_shardings=(repl, repl, batch_sh, batch_sh, repl, p_sh),
                   out_shardings=(repl, repl, repl), donate_argnums=(0, 1))
    eval_one, eval_sum = make_eval_step(cfg, mesh), make_eval_sum_step(cfg, mesh)

    ev = jax.jit(lambda w, x, y, base: eval_one(base, x, y, lora=template.replace(weights=w)),
                 in_shardings=(repl, eval_sh, eval_sh, p_sh), out_shardings=repl)
    ev_sum = jax.jit(lambda w, x, y, m, base: eval_sum(base, x, y, m, lora=template.replace(weights=w)),
                     in_shardings=(repl, eval_sh, eval_sh, eval_sh, p_sh), out_shardings=repl)

    def init(key):
        weights = adapter_template(config, cfg, key).weights
        return weights, optimizer.init(weights)

    def step_fn(w, o, x, y, s):
        return step(w, o, x, y, s, base)

    step_fn.lower = lambda w, o, x, y, s: step.lower(w, o, x, y, s, base)  # the profile's HLO (loop.py)
    run = Run(cfg, mesh, optimizer, repl, repl, batch_sh, eval_sh,
              step_fn=step_fn,
              eval_fn=lambda w, x, y: ev(w, x, y, base),
              init_fn=jax.jit(init, out_shardings=(repl, repl)),
              eval_sum_fn=lambda w, x, y, m: ev_sum(w, x, y, m, base))
    return run, template


def count_frozen(params: Params) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(params))


def check_base(saved: dict[str, Any] | None, path: str, fingerprint: str, workdir: Path) -> None:
    """Refuses to resume (or load) a LoRA run over a base that is not the one it was trained on."""
    if saved and saved.get("fingerprint") != fingerprint:
        raise LoraError(
            f"{workdir} holds a LoRA run over a base with fingerprint {saved.get('fingerprint')} "
            f"({saved.get('path')}); {path} now has fingerprint {fingerprint}: the base changed. Point "
            "--config.lora.base at the original base, or start a new --workdir.")


def load_lora_workdir(workdir: str | Path) -> tuple[ModelConfig, Params, LoraAdapter, Any]:
    """(cfg, base params, adapter, tokenizer) of a LoRA fine-tuning workdir: the base from the
    path config.json records (its fingerprint checked), the adapter from the newest checkpoint."""
    from nanojax.tokenizer import load_tokenizer

    workdir = Path(workdir)
    path = workdir / "config.json"
    if not path.is_file():
        raise LoraError(f"{path} not found: {workdir} is not a nanojax training workdir")
    saved = json.loads(path.read_text())
    ref = saved.get("lora_base")
    if not ref:
        raise LoraError(f"{workdir} is not a LoRA run (its config.json has no lora_base); load it with "
                        "nj.load_checkpoint")
    cfg, base = load_base(ref["path"])
    check_base(ref, ref["path"], base_fingerprint(base), workdir)
    config = ml_collections.ConfigDict(saved["train"])
    template = adapter_template(config, cfg, jax.random.key(0))
    ckpt = Checkpointer(workdir / "checkpoints", save_every=1, read_only=True)
    try:
        found = ckpt.restore_newest(template.weights)
    finally:
        ckpt.close()
    if found is None:
        raise LoraError(f"no checkpoint in {workdir / 'checkpoints'}; train longer first")
    adapter = template.replace(weights=found.params)
    return cfg, quantize_base(config, cfg, base), adapter, load_tokenizer(workdir)


__all__ = ["adapter_template", "base_fingerprint", "build_lora", "check_base", "count_frozen",
           "load_base", "load_lora_workdir", "lora_enabled", "quantize_base"]
