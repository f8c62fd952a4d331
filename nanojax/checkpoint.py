"""Orbax checkpoints of a training run: save every N steps, restore the newest good one, load params.

Each step directory holds two items, `params` and `opt_state`, so sampling restores the params
alone. Orbax writes a step into a temporary directory and renames it when complete, so a crash
or Ctrl-C mid-save leaves the previous checkpoint whole.

Integrity. Orbax (0.12) checks little of what it reads back: it writes zarr v2 arrays with no
checksum, its zarr3 option puts a crc32c on each shard's index but not on the data, and the codec
chain is not an option; a flipped byte in a data file restores as a wrong number without a word.
So every save records, for every leaf, its path, shape, dtype and a 64-bit checksum of its values
(`fingerprints` below), in the step's own orbax metadata (`custom_metadata`, which orbax writes
inside the temporary directory before the commit rename: a step never exists without its record,
so a kill at any moment cannot make a good step look damaged, and there is no second file to
keep in step). Restoring recomputes the checksums and compares. A step that is incomplete,
unreadable or fails the comparison is "damaged": `restore` names it and what failed;
`restore_newest` (the training resume) reports it in one line, moves it aside to
`<step>.corrupt-<UTC time>` (never deletes it) and falls back to the previous step.

The checksum is computed on the device, over the global array, rather than as a sha256 of host
bytes: the same number comes out however the array is sharded, on any number of processes (no
process gathers anything, and a two-process run's checkpoint verifies on one CPU), and it costs
no device-to-host copy. It is a sum of per-element hashes, made to catch accidents, not attacks.

A step saved before nanojax recorded checksums has no record: it is accepted when orbax restores
it and every value is finite (training never saves a NaN, so one means damage), since refusing
every older run would be worse than the small risk of a finite wrong value.
"""

from __future__ import annotations

import dataclasses
import json
import logging as pylogging
import os
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp
from orbax.checkpoint.checkpoint_managers import save_decision_policy as sdp

RECORD_KEY = "nanojax_integrity"  # our entry in a step's custom_metadata
RECORD_VERSION = 1
STEP_METADATA_FILE = "_CHECKPOINT_METADATA"  # where orbax writes a step's custom_metadata
CORRUPT_MARK = ".corrupt-"  # <step>.corrupt-<time>: a name orbax neither lists nor cleans up


class CorruptCheckpointError(ValueError):
    """A checkpoint step is incomplete, unreadable, or its values differ from their checksums."""


class CheckpointMismatchError(ValueError):
    """A checkpoint step holds other leaves, shapes or dtypes than the model asks for."""


# ----------------------------------------------------------------------------------------------
# Checksums


def _fmix32(h: jax.Array) -> jax.Array:
    """MurmurHash3's 32-bit finalizer: a bijection on uint32 in which each input bit flips each
    output bit with probability ~1/2."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def _words(x: jax.Array) -> jax.Array:
    """The bits of x as uint32 words: one per element, or two (a trailing axis) for 8-byte types."""
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    size = x.dtype.itemsize
    if size in (1, 2):
        return jax.lax.bitcast_convert_type(x, jnp.uint8 if size == 1 else jnp.uint16).astype(jnp.uint32)
    return jax.lax.bitcast_convert_type(x, jnp.uint32)  # 4 bytes: x.shape; 8 bytes: x.shape + (2,)


def _position(shape: tuple[int, ...]) -> jax.Array:
    """Each element's row-major index (mod 2^32), built from iotas so that every shard of a
    sharded array computes its own part: no reshape, so no resharding."""
    index = jnp.zeros(shape, jnp.uint32)
    stride = 1
    for d in reversed(range(len(shape))):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, shape, d) * jnp.uint32(stride % 2**32)
        stride *= shape[d]
    return index


@jax.jit
def _fingerprint(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Two uint32 lanes, each the sum over elements of fmix32(bits ^ salted position).

    A sum is the same however the array is sharded and whatever order the reduction takes, so
    the value computed at save time (any mesh, any number of processes: the result is
    replicated, no process gathers anything) equals the one computed after restoring onto any
    other topology. One changed 32-bit word always changes both lanes (fmix32 is a bijection);
    several changes cancel in both with probability ~2^-64. It detects accidents (bit rot, a
    truncated or mixed-up file), not tampering.
    """
    w = _words(x)
    salt = _position(w.shape) * jnp.uint32(0x9E3779B9)  # golden-ratio multiplier spreads indices
    return tuple(jnp.sum(_fmix32(w ^ (salt + jnp.uint32(seed))), dtype=jnp.uint32)
                 for seed in (0x243F6A88, 0x85A308D3))  # two seeds: independent lanes


