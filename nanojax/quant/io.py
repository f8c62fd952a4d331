"""A quantized model directory: safetensors for the arrays, JSON for everything else, no pickle.

    save_quantized(qparams, cfg, "out/sc_int8", tokenizer=tok)
    cfg, qparams, tok = load_quantized("out/sc_int8")      # the same records back

Layout of the directory:
    model.safetensors   one tensor per array leaf, named by its path ("layers.0.attn.wq.q",
                        "layers.0.attn.wq.scale", "ln_f.scale", "wte.matrix.q", ...)
    quant.json          {"format": "nanojax-quantized", "version": 1, "model": ModelConfig dict,
                         "records": {path: {"kind": "matrix"|"table", "bits", "group_size",
                         "shape"}}}
    tokenizer file      as a training workdir holds it (tokenizer_char.json or tokenizer.json)
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file, save_file

from nanojax.config import ModelConfig
from nanojax.quant.arrays import QuantizedMatrix, QuantizedTable, is_quantized

FORMAT, VERSION = "nanojax-quantized", 1
META, WEIGHTS = "quant.json", "model.safetensors"


def _name(keypath: Any) -> str:
    return ".".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in keypath)


def save_quantized(params: Any, cfg: ModelConfig, directory: str | os.PathLike,
                   tokenizer: Any = None) -> Path:
    """Writes a (quantized or float) params tree, its config and tokenizer to `directory`."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, np.ndarray] = {}
    records: dict[str, dict[str, Any]] = {}
    for kp, x in jax.tree_util.tree_flatten_with_path(params, is_leaf=is_quantized)[0]:
        name = _name(kp)
        if isinstance(x, QuantizedTable | QuantizedMatrix):
            m = x.matrix if isinstance(x, QuantizedTable) else x
            records[name] = {"kind": "table" if isinstance(x, QuantizedTable) else "matrix",
                             "bits": m.bits, "group_size": m.group_size, "shape": list(m.shape),
                             "scale_dtype": str(m.scale.dtype),
                             "kernel_activations": m.kernel_activations}
            tensors[name + ".q"] = np.asarray(m.q)
            tensors[name + ".scale"] = np.asarray(m.scale.astype(jnp.float32))
        else:
            tensors[name] = np.asarray(jnp.asarray(x).astype(jnp.float32)) \
                if x.dtype == jnp.bfloat16 else np.asarray(x)
    tmp = out / (WEIGHTS + ".tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, out / WEIGHTS)
    meta = {"format": FORMAT, "version": VERSION, "model": cfg.to_dict(), "records": records}
    (out / META).write_text(json.dumps(meta, indent=1))
    if tokenizer is not None:
        tokenizer.save(out)
    return out


def is_quantized_dir(directory: str | os.PathLike) -> bool:
    return (Path(directory) / META).is_file()


def load_quantized(directory: str | os.PathLike) -> tuple[ModelConfig, Any, Any]:
    """(ModelConfig, params with the records restored, tokenizer or None) from `directory`."""
    from nanojax.model import param_specs
    from nanojax.tokenizer import load_tokenizer

    d = Path(directory)
    if not (d / META).is_file() or not (d / WEIGHTS).is_file():
        raise FileNotFoundError(f"{d} is not a quantized model directory: expected {META} and {WEIGHTS} "
                                "(write one with scripts/quantize.py)")
    meta = json.loads((d / META).read_text())
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise ValueError(f"{d / META}: format {meta.get('format')!r} v{meta.get('version')!r}, expected "
                         f"{FORMAT!r} v{VERSION}")
    cfg = ModelConfig.from_dict(meta["model"])
    tensors = load_file(str(d / WEIGHTS))
    records = meta["records"]
    wdt = cfg.weight_dtype

    def leaf(kp: Any, spec: Any) -> Any:
        name = _name(kp)
        if name in records:
            r = records[name]
            m = QuantizedMatrix(jnp.asarray(tensors[name + ".q"]),
                                jnp.asarray(tensors[name + ".scale"], r.get("scale_dtype", "float32")),
                                int(r["bits"]), int(r["group_size"]), tuple(r["shape"]),
                                r.get("kernel_activations", "fp32"))
            return QuantizedTable(m) if r["kind"] == "table" else m
        if name not in tensors:
            raise ValueError(f"{d / WEIGHTS} lacks tensor {name!r} that the config's model needs")
        return jnp.asarray(tensors[name], wdt)

    specs = param_specs(cfg)
    flat, treedef = jax.tree_util.tree_flatten_with_path(specs, is_leaf=lambda x: hasattr(x, "init"))
    params = jax.tree_util.tree_unflatten(treedef, [leaf(kp, s) for kp, s in flat])
    try:
        tok = load_tokenizer(d)
    except FileNotFoundError:
        tok = None
    return cfg, params, tok
