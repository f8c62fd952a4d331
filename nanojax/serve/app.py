"""The OpenAI-compatible HTTP app over the continuous-batching engine (nanojax/infer/scheduler.py).

    app = create_app(engine, tokenizer, "shakespeare")      # engine not started: the app starts it
    uvicorn.run(app, host="127.0.0.1", port=8000)           # scripts/serve.py does this

Endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (both with
`stream: true` as server-sent events), GET /health, GET /metrics (Prometheus text).

The handlers only tokenize, submit and read: one engine thread owns the device. A request with
n > 1 is n engine submissions (seeds seed, seed+1, ...), read concurrently. A streaming client
that goes away cancels its submissions at once (Starlette cancels the response when the
connection closes; the generator's `finally` calls req.cancel()), which frees their slots.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.background import BackgroundTask

from nanojax.infer.scheduler import Event, SamplingParams
from nanojax.serve.chat import ChatTemplate, ChatTemplateError
from nanojax.serve.errors import APIError, install_handlers
from nanojax.serve.metrics import prometheus_text
from nanojax.serve.schemas import ChatCompletionRequest, CompletionRequest

FINISH = {"stop": "stop", "length": "length", "cancelled": "abort"}  # "abort": vLLM's name


def _cancel(reqs: Sequence[Any]) -> None:
    """Cancels every request (a no-op for finished ones): the one way a request is given up."""
    for r in reqs:
        r.cancel()


def _param_of(message: str) -> str | None:
    """Which request field an engine ValueError is about, for the error body's `param`."""
    for name in ("max_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "stop", "logprobs"):
        if name in message:
            return name
    return "prompt" if "prompt" in message or "context" in message else None


class _Server:
    """What the handlers share: the engine, the tokenizer and how prompts become ids."""

    def __init__(self, engine: Any, tokenizer: Any, model_name: str, chat_template: ChatTemplate,
                 stop_token_ids: Sequence[int], prompt_prefix: Sequence[int], max_context: int,
                 vocab_size: int):
        self.engine, self.tok, self.model_name = engine, tokenizer, model_name
        self.chat_template, self.stop_token_ids = chat_template, tuple(int(t) for t in stop_token_ids)
        self.prompt_prefix, self.max_context, self.vocab_size = list(prompt_prefix), max_context, vocab_size
        self.created = int(time.time())
        self.draining = False

    def check_model(self, name: str) -> None:
        if name != self.model_name:
            raise APIError(404, f"the model {name!r} does not exist; this server serves "
                           f"{self.model_name!r} (GET /v1/models)", "model", "model_not_found")

    def encode(self, prompt: str | list[int], param: str, prefix: bool = True) -> list[int]:
        if isinstance(prompt, str):
            try:
                ids = (self.prompt_prefix if prefix else []) + self.tok.encode(prompt)
            except ValueError as e:  # a char tokenizer meets a character it has never seen
                raise APIError(400, f"{param}: {e}", param, "invalid_value") from None
        else:
            bad = [t for t in prompt if not 0 <= t < self.vocab_size]
            if bad:
                raise APIError(400, f"{param}: token ids {bad[:5]} are outside the vocabulary "
                               f"[0, {self.vocab_size})", param, "invalid_value")
            ids = list(prompt)
        if not ids:
            raise APIError(400, f"{param} is empty; send at least one token of text", param, "invalid_value")
        return ids

    def sampling(self, body: Any, max_tokens: int, logprobs: int | None, i: int) -> SamplingParams:
        return SamplingParams(
            max_tokens=max_tokens, temperature=1.0 if body.temperature is None else body.temperature,
            top_p=body.top_p, top_k=body.top_k, min_p=body.min_p,
            seed=None if body.seed is None else body.seed + i,  # n choices: seed, seed+1, ...
            stop_token_ids=self.stop_token_ids, stop=tuple(body.stop or ()), logprobs=logprobs)

    def check_length(self, ids: list[int], max_tokens: int, param: str) -> None:
        """The context check, here so the error names the field at fault (the engine checks too)."""
        if len(ids) >= self.max_context:
            raise APIError(400, f"{param} is {len(ids)} tokens, but the model's context is "
                           f"{self.max_context} tokens (prompt + max_tokens must fit); shorten it", param,
                           "context_length_exceeded")
        if len(ids) + max_tokens > self.max_context:
            raise APIError(400, f"max_tokens={max_tokens} with a {len(ids)}-token {param} needs "
                           f"{len(ids) + max_tokens} tokens of context, but the model has "
                           f"{self.max_context}; ask for at most {self.max_context - len(ids)}",
                           "max_tokens", "context_length_exceeded")

    def submit(self, prompts: list[list[int]], params: list[SamplingParams]) -> list[Any]:
        """One engine submission per (prompt, params); all or none (a refusal cancels the rest)."""
        reqs: list[Any] = []
        try:
            for ids, sp in zip(prompts, params, strict=True):
                reqs.append(self.engine.submit(ids, sp))
        except ValueError as e:
            _cancel(reqs)
            raise APIError(400, str(e), _param_of(str(e)), "invalid_value") from None
        except BaseException:
            _cancel(reqs)
            raise  # QueueFull -> 429, EngineStopped -> 503 (errors.py)
        return reqs

    def token_text(self, token: int) -> str:
        return self.tok.decode([int(token)])


async def _merged(reqs: list[Any]) -> AsyncIterator[tuple[int, Event]]:
    """The events of several requests as they come, tagged with the request's index. Leaving early
    (an exception, a cancelled client) cancels every request that has not finished."""
    if len(reqs) == 1:  # the common case needs no queue
        try:
            async for ev in reqs[0].stream():
                yield 0, ev
        finally:
            _cancel(reqs)
        return
    queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()

    async def pump(i: int, req: Any) -> None:
        async for ev in req.stream():
            await queue.put((i, ev))

    tasks = [asyncio.create_task(pump(i, r)) for i, r in enumerate(reqs)]
    try:
        left = len(reqs)
        while left:
            i, ev = await queue.get()
            yield i, ev
            left -= ev.finish_reason is not None
    finally:
        for t in tasks:
            t.cancel()
        _cancel(reqs)


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}