@jax.jit
def _all_finite(x: jax.Array) -> jax.Array:
    return jnp.all(jnp.isfinite(x))


def _host_int(x: jax.Array) -> int:
    """A replicated scalar's value on this process (works when other processes hold it too)."""
    return int(np.asarray(x.addressable_data(0)))


def _checkable(x: Any) -> bool:
    """Whether `_fingerprint` covers x's dtype: bool, and whole-byte integers and floats (bf16 and
    fp8 included); not sub-byte types (int4), complex numbers or PRNG keys."""
    dtype = x.dtype
    numeric = jnp.issubdtype(dtype, jnp.integer) or jnp.issubdtype(dtype, jnp.floating)
    return dtype == jnp.bool_ or (numeric and jax.dtypes.itemsize_bits(dtype) in (8, 16, 32, 64))


def _leaves(tree: Any) -> dict[str, Any]:
    """{"a/b/0": leaf} with python scalars as arrays (the dtype JAX would give them)."""
    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        if not hasattr(leaf, "dtype"):
            leaf = jnp.asarray(leaf)
        out[jax.tree_util.keystr(path, simple=True, separator="/")] = leaf
    return out


def fingerprints(tree: Any) -> dict[str, str | None]:
    """A 16-hex-digit checksum of every leaf (None for dtypes it does not cover: keys, complex).
    Must be called by every process of a multi-process run (it is a collective)."""
    lanes = {k: _fingerprint(x) if _checkable(x) else None for k, x in _leaves(tree).items()}
    return {k: None if v is None else f"{_host_int(v[0]):08x}{_host_int(v[1]):08x}"
            for k, v in lanes.items()}


def integrity_record(items: dict[str, Any]) -> dict[str, Any]:
    """What a step holds and the checksums of its values: {item: {leaf path: {shape, dtype,
    fingerprint}}}. Stored in the step's orbax custom_metadata under RECORD_KEY."""
    record: dict[str, Any] = {"version": RECORD_VERSION, "items": {}}
    for name, tree in items.items():
        sums = fingerprints(tree)
        record["items"][name] = {
            k: {"shape": list(x.shape), "dtype": np.dtype(x.dtype).name, "fingerprint": sums[k]}
            for k, x in _leaves(tree).items()}
    return record


def _root_cause(e: BaseException, limit: int = 300) -> str:
    """The innermost exception's first line, without TensorStore's spec dump: one readable line."""
    for _ in range(50):  # a chain is finite, but never trust it to be
        inner = e.__cause__ or e.__context__
        if inner is None:
            break
        e = inner
    lines = str(e).strip().splitlines()
    text = f"{type(e).__name__}: {lines[0] if lines else ''}".split(" [tensorstore_spec")[0]
    return text if len(text) <= limit else text[:limit] + "..."


def _orbax_read(text: str) -> bool:
    """Whether a report's text names orbax's code or a TensorStore read."""
    return f"{os.sep}orbax{os.sep}" in text or "OCDBT database" in text or "TensorStore" in text


class _AbandonedTaskFilter(pylogging.Filter):
    """Drops asyncio's "Task/Future exception was never retrieved" for orbax's abandoned reads."""

    def filter(self, record: pylogging.LogRecord) -> bool:
        text = record.getMessage()
        never = text.startswith(("Task exception", "Future exception")) and "never retrieved" in text
        return not (never and _orbax_read(text))


