"""PEFT's LoRA format, both ways: `adapter_config.json` + `adapter_model.safetensors`.

    adapter = nj.load_lora("peft_dir", cfg)        # what PeftModel.save_pretrained wrote
    nj.save_lora(adapter, cfg, "out_dir")          # PeftModel.from_pretrained(base, "out_dir") loads it

Tensor names are PEFT's, without the adapter name: `base_model.model.<HF module path>.lora_A.weight`
(r, I) and `.lora_B.weight` (O, r): nn.Linear layouts, also for GPT-2's Conv1D modules (PEFT
builds its lora_A/lora_B as Linear either way; `fan_in_fan_out` only tells it how to merge). E.g.
`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight` (Llama),
`base_model.model.transformer.h.0.attn.c_attn.lora_B.weight` (GPT-2, 3D rows: q | k | v).

PEFT features nanojax does not compute are refused by name, never ignored: DoRA, modules_to_save,
layers_to_transform, rank/alpha patterns, trainable biases, target_parameters, ...
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from nanojax.config import ModelConfig
from nanojax.lora.adapter import LoraAdapter, LoraError, check_adapter, check_hparams, family, modules

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"

# adapter_config.json keys whose non-default values change what the adapter computes and that
# nanojax does not implement: key -> (the default that is fine, what the feature is).
_UNSUPPORTED: dict[str, tuple[Any, str]] = {
    "use_dora": (False, "DoRA (weight-decomposed LoRA)"),
    "modules_to_save": (None, "modules_to_save (fully trained extra modules)"),
    "layers_to_transform": (None, "layers_to_transform (adapters on some layers only)"),
    "layers_pattern": (None, "layers_pattern"),
    "rank_pattern": ({}, "rank_pattern (per-module ranks)"),
    "alpha_pattern": ({}, "alpha_pattern (per-module alphas)"),
    "bias": ("none", "trainable biases (bias != 'none')"),
    "lora_bias": (False, "lora_bias (a bias on lora_B)"),
    "target_parameters": (None, "target_parameters (adapters on nn.Parameters)"),
    "trainable_token_indices": (None, "trainable_token_indices"),
    "layer_replication": (None, "layer_replication"),
    "use_qalora": (False, "QA-LoRA"),
    "alora_invocation_tokens": (None, "activated LoRA (alora_invocation_tokens)"),
}


def _prefix(cfg: ModelConfig) -> str:
    return "base_model.model." + ("transformer.h." if family(cfg) == "gpt2" else "model.layers.")


def _is_default(value: Any, default: Any) -> bool:
    if default is None or default == {}:
        return value in (None, {}, [], "")
    return value == default


def load_lora(path: str | Path, cfg: ModelConfig) -> LoraAdapter:
    """A LoraAdapter from a PEFT LoRA directory, checked against the base model `cfg`.

    A and B are float32: a (I, r) = lora_A.weight.T, b (r, O) = lora_B.weight.T.
    Raises LoraError naming any unsupported PEFT feature, unknown tensor or shape mismatch.
    """
    from safetensors.numpy import load_file

    path = Path(path)
    if not (path / CONFIG_FILE).is_file() or not (path / WEIGHTS_FILE).is_file():
        raise LoraError(f"{path} is not a PEFT LoRA directory: expected {CONFIG_FILE} and {WEIGHTS_FILE} "
                        "(PeftModel.save_pretrained writes both; an adapter_model.bin is not read: save "
                        "with safe_serialization=True)")
    try:
        pc = json.loads((path / CONFIG_FILE).read_text())
    except json.JSONDecodeError as e:
        raise LoraError(f"{path / CONFIG_FILE} is not valid JSON ({e})") from None
    if pc.get("peft_type") != "LORA":
        raise LoraError(f"{path / CONFIG_FILE}: peft_type={pc.get('peft_type')!r}; only 'LORA' adapters load")
    bad = [f"{what} ({key}={pc[key]!r})" for key, (default, what) in _UNSUPPORTED.items()
           if key in pc and not _is_default(pc[key], default)]
    if bad:
        raise LoraError(f"{path / CONFIG_FILE} uses PEFT features nanojax does not support: "
                        f"{'; '.join(bad)}. "
                        "nanojax would compute a different model; retrain or export without them.")
    rank, alpha, rslora = pc.get("r"), pc.get("lora_alpha"), bool(pc.get("use_rslora", False))
    check_hparams(rank, alpha, pc.get("lora_dropout", 0.0) or 0.0)

    tensors = load_file(str(path / WEIGHTS_FILE))
    mods = modules(cfg)
    by_hf = {m.hf: k for k, m in mods.items()}
    pattern = re.compile(re.escape(_prefix(cfg)) + r"(\d+)\.(.+)\.lora_([AB])\.weight")
    weights: list[dict[str, dict[str, jax.Array]]] = [{} for _ in range(cfg.n_layer)]
    for name, x in tensors.items():
        m = pattern.fullmatch(name)
        if not m or m.group(2) not in by_hf:
            raise LoraError(f"{path / WEIGHTS_FILE}: tensor {name!r} is not a LoRA A/B of a module nanojax "
                            f"supports for a {family(cfg)} model (expected names like "
                            f"{_prefix(cfg)}0.{next(iter(mods.values())).hf}.lora_A.weight)")
        layer, key = int(m.group(1)), by_hf[m.group(2)]
        if layer >= cfg.n_layer:
            raise LoraError(f"{path / WEIGHTS_FILE}: tensor {name!r} is for layer {layer}, but the base "
                            f"model has {cfg.n_layer} layers; the adapter was made for another base")
        weights[layer].setdefault(key, {})["a" if m.group(3) == "A" else "b"] = x
    targets = tuple(k for k in mods if any(k in w for w in weights))
    if not targets:
        raise LoraError(f"{path / WEIGHTS_FILE} holds no LoRA tensors")
    out = []
    for i, w in enumerate(weights):
        if set(w) != set(targets) or any(set(ab) != {"a", "b"} for ab in w.values()):
            raise LoraError(f"{path / WEIGHTS_FILE}: layer {i} has LoRA tensors for {sorted(w)} "
                            f"(each needs A and B); other layers have {list(targets)}. Partial adapters "
                            "are not supported.")
        layer = {}
        for key, ab in w.items():
            a, b = np.asarray(ab["a"]), np.asarray(ab["b"])
            mod = mods[key]
            if a.shape != (rank, mod.in_dim) or b.shape != (mod.out_dim, rank):
                raise LoraError(f"{path / WEIGHTS_FILE}: layer {i} {mod.hf}: lora_A {list(a.shape)}, lora_B "
                                f"{list(b.shape)}; the base model with r={rank} needs lora_A "
                                f"{[rank, mod.in_dim]}, lora_B {[mod.out_dim, rank]}. The adapter was made "
                                "for another base model.")
            layer[key] = {"a": jnp.asarray(a.T.astype(np.float32)), "b": jnp.asarray(b.T.astype(np.float32))}
        out.append(layer)
    adapter = LoraAdapter(out, targets, int(rank), float(alpha), rslora, float(pc.get("lora_dropout") or 0.0))
    check_adapter(adapter, cfg)
    return adapter


def save_lora(adapter: LoraAdapter, cfg: ModelConfig, path: str | Path, *,
              base_model_name_or_path: str | None = None, overwrite: bool = False) -> Path:
    """Writes `adapter` as a PEFT LoRA directory (float32 tensors); returns the directory.

    `path` must be absent or empty unless `overwrite`. GPT-2's modules are Conv1D, so
    fan_in_fan_out is true there, as PEFT sets it."""
    from safetensors.numpy import save_file

    from nanojax.outdir import check_target, replace_dir

    check_adapter(adapter, cfg)
    target = Path(path)
    check_target(target, overwrite=overwrite)
    mods = modules(cfg)
    tensors = {}
    for i, w in enumerate(adapter.weights):
        for key, ab in w.items():
            name = f"{_prefix(cfg)}{i}.{mods[key].hf}"
            tensors[f"{name}.lora_A.weight"] = np.ascontiguousarray(np.asarray(ab["a"], np.float32).T)
            tensors[f"{name}.lora_B.weight"] = np.ascontiguousarray(np.asarray(ab["b"], np.float32).T)
    gpt2 = family(cfg) == "gpt2"
    # Module names PEFT matches by suffix ("attn.c_proj" is not the MLP's c_proj).
    names = [k if gpt2 else mods[k].hf.split(".")[-1] for k in adapter.targets]
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "revision": None, "inference_mode": True, "r": adapter.rank, "lora_alpha": adapter.alpha,
        "lora_dropout": adapter.dropout, "use_rslora": adapter.rslora, "target_modules": names,
        "fan_in_fan_out": gpt2, "bias": "none", "use_dora": False, "modules_to_save": None,
        "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {},
        "init_lora_weights": True, "lora_bias": False,
    }
    with replace_dir(target, overwrite=overwrite) as out:
        save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
        (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return target