def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class _Choices:
    """Accumulates events per choice index: text, logprobs, finish reason, usage counts."""

    def __init__(self, n: int):
        self.text = [""] * n
        self.logprobs: list[list[Any]] = [[] for _ in range(n)]
        self.finish: list[str | None] = [None] * n
        self.prompt_tokens = [0] * n
        self.completion_tokens = [0] * n

    def add(self, i: int, ev: Event) -> None:
        self.text[i] += ev.text
        self.logprobs[i] += list(ev.logprobs or ())
        if ev.finish_reason is not None:
            self.finish[i] = FINISH.get(ev.finish_reason, ev.finish_reason)
            self.prompt_tokens[i], self.completion_tokens[i] = ev.prompt_tokens, ev.completion_tokens

    def usage(self, per_prompt: int) -> dict[str, int]:
        """OpenAI counts a prompt once however many choices it has (n); here `per_prompt` = n."""
        prompt = sum(self.prompt_tokens[::per_prompt])
        return _usage(prompt, sum(self.completion_tokens))


async def _collect(reqs: list[Any]) -> _Choices:
    """Every event of a non-streaming call's requests, gathered per choice; an engine error is a 500."""
    acc = _Choices(len(reqs))
    async for i, ev in _merged(reqs):
        if ev.finish_reason == "error":
            raise APIError(500, f"the engine failed on this request: {ev.error}", None, "engine_error")
        acc.add(i, ev)
    return acc


def _sse_engine_error(ev: Event) -> str:
    """The SSE chunk that ends a stream whose request the engine failed."""
    return _sse({"error": {"message": f"the engine failed: {ev.error}", "type": "server_error",
                           "param": None, "code": "engine_error"}})


def _completion_logprobs(srv: _Server, lps: Sequence[Any], offset: int) -> dict[str, Any]:
    """OpenAI's legacy completions logprobs: parallel lists, text_offset counted from the prompt's end
    (the prompt's length in characters, as OpenAI reports without echo)."""
    tokens = [srv.token_text(lp.token) for lp in lps]
    offsets = []
    for t in tokens:
        offsets.append(offset)
        offset += len(t)
    return {"tokens": tokens, "token_logprobs": [lp.logprob for lp in lps],
            "top_logprobs": [{srv.token_text(t): v for t, v in lp.top} for lp in lps],
            "text_offset": offsets}


