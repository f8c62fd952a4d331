"""The training loop: resume from the newest good checkpoint, step, evaluate, log, save every N
steps, at the end and on SIGINT/SIGTERM. Rerunning the same command resumes.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import signal
import time
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np

from nanojax import data as data_lib
from nanojax import sharding as shd
from nanojax.checkpoint import Checkpointer
from nanojax.config import ModelConfig
from nanojax.metrics import MetricsWriter, memory_stats, mfu, run_header, save_hlo_text, write_atomic
from nanojax.tokenizer import load_tokenizer
from nanojax.train import lora_run
from nanojax.train.config import _parse_profile, model_config_from, validate_config
from nanojax.train.step import Run, build

CONFIG_FILE = "config.json"


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or inf loss or gradient; the state was not updated."""


class WorkdirMismatchError(ValueError):
    """The workdir holds a run of a different model."""


def _check_workdir(workdir: Path, cfg: ModelConfig, base_ref: dict[str, str] | None = None) -> None:
    path = workdir / CONFIG_FILE
    if not path.exists():
        return
    whole = json.loads(path.read_text())
    saved_ref = whole.get("lora_base")
    if bool(saved_ref) != bool(base_ref):
        what = "a LoRA fine-tuning run" if saved_ref else "a full-model run"
        raise WorkdirMismatchError(
            f"{workdir} holds {what}; this config {'trains LoRA' if base_ref else 'trains the whole model'}. "
            "Nothing was changed. Use a new --workdir, or the original config to resume that run.")
    if base_ref:
        lora_run.check_base(saved_ref, base_ref["path"], base_ref["fingerprint"], workdir)
    saved = whole.get("model", {})
    if isinstance(saved.get("remat"), bool):  # written before remat named a policy: true is "full"
        saved["remat"] = "full" if saved["remat"] else "none"
    current = cfg.to_dict()
    diff = {k: (saved.get(k), v) for k, v in current.items() if saved.get(k) != v}
    if diff:
        detail = ", ".join(f"{k}: workdir has {a!r}, config has {b!r}" for k, (a, b) in sorted(diff.items()))
        raise WorkdirMismatchError(
            f"{workdir} holds a run of a different model ({detail}). Nothing was changed. Use a new "
            "--workdir for this model, or the original config to resume that run."
        )


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


def _save_step_hlo(trace_dir: Path, step_fn: Any, params: Any, opt_state: Any, x: jax.Array,
                   y: jax.Array, step: int) -> None:
    """The step's compiled HLO beside its trace, so that the trace's summary names each custom call
    by the kernel it ran (metrics.save_hlo_text). It costs one more compile of the step (lowering a
    jitted function does not reuse the executable it runs), before the trace starts; if it fails the
    trace is still written, its custom calls named `ffi_call.N` only."""
    try:
        save_hlo_text(trace_dir, step_fn.lower(params, opt_state, x, y, np.int32(step)).compile())
    except Exception as e:  # an annotation of the profile: never worth stopping the run for
        logging.warning("profile: the step's HLO was not written (%s: %s); the trace's custom calls "
                        "keep their instruction names", type(e).__name__, e)


def _in_order(out: Any) -> Any:
    """`out` once its executable has finished, when several CPU processes train together; as is
    otherwise. Calls with no data between them (the eval batches) may run at once on XLA:CPU, and
    with several processes their collectives (gloo) then deadlock as soon as the processes drift
    apart: a 2-process run whose first process reached the whole-split evaluation 3 s after the
    other (as after a profile it wrote) hung there for good. One call in flight at a time keeps the
    collectives of every process in the same order. Training steps need nothing: each takes the
    params the last one returned."""
    if jax.process_count() > 1 and jax.devices()[0].platform == "cpu":
        jax.block_until_ready(out)
    return out


