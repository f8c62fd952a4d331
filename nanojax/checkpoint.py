"""Orbax checkpoints of a training run: save every N steps, restore the latest, load params.

Each step directory holds two items, `params` and `opt_state`, so sampling restores the params
alone. Orbax writes a step into a temporary directory and renames it when complete, so a crash
or Ctrl-C mid-save leaves the previous checkpoint whole.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp
from orbax.checkpoint.checkpoint_managers import save_decision_policy as sdp


def _abstract(tree: Any) -> Any:
    """ShapeDtypeStructs to restore into: each leaf's own sharding where it has one, else this
    process's first device, so a checkpoint written on any number of devices (and processes)
    loads on this machine; without a target sharding orbax refuses a different topology."""
    default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

    def leaf(x):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None) or default)

    return jax.tree.map(leaf, tree)


class Checkpointer:
    """A thin wrapper over `ocp.CheckpointManager` for (params, opt_state) at integer steps."""

    def __init__(self, directory: str | Path, *, save_every: int, keep: int = 2,
                 read_only: bool = False):
        """read_only: only restore (load_checkpoint); never create, clean up or delete."""
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            save_decision_policy=sdp.FixedIntervalPolicy(max(1, save_every)),
            preservation_policy=pp.LatestN(keep),
            create=not read_only,
            cleanup_tmp_directories=not read_only,  # drop what an interrupted save left behind
            enable_async_checkpointing=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, params: Any, opt_state: Any, *, force: bool = False) -> bool:
        """Starts an async save if the policy (or force) says so; returns whether it did."""
        return self.manager.save(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave(opt_state)
            ),
            force=force,
        )

    def restore(self, step: int, params_like: Any, opt_state_like: Any | None = None) -> dict:
        """Restores into the shapes, dtypes and shardings of the given (abstract or real) trees."""
        items = {"params": ocp.args.StandardRestore(_abstract(params_like))}
        if opt_state_like is not None:
            items["opt_state"] = ocp.args.StandardRestore(_abstract(opt_state_like))
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # orbax raises several types for damaged or mismatched files
            raise RuntimeError(
                f"could not restore the checkpoint at {self.directory / str(step)}: "
                f"{type(e).__name__}: {e}\nThe step directory is incomplete or damaged, or was "
                "written by a different model. Delete that step directory to resume from the "
                f"previous one (steps present: {self.all_steps()}), or use a new workdir."
            ) from e
        return {k: restored[k] for k in items}

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def load_checkpoint(workdir: str | Path, step: int | None = None) -> tuple[Any, Any, Any]:
    """(ModelConfig, params, tokenizer) from a training workdir; the latest step by default."""
    import json

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
    step = step if step is not None else ckpt.latest_step()
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {workdir / 'checkpoints'}; train longer first.")
    params = ckpt.restore(step, param_shapes(cfg))["params"]
    ckpt.close()
    return cfg, params, load_tokenizer(workdir)
