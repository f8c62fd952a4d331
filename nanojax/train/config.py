"""The training config (ml_collections): its defaults, the ModelConfig it holds, and the check
of the whole config before anything is built (one line per problem, naming key, value and fix).
"""

from __future__ import annotations

import difflib
import math
import os
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np

from nanojax import data as data_lib
from nanojax import sharding as shd
from nanojax.config import REMAT, ModelConfig


def default_config(preset: str = "gpt2-small", **model_overrides: Any) -> ml_collections.ConfigDict:
    """Every training knob with its default; configs/*.py start from this and change a few.

    `model` holds every ModelConfig field, so any of them can be overridden from the command
    line (`--config.model.n_layer=6`).
    """
    from_data = model_overrides.get("vocab_size") == 0
    if from_data:
        model_overrides.pop("vocab_size")
    model = ModelConfig.preset(preset, **model_overrides).to_dict()
    if from_data:
        model["vocab_size"] = 0
    # Fields that default to None (derived from others) become typed placeholders, so that
    # `--config.model.d_ff=1024` works and an untouched d_ff still follows d_model.
    for name, typ in (("n_kv_head", int), ("head_dim", int), ("d_ff", int), ("qkv_bias", bool)):
        if model[name] is None:
            model[name] = ml_collections.config_dict.placeholder(typ)
    c = ml_collections.ConfigDict()
    c.model = ml_collections.ConfigDict(model)
    c.data_dir = "data/shakespeare_char"
    c.seed = 1337
    c.batch_size = 12  # sequences per micro-batch, across all devices
    c.grad_accum = 1  # micro-batches per optimizer update
    c.max_steps = 2000
    c.lr = 1e-3
    c.min_lr = 1e-4
    c.warmup_steps = 100
    c.weight_decay = 0.1
    # Decay the token and position embeddings too (nanoGPT does; OpenAI's GPT-2 code and many
    # recipes exclude them). Biases and norm scales are never decayed.
    c.decay_embeddings = False
    c.b1 = 0.9
    c.b2 = 0.99
    c.grad_clip = 1.0
    c.eval_every = 250
    c.eval_iters = 20
    # After the last step, also the val loss over the whole split, every token predicted once
    # (metrics.jsonl `val_loss_full`): comparable across tools, unlike eval_iters sampled batches.
    c.eval_full_at_end = True
    c.log_every = 1
    c.ckpt_every = 250
    c.keep_checkpoints = 2
    c.profile = ""  # "START:END": write a jax.profiler trace of those steps to workdir/profile
    # Sizes of the device mesh's axes (docs/sharding.md); one may be -1 for the rest of the devices.
    # sequence splits the context (ring attention) and needs sharding_mode="manual".
    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1, "sequence": 1})
    # "auto": jit + shardings, the compiler places the collectives; "manual": jax.shard_map with
    # each collective written out (nanojax/train/manual.py). Same numbers, same checkpoints.
    c.sharding_mode = "auto"
    # Gradient checkpointing per block: none|full|dots|dots_no_batch|names (ModelConfig.remat);
    # when set it replaces model.remat.
    c.remat = ml_collections.config_dict.placeholder(str)
    # LoRA fine-tuning (nanojax/train/lora_run.py): rank > 0 trains only an adapter over the frozen
    # `base` (a training workdir or an HF directory), whose model config replaces `model`.
    c.lora = ml_collections.ConfigDict({
        "rank": 0,  # 0: no LoRA, train the whole model
        "targets": "q,v",  # Llama: q,k,v,o,gate,up,down; GPT-2: c_attn,c_proj,c_fc (nanojax.lora)
        "alpha": 0.0,  # scaling alpha / rank; 0 means the rank (scaling 1)
        "dropout": 0.0,  # on the adapter's input only, as PEFT's lora_dropout
        "rslora": False,  # scaling alpha / sqrt(rank) (rsLoRA)
        "base": "",
        # QLoRA: "int8" or "int4" (group 32) holds the frozen base quantized (nj.quantize); "" keeps it
        # in its own dtype. The adapter trains in the compute dtype either way.
        "quantize": "",
    })
    return c


def model_config_from(config: ml_collections.ConfigDict, vocab_size: int | None = None) -> ModelConfig:
    """ModelConfig from `config.model`; vocab_size 0 there means 'take it from the data'."""
    d = dict(config.model.to_dict())
    if config.get("remat") is not None:
        d["remat"] = config.remat
    if not d.get("vocab_size") and vocab_size:
        d["vocab_size"] = vocab_size
    return ModelConfig.from_dict(d)