def _quiet_abandoned_reads() -> None:
    """Drops the noise a failed orbax restore leaves behind, and nothing else.

    When one TensorStore read fails, orbax abandons the restore and closes its asyncio event
    loop with the other reads still in flight. Those report later, at random times, each with a
    long traceback and TensorStore's whole spec (hundreds of lines for one damaged file):
    through sys.unraisablehook, `RuntimeError: Event loop is closed` (a read completing into the
    closed loop) or orbax's read error (when the garbage collector closes its coroutine); and
    through the `asyncio` logger, "Task (or Future) exception was never retrieved". Installed
    once, by the first restore; every other report goes where it went before."""
    previous = sys.unraisablehook
    if getattr(previous, "nanojax_quiet", False):
        return

    def hook(report: Any) -> None:
        if report.object is None:
            abandoned = (isinstance(report.exc_value, RuntimeError)
                         and str(report.exc_value) == "Event loop is closed")
        else:  # a coroutine of orbax's that never finished
            code = getattr(report.object, "cr_code", None)
            abandoned = code is not None and _orbax_read(code.co_filename)
        if not abandoned:
            previous(report)

    hook.nanojax_quiet = True  # type: ignore[attr-defined]
    sys.unraisablehook = hook
    asyncio_log = pylogging.getLogger("asyncio")
    if not any(isinstance(f, _AbandonedTaskFilter) for f in asyncio_log.filters):
        asyncio_log.addFilter(_AbandonedTaskFilter())


