"""Loss, the jitted train and eval steps, and the training loop with resume.

The step is a pure function `(params, opt_state, batch, step) -> (params, opt_state, metrics)`
with donated state; its shardings come from nanojax.sharding, so one CPU and a pod differ only in
the mesh. The loop around it saves orbax checkpoints every N steps, at the end and on
SIGINT/SIGTERM, and rerunning the same command resumes from the latest one.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from nanojax import data as data_lib
from nanojax import sharding as shd
from nanojax.checkpoint import Checkpointer
from nanojax.config import ModelConfig
from nanojax.metrics import MetricsWriter, memory_stats, mfu, write_atomic
from nanojax.model import Params, forward, init_params, param_shapes
from nanojax.optim import lr_schedule, make_optimizer
from nanojax.tokenizer import load_tokenizer

CONFIG_FILE = "config.json"


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or inf loss or gradient; the state was not updated."""


class WorkdirMismatchError(ValueError):
    """The workdir holds a run of a different model."""


# ----------------------------------------------------------------------------------------------
# Loss and steps


def loss_fn(params: Params, x: jax.Array, y: jax.Array, cfg: ModelConfig,
            dropout_rng: jax.Array | None = None) -> jax.Array:
    """Mean next-token cross-entropy (nats). x, y: int32 (B, T)."""
    logits = forward(params, x, cfg, dropout_rng=dropout_rng)  # (B, T, V) float32
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def make_train_step(cfg: ModelConfig, optimizer: optax.GradientTransformation, seed: int,
                    schedule: optax.Schedule | None = None,
                    mesh: jax.sharding.Mesh | None = None) -> Callable:
    """The un-jitted step. x, y: int32 (A, B, T) with A micro-batches accumulated per update.

    With `schedule`, the metrics carry the step's learning rate too (computed on the device, so
    the host loop dispatches nothing but the step). With `mesh`, activations are pinned to it by
    logical axes while the step is traced (sharding.activation_sharding)."""
    base_key = jax.random.key(seed)

    def step_fn(params, opt_state, x, y, step):
        with shd.activation_sharding(mesh):
            return _step(params, opt_state, x, y, step)

    def _step(params, opt_state, x, y, step):
        use_dropout = cfg.dropout > 0
        rng = jax.random.fold_in(base_key, step)
        grad_fn = jax.value_and_grad(loss_fn)
        A = x.shape[0]
        if A == 1:
            loss, grads = grad_fn(params, x[0], y[0], cfg, rng if use_dropout else None)
        else:
            def micro(carry, inputs):
                loss_sum, grad_sum = carry
                xi, yi, i = inputs
                li, gi = grad_fn(params, xi, yi, cfg, jax.random.fold_in(rng, i) if use_dropout else None)
                return (loss_sum + li, jax.tree.map(jnp.add, grad_sum, gi)), None

            zeros = jax.tree.map(jnp.zeros_like, params)
            (loss, grads), _ = jax.lax.scan(micro, (jnp.zeros((), jnp.float32), zeros),
                                            (x, y, jnp.arange(A)))
            loss, grads = loss / A, jax.tree.map(lambda g: g / A, grads)
        grad_norm = optax.tree.norm(grads)
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, new_opt_state = optimizer.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        # A non-finite step changes nothing: the host sees ok=False and stops with the last good
        # state, so no NaN ever reaches a checkpoint. The select fuses into the Adam update.
        keep = lambda new, old: jnp.where(ok, new, old)  # noqa: E731
        new_params = jax.tree.map(keep, new_params, params)
        new_opt_state = jax.tree.map(keep, new_opt_state, opt_state)
        metrics = {"loss": loss, "grad_norm": grad_norm, "ok": ok}
        if schedule is not None:
            metrics["lr"] = jnp.asarray(schedule(step), jnp.float32)
        return new_params, new_opt_state, metrics

    return step_fn


def make_eval_step(cfg: ModelConfig, mesh: jax.sharding.Mesh | None = None) -> Callable:
    def eval_fn(params, x, y):
        with shd.activation_sharding(mesh):
            return loss_fn(params, x, y, cfg)

    return eval_fn


# ----------------------------------------------------------------------------------------------
# Config handling


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
    c.b1 = 0.9
    c.b2 = 0.99
    c.grad_clip = 1.0
    c.eval_every = 250
    c.eval_iters = 20
    c.log_every = 1
    c.ckpt_every = 250
    c.keep_checkpoints = 2
    c.profile = ""  # "START:END": write a jax.profiler trace of those steps to workdir/profile
    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
    return c