def _parse_profile(spec: str) -> tuple[int, int] | None:
    if not spec:
        return None
    try:
        start, end = (int(s) for s in spec.split(":"))
    except ValueError:
        raise ValueError(f"profile={spec!r}: expected START:END step numbers, e.g. 10:15") from None
    if not 0 <= start < end:
        raise ValueError(f"profile={spec!r}: need 0 <= START < END")
    return start, end


class ConfigError(ValueError):
    """A training config with bad values. `problems` holds one line per problem, each naming the
    key, its value and the fix; str(error) is those lines joined."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


# key, integer?, lowest allowed, is the lowest itself allowed?, upper bound (excluded), what it is.
# Bounds that make the loop misbehave rather than fail: batch_size 0 gives a NaN loss, eval_iters 0
# a NaN val loss, ckpt_every/eval_every/log_every 0 a ZeroDivisionError, a negative lr ascends.
_RANGES: tuple[tuple[str, bool, float, bool, float | None, str], ...] = (
    ("seed", True, 0, True, None, "seeds init, dropout and the batches"),
    ("batch_size", True, 1, True, None, "sequences per micro-batch, across all devices"),
    ("grad_accum", True, 1, True, None, "micro-batches per update; 1 means no accumulation"),
    ("max_steps", True, 1, True, None, "optimizer updates in the whole run"),
    ("lr", False, 0, False, None, "the peak learning rate"),
    ("min_lr", False, 0, True, None, "the rate the cosine decay ends at"),
    ("warmup_steps", True, 0, True, None, "steps of linear warmup, lr/(W+1) up to lr (nanoGPT's)"),
    ("weight_decay", False, 0, True, None, "AdamW's decoupled decay; 0 turns it off"),
    ("b1", False, 0, True, 1, "Adam's first-moment decay"),
    ("b2", False, 0, True, 1, "Adam's second-moment decay"),
    ("grad_clip", False, 0, True, None, "global-norm clip; 0 turns it off"),
    ("eval_every", True, 1, True, None, "steps between evaluations"),
    ("eval_iters", True, 1, True, None, "val batches per evaluation"),
    ("log_every", True, 1, True, None, "steps between metrics.jsonl lines"),
    ("ckpt_every", True, 1, True, None, "steps between checkpoints"),
    ("keep_checkpoints", True, 1, True, None, "checkpoints kept on disk"),
    ("model.vocab_size", True, 0, True, None, "0 takes the data's vocabulary"),
    ("model.n_layer", True, 1, True, None, "transformer blocks"),
    ("model.n_head", True, 1, True, None, "query heads"),
    ("model.d_model", True, 1, True, None, "residual width"),
    ("model.max_seq_len", True, 1, True, None, "context length in tokens"),
    ("model.n_kv_head", True, 1, True, None, "key/value heads; unset means n_head"),
    ("model.head_dim", True, 1, True, None, "per-head width; unset means d_model / n_head"),
    ("model.d_ff", True, 1, True, None, "MLP width; unset derives it from d_model"),
    ("model.dropout", False, 0, True, 1, "dropout probability while training"),
    ("model.norm_eps", False, 0, False, None, "the norms' epsilon"),
    ("model.rope_theta", False, 0, False, None, "the RoPE base"),
    ("model.init_std", False, 0, True, None, "std of the normal init"),
    ("model.pos_init_std", False, 0, True, None, "std of the learned position table's init"),
)
# train() reads these with a default
_OPTIONAL = ("profile", "keep_checkpoints", "eval_full_at_end", "sharding_mode", "remat", "lora")
_BOOLS = (("eval_full_at_end", "the whole-split val loss after the last step"),)


def _lookup(config: ml_collections.ConfigDict, key: str) -> tuple[bool, Any]:
    node: Any = config
    for part in key.split("."):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def _range_text(integer: bool, lo: float, lo_ok: bool, hi: float | None) -> str:
    kind = "an integer" if integer else "a number"
    if hi is not None:
        return f"{kind} in [{lo:g}, {hi:g})"
    return f"{kind} {'>=' if lo_ok else '>'} {lo:g}"


def _check_data_dir(config: ml_collections.ConfigDict, problems: list[str]) -> None:
    data_dir = config.get("data_dir")
    where = f"data_dir={data_dir!r}"
    prep = f"`python scripts/prepare_data.py --input=FILE --out_dir={data_dir}`"
    if not isinstance(data_dir, str) or not data_dir:
        problems.append(f"{where}: expected the path of a prepared data directory; set --config.data_dir")
        return
    d = Path(data_dir)
    if not d.is_dir():
        problems.append(f"{where}: no such directory; prepare it with {prep}, or set --config.data_dir")
        return
    try:
        meta = data_lib.load_meta(d)
        vocab, dtype = int(meta["vocab_size"]), np.dtype(meta["dtype"])
    except FileNotFoundError:
        problems.append(f"{where}: has no {data_lib.META}, so it is not a prepared data directory; "
                        f"run {prep}")
        return
    except PermissionError as e:
        problems.append(f"{where}: {e.filename} is not readable ({e.strerror}); fix its permissions")
        return
    except (ValueError, KeyError, TypeError) as e:
        problems.append(f"{where}: {d / data_lib.META} is damaged ({type(e).__name__}: {e}); "
                        f"re-run {prep}")
        return
    ok, T = _lookup(config, "model.max_seq_len")
    T = T if ok and isinstance(T, int) and T > 0 else None
    for split in ("train", "val"):
        path = d / f"{split}.bin"
        if not path.is_file() or path.stat().st_size == 0:
            problems.append(f"{where}: {path} is missing or empty; re-run {prep}")
        elif not os.access(path, os.R_OK):
            problems.append(f"{where}: {path} is not readable (permission denied); fix its permissions")
        elif T is not None and path.stat().st_size // dtype.itemsize < T + 1:
            n = path.stat().st_size // dtype.itemsize
            problems.append(
                f"{where}: {path} holds {n} tokens, fewer than seq_len + 1 = {T + 1} "
                f"(model.max_seq_len={T}); use more text, or a smaller --config.model.max_seq_len")
    ok, model_vocab = _lookup(config, "model.vocab_size")
    if ok and isinstance(model_vocab, int) and 0 < model_vocab < vocab:
        problems.append(
            f"model.vocab_size={model_vocab}: the data's tokenizer has {vocab} tokens but "
            f"model.vocab_size={model_vocab}; set --config.model.vocab_size >= {vocab} (or 0 for the "
            "data's)")


def _check_parallelism(config: ml_collections.ConfigDict, sizes: dict[str, int], mode: str,
                       n_proc: int, problems: list[str]) -> None:
    """What sequence and manual tensor parallelism need of the model (sizes: the resolved mesh)."""
    model = config.get("model")
    if not isinstance(model, ml_collections.ConfigDict) or any(p.startswith("model") for p in problems):
        return
    seq, tensor = sizes["sequence"], sizes["tensor"]
    T = model.get("max_seq_len")
    if seq > 1 and mode != "manual":
        problems.append(f"mesh.sequence={seq}: context parallelism (ring attention) runs in the manual "
                        "step only; set --config.sharding_mode=manual, or --config.mesh.sequence=1")
    if seq > 1 and isinstance(T, int) and T % seq:
        down = max(s for s in range(1, seq + 1) if T % s == 0)
        problems.append(f"model.max_seq_len={T}: not divisible by mesh.sequence={seq} (each sequence "
                        f"rank holds an equal block of tokens); set --config.model.max_seq_len="
                        f"{-(-T // seq) * seq}, or --config.mesh.sequence={down}")
    if seq > 1 and n_proc > 1 and (sizes["data"] * sizes["fsdp"]) % n_proc:
        problems.append(f"mesh.sequence={seq}: each of the {n_proc} processes loads whole rows, so the "
                        f"processes must split the batch (mesh.data x mesh.fsdp = "
                        f"{sizes['data'] * sizes['fsdp']}, a multiple of {n_proc}), not the tokens; "
                        "raise --config.mesh.data or --config.mesh.fsdp")
    if mode != "manual":
        return
    if model.get("dropout"):
        problems.append(f"model.dropout={model.dropout}: the manual step has no dropout; set "
                        "--config.model.dropout=0, or --config.sharding_mode=auto")
    d = dict(model.to_dict())
    d["vocab_size"] = d.get("vocab_size") or 1
    try:
        cfg = ModelConfig.from_dict(d)
    except (ValueError, TypeError):
        return  # named above
    for what, n, key in (("kv heads", cfg.kv_heads, "n_kv_head"), ("MLP width", cfg.ff_dim, "d_ff")):
        if tensor > 1 and n % tensor:
            problems.append(f"model.{key}={n}: the manual step splits the {what} across mesh.tensor="
                            f"{tensor} ranks, so it must be divisible by {tensor}; set "
                            f"--config.model.{key} to a multiple of {tensor}, or a smaller mesh.tensor")


def validate_config(config: ml_collections.ConfigDict, *, n_devices: int | None = None,
                    n_processes: int | None = None) -> None:
    """Checks a training config as a whole before anything is built or written.

    Every numeric field's range, the keys against default_config(), the mesh against the devices,
    the batch against the mesh's data x fsdp and the processes, the heads against mesh.tensor,
    the model's own consistency, and that data_dir is a readable prepared data directory.
    Raises ConfigError listing every problem, one line each. n_devices / n_processes default to
    jax.device_count() / jax.process_count().
    """
    problems: list[str] = []
    known = default_config()
    for key in config:
        if key not in known:
            close = difflib.get_close_matches(key, list(known), n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"known keys: {', '.join(sorted(known))}"
            problems.append(f"{key}: unknown config key; {hint}")
    for key in known:
        if key not in config and key not in _OPTIONAL:
            problems.append(f"{key}: missing from the config; start configs from "
                            "nanojax.train.default_config()")
    ok_values: dict[str, Any] = {}
    for key, integer, lo, lo_ok, hi, what in _RANGES:
        present, v = _lookup(config, key)
        if not present or (v is None and key.split(".")[-1] in ("n_kv_head", "head_dim", "d_ff")):
            continue
        good_type = isinstance(v, int) if integer else isinstance(v, int | float)
        good = (good_type and not isinstance(v, bool) and math.isfinite(v)
                and (v >= lo if lo_ok else v > lo) and (hi is None or v < hi))
        if good:
            ok_values[key] = v
        else:
            _, default = _lookup(known, key)
            example = f", e.g. {default!r}" if default is not None and not key.startswith("model.") else ""
            problems.append(f"{key}={v!r}: must be {_range_text(integer, lo, lo_ok, hi)} ({what}); "
                            f"set --config.{key} to one{example}")
    for key, what in _BOOLS:
        present, v = _lookup(config, key)
        if present and not isinstance(v, bool | np.bool_):
            problems.append(f"{key}={v!r}: must be True or False ({what}); set --config.{key}=true or "
                            "=false")
    lr, min_lr = ok_values.get("lr"), ok_values.get("min_lr")
    if lr is not None and min_lr is not None and min_lr > lr:
        problems.append(f"min_lr={min_lr!r}: above lr={lr!r}, so the rate would rise after warmup; set "
                        "--config.min_lr <= lr (e.g. lr / 10)")
    try:
        _parse_profile(config.get("profile", ""))
    except ValueError as e:
        problems.append(f"{e}; set --config.profile (or '' for no trace)")

    mode = config.get("sharding_mode", "auto")
    if mode not in ("auto", "manual"):
        problems.append(f"sharding_mode={mode!r}: must be 'auto' (jit + shardings) or 'manual' (shard_map "
                        "with explicit collectives); set --config.sharding_mode=auto or =manual")
    for key in ("remat", "model.remat"):
        present, v = _lookup(config, key)
        if present and v is not None and v not in REMAT and not isinstance(v, bool):
            problems.append(f"{key}={v!r}: must be one of {', '.join(REMAT)} (the activations each block "
                            f"keeps for the backward pass); set --config.{key}=full, for example")

    # The model as a whole: relations between its fields (GQA, head_dim, RoPE, the switches).
    model = config.get("model")
    model_ranges_ok = not any(p.startswith("model.") for p in problems)
    if isinstance(model, ml_collections.ConfigDict) and model_ranges_ok:
        n_head, d_model = model.get("n_head"), model.get("d_model")
        kv, head_dim = model.get("n_kv_head"), model.get("head_dim")
        if kv is not None and n_head % kv:
            divisors = [k for k in range(1, n_head + 1) if n_head % k == 0]
            problems.append(f"model.n_kv_head={kv}: must divide model.n_head={n_head} (each kv head serves "
                            f"an equal group of query heads); set --config.model.n_kv_head to one of "
                            f"{divisors}")
        if head_dim is None and d_model % n_head:
            problems.append(f"model.d_model={d_model}: not divisible by model.n_head={n_head}; set "
                            f"--config.model.d_model to a multiple of {n_head}, or set "
                            "--config.model.head_dim")
        elif model.get("pos_emb") == "rope" and (head_dim or d_model // n_head) % 2:
            problems.append(f"model.head_dim={head_dim or d_model // n_head}: RoPE rotates pairs of "
                            "channels, so the head dim must be even; set --config.model.head_dim (or "
                            "d_model / n_head) to an even number")
    if isinstance(model, ml_collections.ConfigDict) and not any(p.startswith("model.") for p in problems):
        d = dict(model.to_dict())
        if d.get("vocab_size") == 0:
            d["vocab_size"] = 1  # a stand-in: the data's vocabulary is filled in later
        try:
            ModelConfig.from_dict(d)
        except (ValueError, TypeError) as e:
            for part in str(e).removeprefix("Invalid ModelConfig: ").split("; "):
                problems.append(f"model: {part}; set that field with --config.model.<field>=...")

    # The mesh against the devices, and the batch and heads against the mesh.
    n_devices = jax.device_count() if n_devices is None else n_devices
    n_processes = jax.process_count() if n_processes is None else n_processes
    mesh = config.get("mesh")
    sizes = {}
    if isinstance(mesh, ml_collections.ConfigDict):
        for axis in shd.MESH_AXES:
            v = mesh.get(axis, 1)
            if isinstance(v, bool) or not isinstance(v, int) or (v < 1 and v != -1):
                problems.append(f"mesh.{axis}={v!r}: must be an integer >= 1, or -1 for 'the remaining "
                                f"devices'; set --config.mesh.{axis}")
            else:
                sizes[axis] = v
    if len(sizes) == len(shd.MESH_AXES):
        try:
            sizes = dict(zip(shd.MESH_AXES, shd.mesh_sizes(**sizes, n_devices=n_devices), strict=True))
        except ValueError as e:
            problems.append(str(e))
            sizes = {}  # no divisibility checks against a mesh that does not fit
    else:
        sizes = {}  # a bad size was named above: no divisibility checks against a broken mesh
    B = ok_values.get("batch_size")
    if sizes and B is not None:
        shards = sizes["data"] * sizes["fsdp"]
        if B % shards:
            up = -(-B // shards) * shards
            problems.append(
                f"batch_size={B}: not divisible by mesh data x fsdp = {sizes['data']} x {sizes['fsdp']}"
                f" = {shards} (each replica takes an equal share); set --config.batch_size={up} (a "
                f"multiple of {shards}), or change --config.mesh.data / --config.mesh.fsdp")
    if B is not None and B % n_processes:
        up = -(-B // n_processes) * n_processes
        problems.append(f"batch_size={B}: not divisible by the {n_processes} processes (each loads an "
                        f"equal share of the rows); set --config.batch_size={up}")
    heads = ok_values.get("model.n_head")
    if sizes and heads is not None and heads % sizes["tensor"]:
        fits = max(t for t in range(1, sizes["tensor"] + 1) if heads % t == 0)
        problems.append(f"model.n_head={heads}: not divisible by mesh.tensor={sizes['tensor']} (heads "
                        f"are split across tensor ranks); use --config.mesh.tensor={fits}, or a "
                        f"multiple of {sizes['tensor']} heads")

    if sizes:
        _check_parallelism(config, sizes, mode, n_processes, problems)
    _check_data_dir(config, problems)
    _check_lora(config, problems)
    if problems:
        raise ConfigError(problems)


def _check_lora(config: ml_collections.ConfigDict, problems: list[str]) -> None:
    lora = config.get("lora")
    if not isinstance(lora, ml_collections.ConfigDict):
        return
    rank = lora.get("rank", 0)
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
        problems.append(f"lora.rank={rank!r}: must be an integer >= 1 for LoRA, or 0 for none; set "
                        "--config.lora.rank (e.g. 8)")
        return
    if rank == 0:
        return
    alpha, dropout = lora.get("alpha", 0.0), lora.get("dropout", 0.0)
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not alpha >= 0:
        problems.append(f"lora.alpha={alpha!r}: must be a number > 0, or 0 for the rank; set "
                        "--config.lora.alpha")
    if isinstance(dropout, bool) or not isinstance(dropout, int | float) or not 0 <= dropout < 1:
        problems.append(f"lora.dropout={dropout!r}: must be in [0, 1); set --config.lora.dropout")
    scheme = lora.get("quantize", "")
    if scheme not in ("", "int8", "int4"):
        problems.append(f"lora.quantize={scheme!r}: must be 'int8' or 'int4' (QLoRA), or '' for an "
                        "unquantized base; set --config.lora.quantize")
    base = lora.get("base", "")
    if not base:
        problems.append("lora.base='': LoRA fine-tunes a base model; set --config.lora.base to a training "
                        "workdir or a Hugging Face model directory")
    elif not (Path(base) / "config.json").is_file():
        problems.append(f"lora.base={base!r}: no config.json there, so it is neither a training workdir "
                        "nor a Hugging Face model directory; set --config.lora.base")
