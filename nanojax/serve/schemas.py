"""The OpenAI API's request bodies as pydantic models, with OpenAI's field names.

Only requests are modelled: responses are plain dicts built in app.py, which reads more directly
than a response model per endpoint. Unknown fields are ignored, as OpenAI's API does (clients
send `user`, `frequency_penalty`, ...). Sampler extensions that vLLM accepts (`top_k`, `min_p`)
are accepted here too. Range checks here give errors that name the field (`param`); what depends on
the model (prompt + max_tokens against the context, token ids against the vocabulary) is checked
by the engine's submit(), which raises ValueError with its own message.

References: https://platform.openai.com/docs/api-reference/completions and
https://platform.openai.com/docs/api-reference/chat (field names and types);
vLLM's protocol.py for the extensions.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_N = 16  # choices per request; each one takes a decode slot, so a bound keeps one request from
MAX_LOGPROBS = 20  # hogging the engine. 20 is OpenAI's top_logprobs bound (vLLM's default too).


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool = False


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    top_k: int | None = None  # vLLM: -1 or 0 means off
    min_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    n: Annotated[int, Field(ge=1, le=MAX_N)] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    # OpenAI fields this server does not implement: accepted at their neutral value, refused
    # otherwise (silently ignoring a penalty or a bias would change what the client asked for).
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None

    @field_validator("frequency_penalty", "presence_penalty")
    @classmethod
    def _no_penalty(cls, v: float | None) -> float | None:
        if v:
            raise ValueError("is not supported by this server; send 0 or leave it out")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _no_bias(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        if v:
            raise ValueError("is not supported by this server; leave it out")
        return v

    @field_validator("top_k")
    @classmethod
    def _top_k(cls, v: int | None) -> int | None:
        if v is None or v in (0, -1):
            return None  # vLLM's "no top-k"
        if v < 1:
            raise ValueError("top_k must be >= 1, or 0 / -1 / null for no top-k filtering")
        return v

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> list[str]:
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > 4:  # OpenAI's bound; each is matched on the host every chunk
            raise ValueError(f"at most 4 stop strings, got {len(stops)}")
        if any(s == "" for s in stops):
            raise ValueError("stop strings must be non-empty")
        return stops


class CompletionRequest(_Request):
    """POST /v1/completions. prompt: a string, a list of strings, a list of token ids, or a list of
    lists of token ids (one completion group per prompt). logprobs: top alternatives per token
    (0..20); 0 gives each chosen token's own logprob only."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: Annotated[int, Field(ge=1)] | None = 16  # OpenAI's default for completions
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    echo: bool = False
    suffix: str | None = None

    @field_validator("echo")
    @classmethod
    def _echo(cls, v: bool) -> bool:
        if v:
            raise ValueError("echo is not supported by this server; send echo=false and prepend the "
                             "prompt yourself")
        return v

    @field_validator("suffix")
    @classmethod
    def _suffix(cls, v: str | None) -> str | None:
        if v:
            raise ValueError("suffix (insertion) is not supported: these models only continue text")
        return v

    def prompts(self) -> list[str | list[int]]:
        """The prompt field as a list of prompts, each a string or a list of token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            return []
        if all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]


class ChatMessage(BaseModel):
    """One chat message. content may be a string or OpenAI's list of parts (only text parts)."""

    model_config = ConfigDict(extra="allow")  # name, tool_call_id, ...: passed to the template

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict] | None = None

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError(f"only text content parts are supported, got a part of type "
                                 f"{part.get('type')!r}; send {{\"type\": \"text\", \"text\": ...}}")
            parts.append(part["text"])
        return "".join(parts)


class ChatCompletionRequest(_Request):
    """POST /v1/chat/completions. max_completion_tokens is OpenAI's newer name for max_tokens; with
    neither, the completion may run to the end of the context. logprobs (bool) + top_logprobs
    (0..20) as OpenAI's chat API has them."""

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    add_generation_prompt: bool = True  # vLLM's extension: template the assistant turn's start
    tools: list[dict] | None = None

    @field_validator("tools")
    @classmethod
    def _no_tools(cls, v: list[dict] | None) -> list[dict] | None:
        if v:
            raise ValueError("tool calling is not supported by this server; leave tools out")
        return v

    def token_budget(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