def model_config_from(config: ml_collections.ConfigDict, vocab_size: int | None = None) -> ModelConfig:
    """ModelConfig from `config.model`; vocab_size 0 there means 'take it from the data'."""
    d = dict(config.model.to_dict())
    if not d.get("vocab_size") and vocab_size:
        d["vocab_size"] = vocab_size
    return ModelConfig.from_dict(d)


def _check_workdir(workdir: Path, cfg: ModelConfig) -> None:
    path = workdir / CONFIG_FILE
    if not path.exists():
        return
    saved = json.loads(path.read_text()).get("model", {})
    current = cfg.to_dict()
    diff = {k: (saved.get(k), v) for k, v in current.items() if saved.get(k) != v}
    if diff:
        detail = ", ".join(f"{k}: workdir has {a!r}, config has {b!r}" for k, (a, b) in sorted(diff.items()))
        raise WorkdirMismatchError(
            f"{workdir} holds a run of a different model ({detail}). Nothing was changed. Use a new "
            "--workdir for this model, or the original config to resume that run."
        )


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
    ("warmup_steps", True, 0, True, None, "steps of linear warmup from 0 to lr"),
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
)
_OPTIONAL = ("profile", "keep_checkpoints")  # train() reads these with a default


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
        meta = json.loads((d / data_lib.META).read_text())
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
    lr, min_lr = ok_values.get("lr"), ok_values.get("min_lr")
    if lr is not None and min_lr is not None and min_lr > lr:
        problems.append(f"min_lr={min_lr!r}: above lr={lr!r}, so the rate would rise after warmup; set "
                        "--config.min_lr <= lr (e.g. lr / 10)")
    try:
        _parse_profile(config.get("profile", ""))
    except ValueError as e:
        problems.append(f"{e}; set --config.profile (or '' for no trace)")

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
        for axis in ("data", "fsdp", "tensor"):
            v = mesh.get(axis, 1)
            if isinstance(v, bool) or not isinstance(v, int) or (v < 1 and v != -1):
                problems.append(f"mesh.{axis}={v!r}: must be an integer >= 1, or -1 for 'the remaining "
                                f"devices'; set --config.mesh.{axis}")
            else:
                sizes[axis] = v
    if len(sizes) == 3:
        free = [a for a, v in sizes.items() if v == -1]
        fixed = math.prod(v for v in sizes.values() if v != -1)
        shown = " x ".join(f"mesh.{a}={v}" for a, v in sizes.items())
        if len(free) > 1:
            problems.append(f"{shown}: at most one mesh size may be -1; set the others to numbers")
            sizes = {}
        elif free and n_devices % fixed:
            problems.append(f"{shown}: {n_devices} devices cannot be split with the fixed sizes "
                            f"(product {fixed}); choose sizes whose product divides {n_devices}")
            sizes = {}
        elif free:
            sizes[free[0]] = n_devices // fixed
        elif fixed != n_devices:
            problems.append(f"{shown}: that is {fixed} devices, but this run has {n_devices}; make "
                            f"the product {n_devices}, or set one size to -1")
            sizes = {}
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

    _check_data_dir(config, problems)
    if problems:
        raise ConfigError(problems)


@dataclasses.dataclass(frozen=True)
class Run:
    """Everything compiled for a run: mesh, optimizer, shardings and the jitted functions.

    step_fn(params, opt_state, x, y, step) -> (params, opt_state, metrics), x/y int32 (A, B, T),
    params and opt_state donated. eval_fn(params, x, y) -> mean loss, x/y (B, T).
    init_fn(key) -> (params, opt_state), created directly in their shardings.
    """

    cfg: ModelConfig
    mesh: jax.sharding.Mesh
    optimizer: optax.GradientTransformation
    param_shardings: Any
    opt_shardings: Any
    batch_sharding: Any
    eval_batch_sharding: Any
    step_fn: Callable
    eval_fn: Callable
    init_fn: Callable

    def abstract_step_args(self, batch_size: int, accum: int = 1) -> tuple:
        """ShapeDtypeStructs for `step_fn.lower(...)`: cost analysis without allocating."""
        params = param_shapes(self.cfg)
        opt_state = jax.eval_shape(self.optimizer.init, params)
        x = jax.ShapeDtypeStruct((accum, batch_size, self.cfg.max_seq_len), jnp.int32)
        return params, opt_state, x, x, jax.ShapeDtypeStruct((), jnp.int32)