def _chat_logprobs(srv: _Server, lps: Sequence[Any]) -> dict[str, Any]:
    def entry(token: int, logprob: float) -> dict[str, Any]:
        text = srv.token_text(token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {"content": [{**entry(lp.token, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}
                        for lp in lps]}


async def _completions(srv: _Server, body: CompletionRequest) -> Any:
    srv.check_model(body.model)
    prompts = body.prompts()
    if not prompts:
        raise APIError(400, "prompt is empty; send a string or a list of token ids", "prompt",
                       "invalid_value")
    ids = [srv.encode(p, "prompt") for p in prompts]
    for x in ids:
        srv.check_length(x, body.max_tokens or 16, "prompt")
    texts = [p if isinstance(p, str) else srv.tok.decode(p) for p in prompts]
    n = body.n
    flat_ids = [x for x in ids for _ in range(n)]
    sps = [srv.sampling(body, body.max_tokens or 16, body.logprobs, i) for _ in ids for i in range(n)]
    reqs = srv.submit(flat_ids, sps)
    rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    head = {"id": rid, "object": "text_completion", "created": created, "model": srv.model_name}
    offsets = [len(texts[k // n]) for k in range(len(reqs))]

    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        async def events() -> AsyncIterator[str]:
            acc = _Choices(len(reqs))
            async for i, ev in _merged(reqs):
                if ev.finish_reason == "error":
                    yield _sse_engine_error(ev)
                    return
                lp = None
                if body.logprobs is not None and ev.logprobs:
                    lp = _completion_logprobs(srv, ev.logprobs, offsets[i])
                    offsets[i] += sum(len(t) for t in lp["tokens"])
                acc.add(i, ev)
                if ev.text or ev.finish_reason or lp:
                    chunk = {**head, "choices": [{"index": i, "text": ev.text, "logprobs": lp,
                                                  "finish_reason": acc.finish[i]}]}
                    yield _sse({**chunk, "usage": None} if include_usage else chunk)
            if include_usage:
                yield _sse({**head, "choices": [], "usage": acc.usage(n)})
            yield "data: [DONE]\n\n"

        return _streaming(events(), reqs)

    acc = await _collect(reqs)
    choices = [{"index": k, "text": acc.text[k], "finish_reason": acc.finish[k],
                "logprobs": (_completion_logprobs(srv, acc.logprobs[k], len(texts[k // n]))
                             if body.logprobs is not None else None)} for k in range(len(reqs))]
    return {**head, "choices": choices, "usage": acc.usage(n)}


async def _chat(srv: _Server, body: ChatCompletionRequest) -> Any:
    srv.check_model(body.model)
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs needs logprobs=true", "top_logprobs", "invalid_value")
    try:
        messages = [{**m.model_dump(exclude_none=True), "content": m.text()} for m in body.messages]
        text = srv.chat_template.render(messages, add_generation_prompt=body.add_generation_prompt)
    except (ChatTemplateError, ValueError) as e:
        raise APIError(400, str(e), "messages", "invalid_value") from None
    ids = srv.encode(text, "messages", prefix=False)  # templates write their own BOS, as HF's do
    budget = body.token_budget()
    if budget is None:  # OpenAI: no limit but the context
        budget = max(1, srv.max_context - len(ids))
    srv.check_length(ids, budget, "messages")
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    reqs = srv.submit([ids] * body.n, [srv.sampling(body, budget, logprobs, i) for i in range(body.n)])
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        head = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": srv.model_name}

        def chunk(i: int, delta: dict, finish: str | None = None, lp: Any = None) -> str:
            out = {**head, "choices": [{"index": i, "delta": delta, "logprobs": lp, "finish_reason": finish}]}
            return _sse({**out, "usage": None} if include_usage else out)

        async def events() -> AsyncIterator[str]:
            for i in range(len(reqs)):
                yield chunk(i, {"role": "assistant", "content": ""})
            acc = _Choices(len(reqs))
            async for i, ev in _merged(reqs):
                if ev.finish_reason == "error":
                    yield _sse_engine_error(ev)
                    return
                acc.add(i, ev)
                lp = _chat_logprobs(srv, ev.logprobs) if body.logprobs and ev.logprobs else None
                if ev.text or lp or ev.finish_reason:
                    yield chunk(i, {"content": ev.text} if ev.text else {}, acc.finish[i], lp)
            if include_usage:
                yield _sse({**head, "choices": [], "usage": acc.usage(body.n)})
            yield "data: [DONE]\n\n"

        return _streaming(events(), reqs)

    acc = await _collect(reqs)
    choices = [{"index": k, "message": {"role": "assistant", "content": acc.text[k]},
                "logprobs": _chat_logprobs(srv, acc.logprobs[k]) if body.logprobs else None,
                "finish_reason": acc.finish[k]} for k in range(len(reqs))]
    return {"id": rid, "object": "chat.completion", "created": created, "model": srv.model_name,
            "choices": choices, "usage": acc.usage(body.n)}


def _streaming(gen: AsyncIterator[str], reqs: list[Any]) -> StreamingResponse:
    """SSE response. The background task cancels the requests once the response ends however it
    ends: a client that disconnects before the first chunk never starts `gen`, so its `finally`
    alone would not run."""
    return StreamingResponse(gen, media_type="text/event-stream", background=BackgroundTask(_cancel, reqs),
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def create_app(engine: Any, tokenizer: Any, model_name: str, *, chat_template: ChatTemplate | None = None,
               stop_token_ids: Sequence[int] = (), prompt_prefix: Sequence[int] = (),
               max_context: int | None = None, manage_engine: bool = True,
               drain_timeout: float = 30.0) -> FastAPI:
    """The FastAPI app serving `engine` (a nanojax.infer.scheduler.Engine) as `model_name`.

    tokenizer: encode(str) -> list[int], decode(list[int]) -> str (nanojax.tokenizer).
    chat_template: for /v1/chat/completions; None uses chat.DEFAULT_TEMPLATE.
    stop_token_ids: ids that end every request (an HF model's eos). prompt_prefix: ids put before
      every completions prompt given as text (Llama's BOS).
    max_context: the model's context in tokens (default engine.cfg.max_seq_len): a chat request with
      no max_tokens may fill it.
    manage_engine: the app starts the engine on startup and shuts it down (draining running
      requests for up to drain_timeout seconds) on shutdown.
    """
    cfg = getattr(engine, "cfg", None)
    if max_context is None:
        if cfg is None:
            raise ValueError("create_app needs max_context (the model's context in tokens): the engine "
                             "has no .cfg to read it from")
        max_context = int(cfg.max_seq_len)
    vocab = int(getattr(cfg, "vocab_size", 0) or tokenizer.vocab_size)
    srv = _Server(engine, tokenizer, model_name, chat_template or ChatTemplate.default(), stop_token_ids,
                  prompt_prefix, int(max_context), vocab)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if manage_engine:
            engine.start()
        yield
        srv.draining = True
        if manage_engine:  # off the event loop: draining blocks until requests finish
            await asyncio.to_thread(engine.shutdown, drain=True, timeout=drain_timeout)

    app = FastAPI(title="nanojax", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = srv
    install_handlers(app)

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": srv.created,
                                            "owned_by": "nanojax", "max_model_len": srv.max_context}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest) -> Any:
        return await _completions(srv, body)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest) -> Any:
        return await _chat(srv, body)

    @app.get("/health")
    async def health() -> JSONResponse:
        try:
            stats = engine.stats()
        except Exception as e:  # noqa: BLE001  (a dead engine is exactly what /health reports)
            return JSONResponse({"status": "error", "error": str(e)}, status_code=503)
        if srv.draining or not stats.get("alive", True):
            return JSONResponse({"status": "stopping"}, status_code=503)
        return JSONResponse({"status": "ok", "model": model_name})

    @app.get("/metrics")
    async def metrics(request: Request) -> PlainTextResponse:
        return PlainTextResponse(prometheus_text(engine.stats()),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    return app
