"""The request side of the continuous-batching engine (infer/scheduler.py): what a caller
submits (SamplingParams), gets back (Request, whose Events it iterates or streams) and the
errors submit() raises; `validate` is what submit() checks. Names and meanings are the CONTRACT
in scheduler.py's docstring, which re-exports all of them."""

from __future__ import annotations

import asyncio
import dataclasses
import random
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

from nanojax.config import ModelConfig
from nanojax.sampling import check_sampling


class QueueFull(RuntimeError):
    """submit() found the request queue at max_queue: the server answers 429 with this message."""


class EngineStopped(RuntimeError):
    """submit() after shutdown() began: the server answers 503."""


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """One request's decoding settings (OpenAI's names). temperature 0 is greedy.

    max_tokens: new tokens at most; prompt + max_tokens must fit cfg.max_seq_len.
    top_k: None or >= 1; top_p in (0, 1]; min_p in [0, 1]; seed: None draws one.
    stop_token_ids: ids that end the request (the id is reported in the tokens, not in the text).
    stop: strings that end the request; the text is cut before the first one (not included).
    logprobs: None, or how many top alternatives (0..20) to report with each token's own logprob.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()
    logprobs: int | None = None


@dataclasses.dataclass(frozen=True)
class TokenLogprob:
    """One generated token's log-probability (natural log, of the model's distribution after
    temperature, before top-k/top-p/min-p filtering, as vLLM reports by default) and the top
    alternatives as (token id, logprob) pairs, best first."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclasses.dataclass(frozen=True)
class Event:
    """What a request yields, in order: zero or more deltas, the last one with finish_reason set.

    token_ids: the new ids this delta adds (a stop token id is included, as in generate).
    text: the new text (held back while it could be the start of a stop string or a partial UTF-8
      character; the concatenation of every text is the completion's text).
    logprobs: one per token_ids entry when SamplingParams.logprobs is not None, else None.
    finish_reason: None until the last event: "stop" (stop token or string), "length"
      (max_tokens), "cancelled" (cancel() or shutdown without drain), "error" (see `error`).
    prompt_tokens / completion_tokens: usage counts, set on the last event.
    prefix_hit: how many prompt tokens came from the prefix cache (set on the first event).
    """

    token_ids: tuple[int, ...] = ()
    text: str = ""
    logprobs: tuple[TokenLogprob, ...] | None = None
    finish_reason: str | None = None
    error: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    prefix_hit: int = 0



class Request:
    """A submitted request: iterate it (thread) or `stream()` it (asyncio) for its Events.
    Events are kept, so either way of reading sees all of them from the first."""

    id: str
    prompt_tokens: int

    def __init__(self, wake: Callable[[], None], rid: str, prompt: list[int], params: SamplingParams,
                 seed: int):
        self.id, self.prompt, self.params, self.seed = rid, prompt, params, seed
        self.prompt_tokens = len(prompt)
        self._wake = wake  # tells the engine thread to look (a cancel)
        self._events: list[Event] = []
        self._cond = threading.Condition()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
        self.cancelled = False
        self.finished = False
        # The engine thread's bookkeeping.
        self.generated: list[int] = []
        self.text_sent = 0  # characters of text already in events
        self.prefix_hit = 0
        self.first = True

    def _push(self, ev: Event) -> None:
        with self._cond:
            self._events.append(ev)
            self.finished = self.finished or ev.finish_reason is not None
            self._cond.notify_all()
            waiters = list(self._waiters)
        for loop, flag in waiters:
            try:
                loop.call_soon_threadsafe(flag.set)
            except RuntimeError:  # that event loop has closed: nobody is listening there
                pass

    def __iter__(self) -> Iterator[Event]:
        i = 0
        while True:
            with self._cond:
                while i >= len(self._events):
                    self._cond.wait()
                ev = self._events[i]
            i += 1
            yield ev
            if ev.finish_reason is not None:
                return

    async def stream(self) -> AsyncIterator[Event]:
        """The same events for asyncio code: waits without holding a thread per request."""
        loop, flag = asyncio.get_running_loop(), asyncio.Event()
        with self._cond:
            self._waiters.append((loop, flag))
        i = 0
        try:
            while True:
                flag.clear()  # clear, then look: a push after the look sets it again
                with self._cond:
                    new = self._events[i:]
                if not new:
                    await flag.wait()
                    continue
                for ev in new:
                    i += 1
                    yield ev
                    if ev.finish_reason is not None:
                        return
        finally:
            with self._cond:
                self._waiters.remove((loop, flag))

    def cancel(self) -> None:
        """Ends the request ("cancelled"); its slot is free before the engine's next decode chunk."""
        self.cancelled = True
        self._wake()


def validate(prompt_ids: Any, p: SamplingParams, cfg: ModelConfig, has_tokenizer: bool,
             max_logprobs: int) -> tuple[list[int], int]:
    """What Engine.submit checks before queueing: the prompt's token ids (a list of ints) and the
    seed to use (p.seed mod 2**32, or a random one). ValueError naming the field and the fix."""
    from nanojax.infer.generate import _check_ids  # here: generate imports stops, which imports this module

    if not isinstance(p, SamplingParams):
        raise ValueError(f"params must be a SamplingParams, got {type(p).__name__}")
    if isinstance(prompt_ids, str):
        raise ValueError("the prompt must be token ids, not text: encode it with the tokenizer first")
    prompt = _check_ids(list(prompt_ids), cfg.vocab_size, "the prompt")
    if not prompt:
        raise ValueError("the prompt is empty: it needs at least one token")
    if isinstance(p.max_tokens, bool) or not isinstance(p.max_tokens, int) or p.max_tokens < 1:
        raise ValueError(f"max_tokens must be an int >= 1, got {p.max_tokens!r}")
    if len(prompt) + p.max_tokens > cfg.max_seq_len:
        room = cfg.max_seq_len - len(prompt)
        fix = f"lower max_tokens to {room}" if room >= 1 else "shorten the prompt"
        raise ValueError(f"the prompt ({len(prompt)} tokens) + max_tokens ({p.max_tokens}) exceeds the "
                         f"context of {cfg.max_seq_len} tokens; {fix}")
    check_sampling(p.temperature, p.top_k, p.top_p, p.min_p, None, cfg.vocab_size)
    _check_ids(list(p.stop_token_ids), cfg.vocab_size, "stop_token_ids")
    if isinstance(p.stop, str) or not all(isinstance(s, str) and s for s in p.stop):
        raise ValueError(f"stop must be a tuple of non-empty strings, got {p.stop!r}")
    if p.stop and not has_tokenizer:
        raise ValueError("stop strings need text: this engine was built without a tokenizer")
    if p.logprobs is not None and (isinstance(p.logprobs, bool) or not isinstance(p.logprobs, int)
                                   or not 0 <= p.logprobs <= max_logprobs):
        raise ValueError(f"logprobs must be None or an int in [0, {max_logprobs}], got {p.logprobs!r}")
    if p.seed is not None and (isinstance(p.seed, bool) or not isinstance(p.seed, int)):
        raise ValueError(f"seed must be an int or None, got {p.seed!r}")
    seed = random.getrandbits(32) if p.seed is None else p.seed % 2**32
    return prompt, seed
