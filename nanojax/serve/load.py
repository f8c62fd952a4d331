"""Loading a model to sample or serve: a training workdir, a scripts/quantize.py output directory,
or a Hugging Face model directory. scripts/sample.py and scripts/serve.py both use load_model.

HF models bring what their config says about generation: the eos id(s) end a request, and a Llama
family model (anything but GPT-2) gets its BOS id before a text prompt, as HF's tokenizers add it.
The HF directory's tokenizer_config.json chat_template (if any) comes along for /v1/chat/completions.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from nanojax.config import ModelConfig
from nanojax.serve.chat import ChatTemplate


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    """cfg, params and tokenizer, plus: stop_token_ids (ids that end generation), prompt_prefix
    (ids to put before a text prompt), chat_template (None: the source has none)."""

    cfg: ModelConfig
    params: Any
    tokenizer: Any
    stop_token_ids: tuple[int, ...] = ()
    prompt_prefix: tuple[int, ...] = ()
    chat_template: ChatTemplate | None = None


def load_model(workdir: str | None = None, hf_dir: str | None = None) -> LoadedModel:
    """Exactly one of workdir (training or quantized) or hf_dir. Raises ValueError / OSError with a
    message for the user (the entry scripts print it as `error: ...`)."""
    import nanojax as nj

    if bool(workdir) == bool(hf_dir):
        raise ValueError("pass exactly one of --workdir or --hf_dir")
    if workdir:
        from nanojax.quant.io import is_quantized_dir

        if is_quantized_dir(workdir):  # written by scripts/quantize.py
            cfg, params, tok = nj.load_quantized(workdir)
            if tok is None:
                raise ValueError(f"{workdir} holds no tokenizer file; re-run scripts/quantize.py from a "
                                 "workdir that has one")
        else:
            cfg, params, tok = nj.load_checkpoint(workdir)
        return LoadedModel(cfg, params, tok, chat_template=ChatTemplate.from_dir(workdir))
    try:
        from nanojax.interop import load_hf
    except ImportError as e:
        raise ValueError(f"--hf_dir needs nanojax.interop ({e})") from e
    from nanojax.tokenizer import load_tokenizer

    cfg, params = load_hf(hf_dir)
    hf_cfg = json.loads((Path(hf_dir) / "config.json").read_text())
    eos = hf_cfg.get("eos_token_id")
    stops = (eos,) if isinstance(eos, int) else tuple(eos or ())
    bos = hf_cfg.get("bos_token_id")
    prefix = (bos,) if isinstance(bos, int) and hf_cfg.get("model_type") != "gpt2" else ()  # Llama wants BOS
    return LoadedModel(cfg, params, load_tokenizer(hf_dir), stops, prefix, ChatTemplate.from_dir(hf_dir))