def evaluate_full(run: Run, params: Any, tokens: np.ndarray, batch_size: int) -> float:
    """Mean next-token loss (nats per token) over a whole split: every target tokens[1:] predicted
    exactly once, in non-overlapping windows of max_seq_len (data.full_split_batches), so the number
    is comparable with other tools that score a split the same way, unlike train()'s `val_loss`
    (the mean of eval_iters sampled batches).

    tokens: the split, (n,) integer ids. batch_size: windows per call of run.eval_sum_fn, a multiple
    of the mesh's data x fsdp and of the processes (validate_config checks config.batch_size is).
    """
    sh = run.eval_batch_sharding
    put = functools.partial(shd.put_batch, sharding=sh)
    sums = [_in_order(run.eval_sum_fn(params, put(x), put(y), put(w)))
            for x, y, w in data_lib.full_split_batches(tokens, run.cfg.max_seq_len, batch_size,
                                                       jax.process_index(), jax.process_count())]
    # One fetch at the end keeps the calls queued back to back (one process); each sum is of at
    # most B * T tokens in float32, their total in float64.
    total = np.sum(np.asarray(jax.device_get(sums), np.float64))
    return float(total / (len(tokens) - 1))


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
    lora_on = lora_run.lora_enabled(config)
    base_ref = None
    if lora_on:  # the model is the base's; only an adapter trains (train/lora_run.py)
        cfg, base_params = lora_run.load_base(config.lora.base)
        if meta["vocab_size"] > cfg.vocab_size:
            raise WorkdirMismatchError(
                f"data_dir={config.data_dir!r} has {meta['vocab_size']} tokens but the LoRA base "
                f"{config.lora.base} has vocab_size={cfg.vocab_size}; prepare the data with the base's "
                "tokenizer")
        base_ref = {"path": str(Path(config.lora.base).absolute()),
                    "fingerprint": lora_run.base_fingerprint(base_params)}
    else:
        cfg = model_config_from(config, meta["vocab_size"])
    T = cfg.max_seq_len
    _check_workdir(workdir, cfg, base_ref)
    train_tokens = data_lib.load_split(config.data_dir, "train", T, cfg.vocab_size)
    val_tokens = data_lib.load_split(config.data_dir, "val", T, cfg.vocab_size)
    profile = _parse_profile(config.get("profile", ""))

    B, A = config.batch_size, config.grad_accum
    run = lora_run.build_lora(config, cfg, base_params)[0] if lora_on else build(config, cfg)
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
        record = {"model": cfg.to_dict(), "train": config.to_dict()}
        if base_ref:
            record["lora_base"] = base_ref
        write_atomic(workdir / CONFIG_FILE, json.dumps(record, indent=2, default=str))
        load_tokenizer(config.data_dir).save(workdir)
    writer = MetricsWriter(workdir / "metrics.jsonl", resume_step=start) if is_main else None
    if is_main and start < config.max_steps:  # the header of this (re)start: host CPU, devices and
        # the XLA flags chosen for them; a resume with no step left to run leaves the file as it is
        writer.write({"step": start, "header": run_header()})
    if lora_on:
        trainable = sum(int(x.size) for x in jax.tree.leaves(params))
        frozen = lora_run.count_frozen(base_params)
        summary_counts = {"trainable_params": trainable, "frozen_params": frozen}
        if is_main:
            print(f"LoRA: {trainable:,} trainable params (rank {config.lora.rank}, targets "
                  f"{config.lora.targets}; {100 * trainable / frozen:.2f}% of the base's {frozen:,}, frozen)",
                  flush=True)
            writer.write({"step": start, **summary_counts})

    tokens_per_step = A * B * T
    pid, pcount = jax.process_index(), jax.process_count()

    def host_batch(tokens, seed, step, accum):
        return data_lib.get_batch(tokens, T, B, seed, step, accum, pid, pcount)

    def evaluate(params) -> float:
        losses = []
        for i in range(config.eval_iters):
            x, y = host_batch(val_tokens, config.seed + 1, i, 1)  # the same val batches every time
            x, y = shd.put_batch(x[0], eval_sh), shd.put_batch(y[0], eval_sh)
            losses.append(_in_order(eval_fn(params, x, y)))
        return float(np.mean(jax.device_get(losses)))

    bar = None
    if progress and is_main:
        from tqdm import tqdm

        bar = tqdm(total=config.max_steps, initial=start, desc="train", dynamic_ncols=True)

    summary: dict[str, Any] = {"start_step": start, "interrupted": None,
                               "skipped_checkpoints": restored.skipped if restored else []}
    if lora_on:
        summary.update(summary_counts)
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
                x, y = host_batch(train_tokens, config.seed, step, A)
                x, y = shd.put_batch(x, batch_sh), shd.put_batch(y, batch_sh)
                if profile and step == profile[0] and is_main:
                    _save_step_hlo(workdir / "profile", step_fn, params, opt_state, x, y, step)
                    jax.profiler.start_trace(str(workdir / "profile"))
                    tracing = True
                params, opt_state, metrics = step_fn(
                    params, opt_state, x, y, np.int32(step))  # a numpy scalar: no convert executable a step
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
                    rec = {"step": s, "val_loss": val, "train_loss": last_train_loss}
                    note = ""
                    if s == config.max_steps and config.get("eval_full_at_end", True):
                        t_full = time.perf_counter()
                        rec["val_loss_full"] = summary["val_loss_full"] = evaluate_full(
                            run, params, val_tokens, B)
                        note = (f", whole-split val loss {rec['val_loss_full']:.4f} ({len(val_tokens) - 1:,}"
                                f" tokens, {time.perf_counter() - t_full:.1f} s)")
                    if writer:
                        writer.write(rec)
                    if bar:
                        bar.write(f"step {s}: train loss {last_train_loss:.4f}, val loss {val:.4f}{note}")
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