def build(config: ml_collections.ConfigDict, cfg: ModelConfig) -> Run:
    """Mesh, optimizer, shardings and jitted step/eval/init for a training config."""
    mesh = shd.make_mesh(**config.mesh.to_dict())
    schedule = lr_schedule(config.lr, config.warmup_steps, config.max_steps, config.min_lr)
    optimizer = make_optimizer(schedule, weight_decay=config.weight_decay, b1=config.b1, b2=config.b2,
                               grad_clip=config.grad_clip)
    p_sh = shd.param_shardings(cfg, mesh)
    o_sh = shd.opt_state_shardings(optimizer, param_shapes(cfg), p_sh, mesh)
    repl = shd.replicated(mesh)
    batch_sh, eval_sh = shd.batch_sharding(mesh, ndim=3), shd.batch_sharding(mesh)
    step_fn = jax.jit(
        make_train_step(cfg, optimizer, config.seed, schedule, mesh),
        in_shardings=(p_sh, o_sh, batch_sh, batch_sh, repl),
        out_shardings=(p_sh, o_sh, repl),
        donate_argnums=(0, 1),
    )
    eval_fn = jax.jit(make_eval_step(cfg, mesh), in_shardings=(p_sh, eval_sh, eval_sh), out_shardings=repl)

    def init(key):
        params = init_params(cfg, key)
        return params, optimizer.init(params)

    init_fn = jax.jit(init, out_shardings=(p_sh, o_sh))
    return Run(cfg, mesh, optimizer, p_sh, o_sh, batch_sh, eval_sh, step_fn, eval_fn, init_fn)


# ----------------------------------------------------------------------------------------------
# The loop


