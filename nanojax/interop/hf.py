"""Hugging Face interop: GPT-2 and Llama-family checkpoints in and out, with the same logits.

    cfg, params = nj.load_hf("path/to/hf_dir")              # config.json + *.safetensors
    nj.save_hf(params, cfg, "out_dir", tokenizer=tok)        # AutoModelForCausalLM loads it

Supported: GPT2LMHeadModel, LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM. The last two
are Llama with a switch: Mistral is Llama (its sliding window must be inactive: nanojax has no
sliding-window attention), Qwen2 is Llama with biases on q, k and v only.

This module holds load_hf and save_hf (with the tokenizer copy) and the workdir conversions of
scripts/convert.py. The pieces they are made of: hf_config.py (config.json <-> ModelConfig),
layout.py (the name and shape of every tensor, HF <-> nanojax), safetensors_reader.py.

Loading reads one tensor at a time (safetensors, never pickle), converts it on the host to the
requested dtype and places it on the default device before reading the next, so the host never
holds more than one tensor of the checkpoint at a time.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import jax
import ml_dtypes
import numpy as np

from nanojax.config import ModelConfig
from nanojax.interop.hf_config import (
    SUPPORTED,
    HFFormatError,
    Path_,
    _arch_for,
    _config_from_hf,
    _config_to_hf,
    _read_hf_config,
)
from nanojax.interop.layout import PathT, _flat_specs, _ignorable, _iter_leaves, _layout, _unflatten
from nanojax.interop.safetensors_reader import _SafetensorsReader
from nanojax.model import Params
from nanojax.outdir import check_target, replace_dir

__all__ = ["SUPPORTED", "HFFormatError", "IMPORTED_OPT_STATE", "load_hf", "save_hf", "hf_to_workdir",
           "workdir_to_hf"]

_NP_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
_TOKENIZER_AUX = ("tokenizer_config.json", "special_tokens_map.json")


# ----------------------------------------------------------------------------------------------
# Public API.


def load_hf(path: Path_, dtype: str | None = None) -> tuple[ModelConfig, Params]:
    """(ModelConfig, params) from a Hugging Face model directory.

    Reads config.json and model.safetensors (or a sharded model.safetensors.index.json). Each
    tensor is converted on the host to `dtype` and placed on the default device before the next
    is read. The returned config has `dtype` and `param_dtype` both set to `dtype` (None: the
    checkpoint's own dtype from config.json, else float32) and dropout 0.

    Returns params shaped like `nj.init_params(cfg, key)`: e.g. wq (D, N, H), wte (V, D).
    Raises HFFormatError for anything that cannot be mapped exactly (naming what and why).
    """
    path = Path(path)
    hf = _read_hf_config(path)
    cfg, arch = _config_from_hf(hf, dtype)
    reader = _SafetensorsReader(path)
    layout = _layout(cfg, arch)
    expected = {e.name: e for e in layout}

    found: dict[str, str] = {}  # layout name -> name in the file
    extra = []
    for name in reader.names():
        if name in expected:
            found[name] = name
        elif arch.prefix + name in expected:  # saved from the base model, without the prefix
            found[arch.prefix + name] = name
        elif _ignorable(arch, name) or (name == "lm_head.weight" and arch.tied):
            continue  # buffers, or a tied head written out anyway (transformers ignores it too)
        else:
            extra.append(name)
    missing = [n for n in expected if n not in found]
    where = f"{path} ({arch.hf_class}, {cfg.n_layer} layers, tie_word_embeddings={arch.tied})"
    if missing:
        raise HFFormatError(
            f"{len(missing)} tensor(s) missing from {where}: {_few(missing)}. The weights do not match "
            "config.json; check that both come from the same model."
        )
    if extra:
        raise HFFormatError(
            f"{len(extra)} unexpected tensor(s) in {where}: {_few(extra)}. nanojax would silently drop "
            "them; the weights do not match config.json (e.g. a bias or layer count it does not declare)."
        )
    for e in layout:
        _, shape = reader.dtype_shape(found[e.name])
        if shape != e.shape:
            raise HFFormatError(
                f"tensor {found[e.name]!r} in {path} has shape {list(shape)}; expected {list(e.shape)} "
                f"from config.json. The weights do not match config.json."
            )

    specs = _flat_specs(cfg)
    target = _NP_DTYPES[cfg.param_dtype]
    leaves: dict[PathT, jax.Array] = {}
    for e in layout:  # one tensor on the host at a time
        parts = e.to_nj(reader.read(found[e.name]))
        for p, x in zip(e.paths, parts, strict=True):
            assert x.shape == specs[p].shape, (p, x.shape, specs[p].shape)
            leaves[p] = jax.device_put(np.ascontiguousarray(x, dtype=target))
    assert set(leaves) == set(specs), set(specs) ^ set(leaves)
    return cfg, _unflatten(cfg, leaves)


def _few(names: list[str], n: int = 8) -> str:
    return ", ".join(names[:n]) + (f", ... ({len(names) - n} more)" if len(names) > n else "")


def save_hf(params: Params, cfg: ModelConfig, path: Path_, tokenizer: Any = None, *,
            overwrite: bool = False) -> Path:
    """Writes `params` as a Hugging Face model directory that transformers loads with the same logits.

    Files: model.safetensors (tensors in `cfg.param_dtype`), config.json (GPT2LMHeadModel for the
    GPT-2 switches; LlamaForCausalLM, or Qwen2ForCausalLM for q/k/v-only biases, for the Llama
    switches), and tokenizer.json when `tokenizer` is given: an HFTokenizer, a CharTokenizer
    (written as a character-level WordLevel tokenizer.json), or a path to a tokenizer.json or a
    directory holding one. A tied head is not written (transformers ties it on load). Biases HF
    needs but `cfg` lacks (e.g. GPT-2 with bias=False) are written as zeros, which is exact.

    `path` must be absent or empty unless `overwrite`; then it is replaced whole (nothing of the
    old directory, e.g. a generation_config.json, survives) once the new files are complete.
    Returns the directory.
    """
    from safetensors.numpy import save_file

    arch = _arch_for(cfg)
    target = Path(path)
    check_target(target, overwrite=overwrite)  # refuse before converting any tensor
    specs = _flat_specs(cfg)
    given = dict(_iter_leaves(params))
    missing, extra = sorted(set(specs) - set(given), key=str), sorted(set(given) - set(specs), key=str)
    if missing or extra:
        raise HFFormatError(
            f"params do not match the config: missing {_few([_fmt(p) for p in missing])}; unexpected "
            f"{_few([_fmt(p) for p in extra])}. Expected the tree of nj.init_params(cfg, key)."
        )
    for p, spec in specs.items():
        if tuple(given[p].shape) != spec.shape:
            raise HFFormatError(f"param {_fmt(p)} has shape {list(given[p].shape)}; expected "
                                f"{list(spec.shape)} from the config.")
    dt = _NP_DTYPES[cfg.param_dtype]
    tensors = {}
    for e in _layout(cfg, arch):
        xs = [np.asarray(jax.device_get(given[p])) if p in given else np.zeros(s, dt)
              for p, s in zip(e.paths, e.nj_shapes, strict=True)]
        tensors[e.name] = np.ascontiguousarray(e.to_hf(xs), dtype=dt)
    with replace_dir(target, overwrite=overwrite) as out:
        save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
        hf_cfg = _config_to_hf(cfg, arch, cfg.param_dtype)
        if tokenizer is not None:
            eos = _copy_tokenizer(tokenizer, out)
            if eos is not None:
                hf_cfg.update(bos_token_id=eos, eos_token_id=eos)
        (out / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")
    return target


def _fmt(p: PathT) -> str:
    return "/".join(str(k) for k in p)


def _copy_tokenizer(tokenizer: Any, out: Path) -> int | None:
    """Writes tokenizer.json (+ a tokenizer_config.json) to `out`; returns the <|endoftext|> id if any."""
    from nanojax.tokenizer import CHAR_FILE, HF_FILE, CharTokenizer, HFTokenizer, load_tokenizer

    copied = False
    if isinstance(tokenizer, str | Path):
        src = Path(tokenizer)
        if src.is_dir() and (src / HF_FILE).exists():
            src = src / HF_FILE
        if src.is_file() and src.name != CHAR_FILE:  # a tokenizer.json: copy it and its HF companions
            if src.resolve() != (out / HF_FILE).resolve():
                shutil.copyfile(src, out / HF_FILE)
                for aux in _TOKENIZER_AUX:
                    if (src.parent / aux).exists():
                        shutil.copyfile(src.parent / aux, out / aux)
            tokenizer, copied = HFTokenizer.from_file(out / HF_FILE), True
        else:
            tokenizer = load_tokenizer(src)  # a char tokenizer; names what it expected if neither
    if isinstance(tokenizer, CharTokenizer):
        tokenizer = HFTokenizer(_char_to_tokenizers(tokenizer.chars))
    if not isinstance(tokenizer, HFTokenizer):
        raise TypeError(f"tokenizer: expected an HFTokenizer, CharTokenizer or path; got {type(tokenizer)}")
    if not copied:
        tokenizer.save(out)
    if not (out / "tokenizer_config.json").exists():  # lets AutoTokenizer.from_pretrained(out) load it
        (out / "tokenizer_config.json").write_text(
            json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}, indent=2) + "\n")
    return tokenizer.token_id("<|endoftext|>")


def _char_to_tokenizers(chars: str) -> Any:
    """A `tokenizers` Tokenizer with one token per character, in the CharTokenizer's id order."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({c: i for i, c in enumerate(chars)}, unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # every char
    tok.decoder = decoders.Fuse()  # join tokens without spaces
    return tok


# ----------------------------------------------------------------------------------------------
# Workdir conversion (scripts/convert.py).

# The optimizer state saved with imported params. Orbax refuses an empty tree, and an imported
# model has no optimizer state, so the checkpoint holds this one-scalar placeholder instead.
IMPORTED_OPT_STATE = {"imported_from_hf": np.zeros((), np.int32)}


def hf_to_workdir(hf_dir: Path_, workdir: Path_, dtype: str | None = None,
                  tokenizer: Path_ | None = None, *, overwrite: bool = False) -> Path:
    """Imports an HF model directory as a nanojax workdir that `nj.load_checkpoint` reads.

    Writes config.json ({"model": cfg.to_dict(), "train": {}}), tokenizer.json (from `tokenizer`
    or hf_dir) and an orbax checkpoint at step 0 holding the params and IMPORTED_OPT_STATE (a
    placeholder: there is no optimizer state to import). Refuses a workdir that is not empty
    unless `overwrite` (then it is replaced whole once the import is complete), and an HF dir
    without tokenizer.json (load_checkpoint needs one).
    """
    from nanojax.checkpoint import Checkpointer
    from nanojax.tokenizer import HF_FILE, HFTokenizer

    hf_dir, workdir = Path(hf_dir), Path(workdir)
    _config_from_hf(_read_hf_config(hf_dir), dtype)  # a bad config is named before anything else
    if not overwrite and ((workdir / "config.json").exists() or (workdir / "checkpoints").exists()):
        raise FileExistsError(f"{workdir} already holds a run (config.json or checkpoints/); nothing "
                              "was changed. Choose a new --workdir, or pass --overwrite to replace it.")
    tok_file = Path(tokenizer) if tokenizer else hf_dir / HF_FILE
    if tok_file.is_dir():
        tok_file = tok_file / HF_FILE
    if not tok_file.exists():
        raise FileNotFoundError(
            f"{tok_file} not found: a nanojax workdir needs a tokenizer.json for sampling. Write one "
            "with transformers (`AutoTokenizer.from_pretrained(d).save_pretrained(d)` saves "
            "tokenizer.json for fast tokenizers), or pass tokenizer=PATH (--tokenizer)."
        )
    HFTokenizer.from_file(tok_file)  # fail now, not at sampling time, if it does not parse
    check_target(workdir, overwrite=overwrite, inputs=(hf_dir, tok_file))
    cfg, params = load_hf(hf_dir, dtype)
    with replace_dir(workdir, overwrite=overwrite, inputs=(hf_dir, tok_file)) as out:
        shutil.copyfile(tok_file, out / HF_FILE)
        ckpt = Checkpointer(out / "checkpoints", save_every=1)
        ckpt.save(0, params, IMPORTED_OPT_STATE, force=True)
        ckpt.close()
        (out / "config.json").write_text(json.dumps({"model": cfg.to_dict(), "train": {}}, indent=2))
    return workdir


def workdir_to_hf(workdir: Path_, out_dir: Path_, step: int | None = None, *,
                  overwrite: bool = False) -> Path:
    """Exports a nanojax workdir's checkpoint (latest step by default) and tokenizer as an HF dir.
    out_dir must be absent or empty unless `overwrite` (see save_hf)."""
    from nanojax.checkpoint import load_checkpoint

    check_target(out_dir, overwrite=overwrite, inputs=(workdir,))  # before restoring anything
    cfg, params, tok = load_checkpoint(workdir, step)
    return save_hf(params, cfg, out_dir, tokenizer=tok, overwrite=overwrite)
