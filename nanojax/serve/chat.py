"""Chat templates: turn OpenAI chat messages into the one prompt string a model was trained on.

A Hugging Face model directory carries its template as jinja2 source in chat_template.jinja or
tokenizer_config.json's `chat_template`; it is rendered the way transformers' `apply_chat_template`
does (facts from transformers/utils/chat_template_utils.py): a sandboxed environment with trim_blocks and
lstrip_blocks, the loopcontrols extension, a `tojson` filter and a `raise_exception(msg)` global,
and the variables `messages` (a list of {"role", "content"} dicts), `add_generation_prompt`,
`bos_token`, `eos_token` (and the other special tokens the config names). Templates are
user-supplied code, so the sandbox matters: it refuses attribute access to Python internals.

Models trained here (char or BPE tokenizers) have no template; they get DEFAULT_TEMPLATE, plain
text a char vocabulary can spell:

    system: You are terse.
    user: Hello.
    assistant:
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

DEFAULT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] }}: {{ message['content'] }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


class ChatTemplateError(ValueError):
    """The template refused the messages (its raise_exception) or failed to render: a 400."""


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(message)


def _token_text(value: Any) -> str:
    """A special token from tokenizer_config.json: a string, or an AddedToken dict {"content": ...}."""
    if isinstance(value, dict):
        return str(value.get("content", ""))
    return value if isinstance(value, str) else ""


class ChatTemplate:
    """A compiled chat template. render(messages) -> the prompt text (not yet tokenized)."""

    def __init__(self, source: str, special_tokens: dict[str, str] | None = None):
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(x, ensure_ascii=False, indent=indent)
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            self.template = env.from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise ValueError(f"the chat template does not parse (line {e.lineno}: {e.message}); fix "
                             "tokenizer_config.json's chat_template or pass another one") from None
        self.source = source
        self.special_tokens = {"bos_token": "", "eos_token": "", **(special_tokens or {})}

    @classmethod
    def from_dir(cls, directory: str | Path) -> ChatTemplate | None:
        """The template of an HF model directory, or None when it has none: chat_template.jinja
        (where transformers >= 4.43 saves it) or tokenizer_config.json's chat_template (a string, or
        a list of named templates, of which "default" is used). Special tokens come from
        tokenizer_config.json either way."""
        directory = Path(directory)
        path = directory / "tokenizer_config.json"
        config: dict[str, Any] = {}
        if path.is_file():
            try:
                config = json.loads(path.read_text(encoding="utf-8"))
            except ValueError as e:
                raise ValueError(f"{path} is not valid JSON ({e}); fix or remove it") from None
        source = config.get("chat_template")
        if isinstance(source, list):  # [{"name": "default", "template": "..."}, ...]
            named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
            source = named.get("default")
        jinja_file = directory / "chat_template.jinja"
        if jinja_file.is_file():
            source = jinja_file.read_text(encoding="utf-8")
        if not isinstance(source, str) or not source:
            return None
        specials = {k: _token_text(v) for k, v in config.items()
                    if k.endswith("_token") and isinstance(v, str | dict)}
        return cls(source, specials)

    @classmethod
    def default(cls) -> ChatTemplate:
        return cls(DEFAULT_TEMPLATE)

    def render(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        """messages: [{"role": ..., "content": str}, ...] -> the prompt text."""
        try:
            return self.template.render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                        **self.special_tokens)
        except ChatTemplateError:
            raise
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"the model's chat template failed on these messages: {e}") from None