class _Interrupt:
    """Turns the first SIGINT/SIGTERM into a flag, so the loop can save and exit cleanly.
    A second SIGINT raises KeyboardInterrupt as usual."""

    def __init__(self):
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: signals stay as they are
                pass
        return self

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def train(config: ml_collections.ConfigDict, workdir: str | Path, *, progress: bool = True) -> dict[str, Any]:
    """Trains (or resumes) the run in `workdir`. Returns a summary dict (last losses, steps).

    Raises NonFiniteLossError on a NaN/inf loss, keeping the last good checkpoint; returns with
    summary["interrupted"] = signal number after a SIGINT/SIGTERM, having saved a checkpoint.
    Raises ConfigError, before anything is built or written, for a bad config (validate_config).
    Resumes from the newest checkpoint that verifies against its checksums: damaged newer ones
    are moved aside, each reported in one warning line and in summary["skipped_checkpoints"];
    raises CorruptCheckpointError when every checkpoint is damaged.
    """
    validate_config(config)
    workdir = Path(workdir).absolute()
    meta = data_lib.load_meta(config.data_dir)
    cfg = model_config_from(config, meta["vocab_size"])
    T = cfg.max_seq_len
    if meta["vocab_size"] > cfg.vocab_size:
        raise ValueError(
            f"the data's tokenizer has {meta['vocab_size']} tokens but model.vocab_size="
            f"{cfg.vocab_size}; set model.vocab_size >= {meta['vocab_size']} (or 0 for the data's)."
        )
    _check_workdir(workdir, cfg)
    train_tokens = data_lib.load_split(config.data_dir, "train", T, cfg.vocab_size)
    val_tokens = data_lib.load_split(config.data_dir, "val", T, cfg.vocab_size)
    profile = _parse_profile(config.get("profile", ""))

    B, A = config.batch_size, config.grad_accum
    run = build(config, cfg)
    step_fn, eval_fn = run.step_fn, run.eval_fn
    batch_sh, eval_sh = run.batch_sharding, run.eval_batch_sharding

    workdir.mkdir(parents=True, exist_ok=True)
    ckpt = Checkpointer(workdir / "checkpoints", save_every=config.ckpt_every,
                        keep=config.get("keep_checkpoints", 2))
    params, opt_state = run.init_fn(jax.random.key(config.seed))
    # The newest step that restores and matches its checksums; a damaged newer one is reported
    # in one line and moved aside (checkpoint.py). Step 0 holds imported weights (scripts/
    # convert.py --hf_dir): it gives params only, fine-tuned with a fresh optimizer state.
    restored = ckpt.restore_newest(params, opt_state)
    start = restored.step if restored else 0
    if restored:
        params = restored.params
        if restored.opt_state is not None:
            opt_state = restored.opt_state

    is_main = jax.process_index() == 0
    if is_main:  # atomically: a kill mid-write must not leave a resumable run without its config
        write_atomic(workdir / CONFIG_FILE, json.dumps(
            {"model": cfg.to_dict(), "train": config.to_dict()}, indent=2, default=str))
        load_tokenizer(config.data_dir).save(workdir)
    writer = MetricsWriter(workdir / "metrics.jsonl", resume_step=start) if is_main else None

    tokens_per_step = A * B * T
    pid, pcount = jax.process_index(), jax.process_count()

    def host_batch(tokens, seed, step, accum):
        return data_lib.get_batch(tokens, T, B, seed, step, accum, pid, pcount)

    def evaluate(params) -> float:
        losses = []
        for i in range(config.eval_iters):
            x, y = host_batch(val_tokens, config.seed + 1, i, 1)  # the same val batches every time
            losses.append(eval_fn(params, shd.put_batch(x[0], eval_sh), shd.put_batch(y[0], eval_sh)))
        return float(np.mean(jax.device_get(losses)))

    bar = None
    if progress and is_main:
        from tqdm import tqdm

        bar = tqdm(total=config.max_steps, initial=start, desc="train", dynamic_ncols=True)

    summary: dict[str, Any] = {"start_step": start, "interrupted": None,
                               "skipped_checkpoints": restored.skipped if restored else []}
    smooth: dict[str, float | None] = {"tps": None}  # the progress bar's moving average
    last_train_loss = math.nan
    pending = None  # (step, metrics) of the step in flight: fetched after the next is dispatched
    t_last = time.perf_counter()

    def finish(pending) -> None:
        nonlocal last_train_loss, t_last
        s, m = pending
        t_wait = time.perf_counter()
        m = jax.device_get(m)
        now = time.perf_counter()
        dt, t_last = now - t_last, now
        wait = now - t_wait
        if not m["ok"]:
            last = ckpt.latest_step()
            kept = (f"the last good checkpoint (step {last}) is kept in {ckpt.directory}" if last
                    else "no checkpoint had been saved yet")
            raise NonFiniteLossError(
                f"step {s}: loss={float(m['loss'])}, grad_norm={float(m['grad_norm'])} is not finite. "
                f"Training stopped without applying that update; {kept}. Lower --config.lr, "
                "keep --config.grad_clip > 0, or use float32 params, then rerun to resume."
            )
        last_train_loss = float(m["loss"])
        tps = tokens_per_step / dt
        util = mfu(tps, cfg, T, n_devices=jax.device_count())
        # step_time_s splits into device_wait_s (blocked on the device: compute) and the rest,
        # host time (batch sampling, transfer, dispatch, logging) not hidden behind the device.
        rec = {"step": s, "train_loss": last_train_loss, "grad_norm": float(m["grad_norm"]),
               "lr": float(m["lr"]), "tokens_per_sec": tps, "step_time_s": dt,
               "device_wait_s": wait, "host_s": dt - wait, "mfu": util}
        if s % 100 == 0 or s == config.max_steps:
            rec.update(memory_stats())
        if writer and (s % config.log_every == 0 or s == config.max_steps):
            writer.write(rec)
        if bar:
            smooth["tps"] = tps if smooth["tps"] is None else 0.9 * smooth["tps"] + 0.1 * tps
            util = mfu(smooth["tps"], cfg, T, n_devices=jax.device_count())
            bar.update(1)
            bar.set_postfix(loss=f"{last_train_loss:.4f}", tok_s=f"{smooth['tps']:,.0f}",
                            mfu=f"{util:.1%}" if util is not None else "n/a", refresh=False)

    tracing = False
    with _Interrupt() as interrupt:
        try:
            for step in range(start, config.max_steps):
                if profile and step == profile[0] and is_main:
                    jax.profiler.start_trace(str(workdir / "profile"))
                    tracing = True
                x, y = host_batch(train_tokens, config.seed, step, A)
                params, opt_state, metrics = step_fn(
                    params, opt_state, shd.put_batch(x, batch_sh), shd.put_batch(y, batch_sh),
                    np.int32(step))  # a numpy scalar: no convert executable a step
                if pending:
                    finish(pending)
                pending = (step + 1, metrics)
                if tracing and step + 1 == profile[1]:
                    jax.block_until_ready(params)
                    jax.profiler.stop_trace()
                    tracing = False
                s = step + 1
                evaluate_now = s % config.eval_every == 0 or s == config.max_steps
                save_now = s % config.ckpt_every == 0 or s == config.max_steps or interrupt.signum
                if evaluate_now or save_now:
                    finish(pending)  # never checkpoint or evaluate a step whose loss is unchecked
                    pending = None
                if evaluate_now:
                    val = evaluate(params)
                    summary["val_loss"] = val
                    if writer:
                        writer.write({"step": s, "val_loss": val, "train_loss": last_train_loss})
                    if bar:
                        bar.write(f"step {s}: train loss {last_train_loss:.4f}, val loss {val:.4f}")
                    t_last = time.perf_counter()  # eval time is not training throughput
                if save_now:
                    ckpt.save(s, params, opt_state, force=True)
                if interrupt.signum:
                    summary["interrupted"] = interrupt.signum
                    break
            if pending:
                finish(pending)
        finally:
            if tracing:  # the run ended (or was stopped) inside the profiled window
                jax.profiler.stop_trace()
            ckpt.close()
            if bar:
                bar.close()
    summary.update(step=ckpt.latest_step(), train_loss=last_train_loss, config=cfg)
    return summary