def _agree(ok: bool) -> bool:
    """True only if `ok` on every process, so that all of them take the same path (a restore can
    fail on the process that reads a damaged file and succeed on the others)."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils

    return bool(np.min(multihost_utils.process_allgather(np.int32(ok))))


# ----------------------------------------------------------------------------------------------
# The checkpointer


def _abstract(tree: Any) -> Any:
    """ShapeDtypeStructs to restore into: each leaf's own sharding where it has one, else this
    process's first device, so a checkpoint written on any number of devices (and processes)
    loads on this machine; without a target sharding orbax refuses a different topology."""
    default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

    def leaf(x):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None) or default)

    return jax.tree.map(leaf, tree)


@dataclasses.dataclass(frozen=True)
class Restored:
    """What `Checkpointer.restore_newest` found: the step, its trees, and one line per damaged
    newer step it skipped."""

    step: int
    params: Any
    opt_state: Any | None  # None at step 0: imported weights carry no optimizer state
    skipped: list[str]


class Checkpointer:
    """A thin wrapper over `ocp.CheckpointManager` for (params, opt_state) at integer steps,
    with a checksum record in every step and verification on restore."""

    def __init__(self, directory: str | Path, *, save_every: int, keep: int = 2,
                 read_only: bool = False):
        """read_only: only restore (load_checkpoint); never create, clean up, move or delete."""
        self.directory = Path(directory).absolute()
        self.read_only = read_only
        options = ocp.CheckpointManagerOptions(
            save_decision_policy=sdp.FixedIntervalPolicy(max(1, save_every)),
            preservation_policy=pp.LatestN(keep),  # by step order, so no step times are needed
            create=not read_only,
            cleanup_tmp_directories=not read_only,  # drop what an interrupted save left behind
            enable_async_checkpointing=True,
            # Don't read every step's metadata up front: a damaged one would log orbax's own
            # errors before restore_newest can report it in one line.
            lightweight_initialize=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def step_dir(self, step: int) -> Path:
        return self.directory / str(step)

    def save(self, step: int, params: Any, opt_state: Any, *, force: bool = False) -> bool:
        """Starts an async save if the policy (or force) says so; returns whether it did.

        The checksums are computed first, on the device, from the very arrays orbax writes (they
        are dispatched before the caller's next step can donate them), and travel with the step
        as its custom_metadata."""
        if not (force or self.manager.should_save(step)):
            return False
        record = integrity_record({"params": params, "opt_state": opt_state})
        return self.manager.save(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave(opt_state)
            ),
            force=force,
            custom_metadata={RECORD_KEY: record},
        )

    def read_record(self, step: int) -> dict[str, Any] | None:
        """The step's checksum record; None for a step saved before nanojax wrote one. Raises
        CorruptCheckpointError when orbax's step metadata is missing or unreadable (orbax always
        writes it, inside the atomic commit, so the step is incomplete or damaged)."""
        path = self.step_dir(step) / STEP_METADATA_FILE
        try:
            meta = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            what = f"its orbax metadata {path.name} is unreadable ({_root_cause(e)})"
            raise self._damaged(step, what) from e
        record = (meta.get("custom_metadata") or {}).get(RECORD_KEY) if isinstance(meta, dict) else None
        if record is not None and (not isinstance(record, dict) or "items" not in record):
            raise self._damaged(step, f"its checksum record in {path.name} is malformed")
        return record

    def _damaged(self, step: int, what: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(f"checkpoint step {step} at {self.step_dir(step)} is damaged: {what}")

    def _check_matches(self, step: int, name: str, recorded: dict[str, Any], target: Any) -> None:
        """Refuses (CheckpointMismatchError) a target of other leaves, shapes or dtypes than the
        step holds: that is the wrong model, not a damaged step, and nothing is moved."""
        want = {k: (list(x.shape), np.dtype(x.dtype).name) for k, x in _leaves(target).items()}
        have = {k: (v["shape"], v["dtype"]) for k, v in recorded.items()}
        problem = None
        if want.keys() != have.keys():
            extra, missing = sorted(have.keys() - want.keys()), sorted(want.keys() - have.keys())
            problem = f"{name} leaves only in the checkpoint: {extra[:5]}, only in the model: {missing[:5]}"
        else:
            for k in want:
                if want[k] != have[k]:
                    problem = (f"{name}/{k} is {have[k][1]}{have[k][0]} in the checkpoint, the model "
                               f"expects {want[k][1]}{want[k][0]}")
                    break
        if problem:
            raise CheckpointMismatchError(
                f"checkpoint step {step} at {self.step_dir(step)} holds a different model: {problem}. "
                "Nothing was changed. Use the config that run was trained with, or a new workdir.")

    def restore(self, step: int, params_like: Any, opt_state_like: Any | None = None) -> dict:
        """Restores one step into the shapes, dtypes and shardings of the given (abstract or real)
        trees and verifies it against its record. Raises CorruptCheckpointError naming the step
        directory and what failed, CheckpointMismatchError for another model's step, and
        FileNotFoundError for a step that does not exist."""
        if step not in self.all_steps():
            raise FileNotFoundError(f"no checkpoint step {step} in {self.directory} "
                                    f"(steps present: {self.all_steps()})")
        targets = {"params": params_like}
        if opt_state_like is not None:
            targets["opt_state"] = opt_state_like
        record = self.read_record(step)
        if record is not None:
            for name, target in targets.items():
                if name not in record["items"]:
                    raise self._damaged(step, f"its checksum record lists no {name}")
                self._check_matches(step, name, record["items"][name], target)
        args = ocp.args.Composite(**{k: ocp.args.StandardRestore(_abstract(v)) for k, v in targets.items()})
        error = None
        _quiet_abandoned_reads()  # before: the first late reports can come before the exception
        try:
            restored = self.manager.restore(step, args=args)
        except Exception as e:  # orbax and tensorstore raise many types for damaged files
            error = f"orbax could not read it ({_root_cause(e)})"
        if not _agree(error is None):
            raise self._damaged(step, error or "another process could not read it")
        out = {k: restored[k] for k in targets}
        problem = self._verify(out, record)
        if problem:
            raise self._damaged(step, problem)
        return out

    def _verify(self, restored: dict[str, Any], record: dict[str, Any] | None) -> str | None:
        """What is wrong with restored values, or None. Every process computes the same answer
        (the checksums are replicated), so all of them fall back together."""
        for name, tree in restored.items():
            leaves = _leaves(tree)
            if record is None:  # saved before checksums: at least refuse non-finite values
                for k, x in leaves.items():
                    if jnp.issubdtype(x.dtype, jnp.floating) and not _host_int(_all_finite(x)):
                        return f"{name}/{k} holds NaN or inf (the step has no checksum record)"
                continue
            sums = fingerprints(tree)
            for k, entry in record["items"][name].items():
                if entry["fingerprint"] is not None and sums[k] != entry["fingerprint"]:
                    return (f"{name}/{k} differs from the checksum recorded when it was saved "
                            f"({sums[k]} != {entry['fingerprint']})")
        return None

    def move_aside(self, step: int) -> Path:
        """Renames a damaged step to `<step>.corrupt-<UTC time>` in the same directory: orbax no
        longer lists it (so the step number can be saved again) and the files stay for a look.
        Process 0 renames; every process waits for it and rereads the step list."""
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())  # no "_": orbax reads "x_12" as step 12
        dest = self.directory / f"{step}{CORRUPT_MARK}{stamp}"
        n = 1
        while dest.exists():
            dest, n = self.directory / f"{step}{CORRUPT_MARK}{stamp}-{n}", n + 1
        if jax.process_index() == 0:
            self.step_dir(step).rename(dest)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"nanojax_move_aside_{step}")
        self.manager.reload()
        return dest

    def restore_newest(self, params_like: Any, opt_state_like: Any | None = None) -> Restored | None:
        """The newest step that restores and verifies, or None when there is no step at all.

        Each damaged newer step is reported in one warning line (and in Restored.skipped); unless
        read_only it is moved aside (`move_aside`) so that training can save that step again. If
        every step is damaged, raises CorruptCheckpointError rather than silently starting over:
        an unreadable filesystem looks the same, and the user should see it (the moved steps stay
        aside, so a rerun starts from scratch). Step 0 holds imported weights (hf_to_workdir)
        with a placeholder optimizer state, so only its params are restored."""
        bad: list[str] = []
        for step in reversed(self.all_steps()):
            try:
                out = self.restore(step, params_like, opt_state_like if step > 0 else None)
            except CorruptCheckpointError as e:
                if self.read_only:
                    bad.append(f"{e}; skipped it")
                else:
                    bad.append(f"{e}; moved it to {self.move_aside(step).name}")
                continue
            skipped = [f"{line}; {'loading' if self.read_only else 'resuming from'} step {step}"
                       for line in bad]
            if jax.process_index() == 0:
                for line in skipped:
                    logging.warning("%s", line)
            return Restored(step, out["params"], out.get("opt_state"), skipped)
        if bad:
            raise CorruptCheckpointError(
                f"no checkpoint in {self.directory} could be restored: " + " | ".join(bad)
                + ("" if self.read_only else ". Rerun to start over from step 0."))
        return None

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def load_checkpoint(workdir: str | Path, step: int | None = None) -> tuple[Any, Any, Any]:
    """(ModelConfig, params, tokenizer) from a training workdir, verified against the step's
    checksums.

    step=None takes the newest step that verifies: a damaged newer step is skipped with a
    one-line warning (and left in place: loading never changes a workdir; the next training run
    moves it aside). An explicit step that is damaged raises CorruptCheckpointError naming its
    directory and what failed."""
    from nanojax.config import ModelConfig
    from nanojax.model import param_shapes
    from nanojax.tokenizer import load_tokenizer

    workdir = Path(workdir)
    cfg_path = workdir / "config.json"
    if not cfg_path.exists():
        raise FileNotFoundError(
            f"{cfg_path} not found: {workdir} is not a nanojax training workdir "
            "(train into it with scripts/train.py first)."
        )
    cfg = ModelConfig.from_dict(json.loads(cfg_path.read_text())["model"])
    ckpt = Checkpointer(workdir / "checkpoints", save_every=1, read_only=True)
    try:
        if step is not None:
            params = ckpt.restore(step, param_shapes(cfg))["params"]
        else:
            found = ckpt.restore_newest(param_shapes(cfg))
            if found is None:
                raise FileNotFoundError(f"no checkpoint in {workdir / 'checkpoints'}; train longer first.")
            params = found.params
    finally:
        ckpt.close()
    return cfg, params, load_tokenizer(workdir)
