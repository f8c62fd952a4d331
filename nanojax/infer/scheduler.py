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
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Iterator


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
    """A submitted request: iterate it (thread) or `stream()` it (asyncio) for its Events."""

    id: str
    prompt_tokens: int

    def __iter__(self) -> Iterator[Event]:
        raise NotImplementedError

    def stream(self) -> AsyncIterator[Event]:
        raise NotImplementedError

    def cancel(self) -> None:
        raise NotImplementedError


class Engine:
    """See the module docstring. stats() returns at least: queue_len, active_slots, slots,
    batch_occupancy (mean active/slots over recent decode chunks), tokens_per_s (recent),
    tokens_total, requests_total, requests_running, prefix_hits, prefix_tokens_reused,
    executables (compiled variants so far)."""
