"""The continuous-batching engine behind the server: one thread owns the device and runs a fixed
number of decode slots; requests are queued, prefilled into free slots between compiled decode
chunks, and leave as soon as they finish. HTTP handlers (nanojax/serve/) only submit and read.

CONTRACT (the HTTP layer codes against exactly these names; the implementation fills them in):

    engine = Engine(params, cfg, tokenizer, slots=8, max_queue=64, chunk_size=8,
                    prefix_cache_tokens=8192, kv_cache_dtype=None)
    engine.start()                                    # starts the device thread (compiles lazily)
    req = engine.submit(prompt_ids, SamplingParams(max_tokens=32, temperature=0.0))
                                                      # ValueError (bad input), QueueFull (full)
    for ev in req: ...                                # blocking iterator of Event
    async for ev in req.stream(): ...                 # the same events for asyncio code
    req.cancel()                                      # frees the slot at once (client went away)
    engine.stats()                                    # dict for /metrics and /health
    engine.shutdown(drain=True, timeout=None)         # drain: finish what is queued; else cancel

The request-side types (SamplingParams, Event, TokenLogprob, Request, QueueFull, EngineStopped)
live in infer/requests.py and are re-exported here; the compiled slot cache, prefill and decode
chunk in infer/slots.py; the prefix store's bookkeeping in infer/prefix.py.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from nanojax.config import ModelConfig
from nanojax.infer import slots as SL
from nanojax.infer.engine import KV_CACHE_DTYPES
from nanojax.infer.prefix import PrefixStore
from nanojax.infer.requests import (
    EngineStopped,
    Event,
    QueueFull,
    Request,
    SamplingParams,
    TokenLogprob,
    validate,
)
from nanojax.infer.stops import token_event
from nanojax.model import Params
from nanojax.sampling import ROW_KNOBS, row_knobs

__all__ = ["Engine", "EngineStopped", "Event", "QueueFull", "Request", "SamplingParams", "TokenLogprob"]

MAX_LOGPROBS = SL.N_TOP


class Engine:
    """See the module docstring. stats() returns at least: queue_len, active_slots, slots,
    batch_occupancy (mean active/slots over recent decode chunks), tokens_per_s (recent),
    tokens_total, requests_total, requests_running, prefix_hits, prefix_tokens_reused,
    prefill_calls (device prefill calls: requests admitted together share packed ones),
    executables (compiled variants so far, counted per jitted function for the whole process: two
    engines with different slot counts or configs add up).

    tokenizer: anything with decode(list[int]) -> str, or None (events then carry no text and
    stop strings are refused). slots: S, decode rows. chunk_size: decode steps per compiled call
    (new requests join and finished ones leave between calls). prefix_cache_tokens: capacity of
    the prefix store (0 turns prefix reuse off). kv_cache_dtype: None or "int8" (engine.Int8KV).
    """

    def __init__(self, params: Params, cfg: ModelConfig, tokenizer: Any = None, slots: int = 8,
                 max_queue: int = 64, chunk_size: int = 8, prefix_cache_tokens: int = 8192,
                 kv_cache_dtype: str | None = None):
        if not isinstance(cfg, ModelConfig):
            raise TypeError(f"cfg must be a nanojax ModelConfig, got {type(cfg).__name__}")
        sizes = (("slots", slots, 1), ("max_queue", max_queue, 1), ("chunk_size", chunk_size, 1),
                 ("prefix_cache_tokens", prefix_cache_tokens, 0))
        for name, value, low in sizes:
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got {kv_cache_dtype!r}")
        wte = params.get("wte") if isinstance(params, dict) else None
        if wte is None or tuple(wte.shape) != (cfg.vocab_size, cfg.d_model):
            raise ValueError(f"params do not match cfg: wte is {getattr(wte, 'shape', None)}, expected "
                             f"({cfg.vocab_size}, {cfg.d_model}); load both from the same checkpoint")
        self.params, self.cfg, self.tokenizer = params, cfg, tokenizer
        self.slots, self.max_queue, self.chunk_size = slots, max_queue, chunk_size
        self.kv_cache_dtype = kv_cache_dtype
        self.C = SL.cache_len(cfg)
        n_blocks = min(prefix_cache_tokens, 1 << 30) // SL.BLOCK
        self._store = PrefixStore(n_blocks, SL.BLOCK) if n_blocks else None
        self._cv = threading.Condition()
        self._queue: collections.deque[Request] = collections.deque()
        self._running: list[Request | None] = [None] * slots
        self._stopping = False
        self._drain = True
        self._thread: threading.Thread | None = None
        self._cache: Any = None
        self._pool: Any = None
        self._inflight: dict[str, Any] | None = None  # the decode chunk dispatched, not yet read
        self._dirty = False  # rows joined or left since it was dispatched
        self._next_id = 0
        # Host copies of the per-slot decode state (rows of decode_chunk's `rows`).
        S = slots
        self._rows: dict[str, np.ndarray] = {
            "token": np.zeros(S, np.int32), "pos": np.zeros(S, np.int32), "t": np.zeros(S, np.int32),
            "active": np.zeros(S, bool), "remaining": np.zeros(S, np.int32),
            "stops": np.full((S, SL.N_STOP), -1, np.int32), "key": np.zeros((S, 2), np.uint32),
            **{k: np.stack([v] * S) for k, v in row_knobs(1.0, None, None, None, cfg.vocab_size).items()},
        }
        self._counts = collections.Counter()
        self._recent: collections.deque[tuple[float, int, float]] = collections.deque(maxlen=64)

    # -- the caller's side ----------------------------------------------------------------------

    def start(self) -> Engine:
        """Starts the device thread (the first requests compile what they need)."""
        with self._cv:
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="nanojax-engine", daemon=True)
                self._thread.start()
        return self

    def warm_up(self) -> Engine:
        """Compiles, before start(), every prefill (packed and prefix-reusing) bucket and every decode
        batch bucket (all-greedy and per-row sampling; every window without the attention kernel),
        so no request waits for a compile later (logprobs variants still compile on first use).
        Runs them on dummy rows that write nothing a request reads (positions past the cache, or a
        free slot). Returns self."""
        if self._thread is not None:
            raise RuntimeError("warm_up() must run before start(): the device thread owns the cache")
        if self._cache is None:
            self._reset_device()
        cfg, S, C = self.cfg, self.slots, self.C
        knobs = row_knobs(1.0, None, None, None, cfg.vocab_size)
        top = SL.prefill_bucket(max(SL.PACK_TOKENS, cfg.max_seq_len))
        T = SL.prefill_bucket(1)
        while T <= top:
            R = SL.pack_rows(T, S)
            rk = {k: np.stack([v] * R) for k, v in knobs.items()}
            self._cache, out = SL.prefill_packed(
                self.params, self._cache, np.zeros((1, T), np.int32), np.zeros(T, np.int32),
                np.full(T, C, np.int32), np.zeros(R, np.int32), rk, np.zeros((R, 2), np.uint32), cfg=cfg)
            if T <= SL.prefill_bucket(cfg.max_seq_len):
                self._cache, out = SL.prefill(
                    self.params, self._cache, np.zeros((1, T), np.int32), np.int32(0), np.int32(0),
                    np.int32(1), {k: v[None] for k, v in knobs.items()}, np.zeros((1, 2), np.uint32), cfg=cfg)
            jax.block_until_ready(out)
            T *= 2
        if self._store is not None:  # the prefix copies: into free slot 0, and nowhere (dst = skip)
            ids = np.zeros(C // SL.BLOCK, np.int32)
            self._cache = SL.load_blocks(self._cache, self._pool, np.int32(0), ids)
            skip = np.full(C // SL.BLOCK, self._store.capacity, np.int32)
            self._pool = SL.save_blocks(self._cache, self._pool, np.int32(0), ids, skip)
        windows = sorted({SL.window_for(p, self.chunk_size, C) for p in range(C)})
        for b in sorted({SL.batch_bucket(n, S) for n in range(1, S + 1)}):
            rows = {k: jnp.asarray(v[:b]) for k, v in self._rows.items()}  # all inactive: no step runs
            rows["slot"] = jnp.arange(b, dtype=jnp.int32)
            for window in windows:
                for greedy in (True, False):
                    self._cache, out = SL.decode_chunk(self.params, self._cache, rows, cfg=cfg,
                                                       steps=self.chunk_size, window=window,
                                                       greedy_only=greedy, logprobs=False)
                jax.block_until_ready(out["n"])
                if SL.use_attention_kernel(cfg, self._cache):
                    break  # one executable for every window
        return self

    def submit(self, prompt_ids: Sequence[int], params: SamplingParams | None = None) -> Request:
        """Queues a request. ValueError for bad input (the message says what to change),
        QueueFull when max_queue requests wait, EngineStopped after shutdown()."""
        params = SamplingParams() if params is None else params
        prompt, seed = validate(prompt_ids, params, self.cfg, self.tokenizer is not None, MAX_LOGPROBS)
        with self._cv:
            if self._stopping:
                raise EngineStopped("the engine is shutting down; it takes no new requests")
            if len(self._queue) >= self.max_queue:
                raise QueueFull(f"the request queue is full ({self.max_queue} waiting); retry later")
            req = Request(self._wake, f"req-{self._next_id}", prompt, params, seed)
            self._next_id += 1
            self._queue.append(req)
            self._counts["requests_total"] += 1
            self._cv.notify_all()
        return req

    def stats(self) -> dict[str, Any]:
        with self._cv:
            running = sum(r is not None for r in self._running)
            recent = list(self._recent)
            out: dict[str, Any] = {"queue_len": len(self._queue), "active_slots": running,
                                   "slots": self.slots, "requests_running": running}
        out["batch_occupancy"] = float(np.mean([occ for _, _, occ in recent])) if recent else 0.0
        span = recent[-1][0] - recent[0][0] if len(recent) > 1 else 0.0
        out["tokens_per_s"] = sum(n for _, n, _ in recent[1:]) / span if span > 0 else 0.0
        for name in ("tokens_total", "requests_total", "prefix_hits", "prefix_tokens_reused",
                     "prefill_tokens", "prefill_calls", "requests_finished", "errors"):
            out[name] = self._counts[name]
        fns = {"prefill": SL.prefill, "prefill_packed": SL.prefill_packed,
               "decode_chunk": SL._decode_chunk_jit(), "save_blocks": SL.save_blocks,
               "load_blocks": SL.load_blocks}
        out["executables_by_fn"] = {k: f._cache_size() for k, f in fns.items()}
        out["executables"] = sum(out["executables_by_fn"].values())
        out["executable_variants"] = SL.variant_counts(self.cfg, self.slots)
        out["prefix_cache_blocks"] = 0 if self._store is None else len(self._store)
        return out

    def shutdown(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stops taking requests. drain: finish the queued and running ones first; else cancel them."""
        with self._cv:
            self._stopping, self._drain = True, drain
            self._cv.notify_all()
            thread = self._thread
        if thread is None:  # never started: nothing runs the queue
            for req in self._take_queue():
                req._push(Event(finish_reason="cancelled", prompt_tokens=req.prompt_tokens))
        else:
            thread.join(timeout)

    # -- the device thread ----------------------------------------------------------------------

    def _wake(self) -> None:
        with self._cv:
            self._cv.notify_all()

    def _take_queue(self) -> list[Request]:
        with self._cv:
            reqs = list(self._queue)
            self._queue.clear()
        return reqs

    def _loop(self) -> None:
        if self._cache is None:  # warm_up() may have made it
            self._reset_device()
        while self._step():
            pass

    def _step(self) -> bool:
        """One turn of the device thread: admit, drop cancelled, one decode chunk. False: stop.
        An error that escapes the per-request guards ends every running request, never the thread."""
        try:
            return self._turn()
        except Exception as e:  # noqa: BLE001 - reported to the requests it hit
            self._counts["errors"] += 1
            for req in list(self._running):
                if req is not None:
                    self._finish(req, "error", error=f"{type(e).__name__}: {e}")
            self._reset_device()
            return True

    def _turn(self) -> bool:
        with self._cv:
            while not (self._queue or self._rows["active"].any() or self._stopping or self._inflight):
                self._cv.wait()
            gone = [r for r in self._queue if r.cancelled]  # cancelled while queued: out now
            for r in gone:
                self._queue.remove(r)
            busy = bool(self._queue) or self._rows["active"].any()
            stop_now = self._stopping and (not self._drain or not busy)
            free = [s for s in range(self.slots) if self._running[s] is None]
            admit = []
            while free and self._queue and not stop_now:
                admit.append((free.pop(0), self._queue.popleft()))
        for req in gone:
            self._finish(req, "cancelled")
        if stop_now:
            if self._inflight is not None:
                chunk, self._inflight = self._inflight, None
                self._guard(list(chunk["running"]), self._collect, chunk)
            for req in self._take_queue() + [r for r in self._running if r is not None]:
                self._finish(req, "cancelled")
            return False
        self._drop_cancelled()
        self._admit_all(admit)
        self._drop_cancelled()
        if self._rows["active"].any() or self._inflight is not None:
            self._guard([r for r in self._running if r is not None], self._chunk)
        return True

    def _guard(self, reqs: list[Request], fn: Any, *args: Any) -> None:
        """Runs fn; an exception ends `reqs` with finish_reason="error" and the engine goes on
        (with a fresh cache if the failed call had consumed the donated one)."""
        try:
            fn(*args)
        except Exception as e:  # noqa: BLE001 - reported to the requests it hit
            self._counts["errors"] += 1
            for req in reqs:
                self._finish(req, "error", error=f"{type(e).__name__}: {e}")
            if any(leaf.is_deleted() for leaf in jax.tree.leaves(self._cache)):
                for req in self._running:
                    if req is not None:
                        self._finish(req, "error", error="the KV cache was lost to an earlier error")
                self._reset_device()

    def _reset_device(self) -> None:
        self._inflight = None
        self._cache = SL.new_cache(self.cfg, self.slots, self.kv_cache_dtype)
        if self._store is not None:
            self._store = PrefixStore(self._store.capacity, SL.BLOCK)
            self._pool = SL.new_pool(self.cfg, self._store.capacity, self.kv_cache_dtype)

    def _drop_cancelled(self) -> None:
        for req in self._running:
            if req is not None and req.cancelled:
                self._finish(req, "cancelled")

    def _finish(self, req: Request, reason: str, error: str | None = None) -> None:
        """Frees req's slot (if any) and sends its last event (if not sent)."""
        with self._cv:
            for s, r in enumerate(self._running):
                if r is req:
                    self._running[s] = None
                    self._rows["active"][s] = False
                    self._dirty = True
        if not req.finished:
            self._counts["requests_finished"] += 1
            req._push(Event(finish_reason=reason, error=error, prompt_tokens=req.prompt_tokens,
                            completion_tokens=len(req.generated),
                            prefix_hit=req.prefix_hit if req.first else 0))

    def _admit_all(self, admit: list[tuple[int, Request]]) -> None:
        """Prefills the admitted requests: one with a cached prefix alone (its blocks copied in
        first), the others packed into as few calls as SL.plan_packs allows."""
        fresh = []
        for slot, req in admit:
            # Whole blocks only, leaving >= 1 token to prefill.
            n_blocks = (len(req.prompt) - 1) // SL.BLOCK
            hit = [] if self._store is None else self._store.lookup(req.prompt, n_blocks)
            if hit:
                self._guard([req], self._admit, slot, req, hit)
            else:
                fresh.append((slot, req))
        for pack in SL.plan_packs([len(req.prompt) for _, req in fresh], self.slots):
            items = [fresh[i] for i in pack]
            self._guard([req for _, req in items], self._admit_pack, items)

    def _admit(self, slot: int, req: Request, hit: list[int]) -> None:
        """Prefills req into `slot` after copying its cached prefix in (hit: the pool blocks
        holding it, from the store's lookup, which leaves >= 1 token to prefill), and sends token 0."""
        prompt = req.prompt
        start = len(hit) * SL.BLOCK
        ids = np.zeros(self.C // SL.BLOCK, np.int32)
        ids[: len(hit)] = hit
        self._cache = SL.load_blocks(self._cache, self._pool, np.int32(slot), ids)
        new = prompt[start:]
        tokens = np.zeros((1, SL.prefill_bucket(len(new))), np.int32)
        tokens[0, : len(new)] = new
        knobs, key = self._knobs(req)
        self._cache, out = SL.prefill(self.params, self._cache, tokens, np.int32(slot), np.int32(start),
                                      np.int32(len(new)), {k: v[None] for k, v in knobs.items()}, key[None],
                                      cfg=self.cfg)
        self._counts["prefill_calls"] += 1
        self._save_prefix(slot, req)
        self._start(slot, req, jax.device_get(out), 0, start, knobs, key)

    def _admit_pack(self, items: list[tuple[int, Request]]) -> None:
        """Prefills whole prompts (no cached prefix) into their slots in one packed call
        (SL.prefill_packed) and sends each its token 0."""
        lengths = [len(req.prompt) for _, req in items]
        T = SL.prefill_bucket(sum(lengths))
        R = SL.pack_rows(T, self.slots)
        tokens = np.zeros((1, T), np.int32)
        slot = np.full(T, items[-1][0], np.int32)  # padding: the last request's slot, at pos C (dropped)
        pos = np.full(T, self.C, np.int32)
        last = np.zeros(R, np.int32)
        rows = [self._knobs(req) for _, req in items]
        pad = [rows[0]] * (R - len(items))  # rows past the pack's requests: any valid values, unused
        knobs = {k: np.stack([kn[k] for kn, _ in rows + pad]) for k in ROW_KNOBS}
        keys = np.stack([key for _, key in rows + pad])
        at = 0
        for j, ((s, req), n) in enumerate(zip(items, lengths, strict=True)):
            tokens[0, at:at + n], slot[at:at + n], pos[at:at + n] = req.prompt, s, np.arange(n)
            last[j] = at + n - 1
            at += n
        self._cache, out = SL.prefill_packed(self.params, self._cache, tokens, slot, pos, last, knobs, keys,
                                             cfg=self.cfg)
        self._counts["prefill_calls"] += 1
        for s, req in items:
            self._save_prefix(s, req)
        out = jax.device_get(out)
        for j, (s, req) in enumerate(items):
            self._start(s, req, out, j, 0, rows[j][0], rows[j][1])

    def _knobs(self, req: Request) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """req's sampler values (`row_knobs`) and its seed's PRNG key data, uint32 (2,)."""
        p = req.params
        knobs = row_knobs(p.temperature, p.top_k, p.top_p, p.min_p, self.cfg.vocab_size)
        return knobs, np.asarray(jax.random.key_data(jax.random.key(req.seed)), np.uint32)

    def _save_prefix(self, slot: int, req: Request) -> None:
        """Records req's prompt blocks in the prefix store, copying the new ones into the pool."""
        if self._store is None:
            return
        copies = self._store.insert(req.prompt)
        if copies:
            src = np.zeros(self.C // SL.BLOCK, np.int32)
            dst = np.full(self.C // SL.BLOCK, self._store.capacity, np.int32)  # = skip
            for j, (i, b) in enumerate(copies):
                src[j], dst[j] = i, b
            self._pool = SL.save_blocks(self._cache, self._pool, np.int32(slot), src, dst)

    def _start(self, slot: int, req: Request, out: dict[str, np.ndarray], row: int, start: int,
               knobs: dict[str, np.ndarray], key: np.ndarray) -> None:
        """Puts a prefilled request into its slot's decode row (out: the prefill's output, row: its
        row there, start: the prefix it reused) and sends its token 0."""
        p, n = req.params, len(req.prompt)
        req.prefix_hit = start
        self._counts["prefill_tokens"] += n - start
        self._counts["prefix_hits"] += bool(start)
        self._counts["prefix_tokens_reused"] += start
        stops = np.full(SL.N_STOP, -1, np.int32)
        stops[: min(SL.N_STOP, len(p.stop_token_ids))] = p.stop_token_ids[: SL.N_STOP]
        token = int(out["token"][row])
        with self._cv:
            self._running[slot] = req
            r = self._rows
            r["token"][slot], r["pos"][slot], r["t"][slot] = token, n, 0
            r["remaining"][slot], r["stops"][slot], r["key"][slot] = p.max_tokens - 1, stops, key
            for k in ROW_KNOBS:
                r[k][slot] = knobs[k]
            r["active"][slot] = p.max_tokens > 1
            self._dirty = True
        self._deliver(req, [token], out, row)

    def _chunk(self) -> None:
        """Dispatches one compiled decode chunk for the active slots (a power-of-two bucket of
        them), then turns the previous chunk's tokens into events while this one runs.

        Pipelined, one chunk deep: when no row joined or left since the chunk in flight was
        dispatched, the next one starts from that chunk's device-side row state without waiting
        for it (the host would otherwise sit idle through every step of every chunk, and each
        sync costs more than a step under load). A row that finishes in chunk k may run on in
        chunk k + 1; its extra tokens are dropped, and a request admitted into its slot later is
        prefilled after that chunk in device order, so what it wrote is overwritten first."""
        r = self._rows
        prev = self._inflight
        if prev is not None and self._dirty:  # rows changed: the host's state must be current
            self._inflight, prev = None, self._collect(prev)
        act = np.flatnonzero(r["active"])
        if not len(act):
            return
        steps = self.chunk_size
        if prev is not None:  # the same rows as the chunk in flight, which is `steps` further on
            idx = prev["idx"]
            batch = {k: jnp.asarray(r[k][idx]) for k in ("stops", "key", *ROW_KNOBS)}
            batch.update(prev["out"]["state"], slot=jnp.asarray(idx.astype(np.int32)))
            furthest = int(r["pos"][act].max()) + steps
        else:
            bucket = SL.batch_bucket(len(act), self.slots)
            idle = np.flatnonzero(~r["active"])[: bucket - len(act)]  # padding: inactive rows
            idx = np.concatenate([act, idle])
            # As device arrays, like the pipelined path's state: a numpy argument would be a
            # second entry in the jit's cache (the same executable, but stats() counts entries).
            batch = {k: jnp.asarray(v[idx]) for k, v in r.items()}
            batch["slot"] = jnp.asarray(idx.astype(np.int32))
            furthest = int(r["pos"][act].max())
        running = [self._running[s] for s in act]
        self._cache, out = SL.decode_chunk(
            self.params, self._cache, batch, cfg=self.cfg, steps=steps,
            window=SL.window_for(furthest, steps, self.C), greedy_only=bool(r["greedy"][act].all()),
            logprobs=any(req.params.logprobs is not None for req in running))
        self._inflight = {"out": out, "idx": idx, "act": act, "running": running}
        self._dirty = False
        if prev is not None:
            self._collect(prev)

    def _collect(self, chunk: dict[str, Any]) -> None:
        """Waits for a dispatched chunk and sends its tokens to the requests still in their slots."""
        out = jax.device_get({k: v for k, v in chunk["out"].items() if k != "state"})
        r = self._rows
        made = 0
        for j, (s, req) in enumerate(zip(chunk["act"], chunk["running"], strict=True)):
            n = int(out["n"][j])
            if self._running[s] is not req or req.finished:
                continue  # it left (finished, cancelled) while this chunk ran: drop what it made
            made += n
            with self._cv:
                r["pos"][s] += n
                r["t"][s] += n
                r["remaining"][s] -= n
                if n:
                    r["token"][s] = out["tokens"][j, n - 1]
                if r["active"][s] and r["remaining"][s] <= 0:
                    r["active"][s], self._dirty = False, True
            self._guard([req], self._deliver, req, [int(x) for x in out["tokens"][j, :n]], out, j)
        self._counts["tokens_total"] += made
        self._recent.append((time.perf_counter(), made, len(chunk["act"]) / self.slots))

    def _deliver(self, req: Request, toks: list[int], out: dict[str, np.ndarray], row: int) -> None:
        """Sends req the Event for its new tokens (stops.token_event: out is the device call's
        output, row its row there) and finishes it on a stop token, a stop string or its budget."""
        ev = token_event(req, toks, out, row, self.tokenizer)
        req._push(ev)
        req.first = False
        if ev.finish_reason is not None:
            self._counts["requests_finished"] += 1
            self._finish(req, ev.finish_reason)
