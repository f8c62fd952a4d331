"""Inference: `generate` and `generate_stream`, over the compiled engine (infer/engine.py). The
samplers it compiles in live in nanojax/sampling.py; stops in infer/stops.py.

    out = nj.generate(params, cfg, [[1, 2, 3], [4, 5]], max_new_tokens=32, temperature=0.8,
                      top_k=40, stop_tokens=[0])          # -> [[new ids], [new ids]]
    for chunk in generate_stream(params, cfg, prompts, max_new_tokens=300, chunk_size=16,
                                 stop_strings=["\\n\\n"], detokenize=tok.decode):
        ...                                               # chunk: new ids per prompt, this chunk

Stop semantics: a stop token id *is* included in the returned tokens (as in HF `generate`), and
nothing after it is; a stop string is *not* included: the output is cut just before it (on token
boundaries; a token that straddles the stop string's start is dropped).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from nanojax.config import ModelConfig
from nanojax.infer.engine import KV_CACHE_DTYPES, _start
from nanojax.infer.speculative import DraftSpec, start_speculative
from nanojax.infer.stops import _cut_at_stop_token, _stop_ids, _TextWatch
from nanojax.model import Params
from nanojax.sampling import check_sampling, make_spec

# ----------------------------------------------------------------------------------------------
# Validation: every bad input is a clear error before anything compiles.


def _check_ids(ids: Any, vocab_size: int, what: str) -> list[int]:
    arr = np.asarray(ids)
    if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"{what} must be a flat list of int token ids, got {ids!r:.80}")
    if arr.size and (arr.min() < 0 or arr.max() >= vocab_size):
        bad = arr[(arr < 0) | (arr >= vocab_size)][0]
        raise ValueError(f"{what} holds token id {int(bad)}, outside the vocabulary [0, {vocab_size})")
    return [int(i) for i in arr]


def _check_prompts(prompts: Any, cfg: ModelConfig) -> list[list[int]]:
    if isinstance(prompts, str) or not isinstance(prompts, Sequence) or len(prompts) == 0:
        raise ValueError("prompts must be a non-empty list of token-id lists, e.g. [[1, 2, 3], [4, 5]]; "
                         "encode text with the tokenizer first")
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, int | np.integer):
            raise ValueError(f"prompts[{i}] is a single int: pass a list of prompts, e.g. [[...]]")
        ids = _check_ids(p, cfg.vocab_size, f"prompts[{i}]")
        if not ids:
            raise ValueError(f"prompts[{i}] is empty: every prompt needs at least one token "
                             "(e.g. a BOS or newline token)")
        if len(ids) > cfg.max_seq_len:
            raise ValueError(f"prompts[{i}] has {len(ids)} tokens, more than the context "
                             f"max_seq_len={cfg.max_seq_len}; shorten it (e.g. keep its last tokens)")
        out.append(ids)
    return out


def _validate(params: Params, cfg: ModelConfig, prompts: Any, max_new_tokens: int, temperature: float,
              top_k: int | None, top_p: float | None, min_p: float | None,
              repetition_penalty: float | None, stop_tokens: Any, overflow: str, chunk_size: int,
              stop_strings: Any, detokenize: Any, kv_cache_dtype: str | None = None,
              lora: Any = None) -> tuple[list[list[int]], list[int], Any]:
    if not isinstance(cfg, ModelConfig):
        raise TypeError(f"cfg must be a nanojax ModelConfig, got {type(cfg).__name__} "
                        "(the argument order is generate(params, cfg, prompts, ...))")
    prompts = _check_prompts(prompts, cfg)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int | np.integer) \
            or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    check_sampling(temperature, top_k, top_p, min_p, repetition_penalty, cfg.vocab_size)
    if overflow not in ("error", "slide"):
        raise ValueError(f"overflow must be 'error' or 'slide', got {overflow!r}")
    if overflow == "error":
        longest = max(len(p) for p in prompts)
        if longest + max_new_tokens > cfg.max_seq_len:
            raise ValueError(
                f"the longest prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                f"context max_seq_len={cfg.max_seq_len}; lower max_new_tokens to "
                f"{cfg.max_seq_len - longest}, shorten the prompt, or pass overflow='slide'"
            )
    if not isinstance(chunk_size, int | np.integer) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
    stops = [] if stop_tokens is None else _check_ids(
        [stop_tokens] if isinstance(stop_tokens, int | np.integer) else stop_tokens,
        cfg.vocab_size, "stop_tokens")
    if stop_strings is not None:
        if isinstance(stop_strings, str) or not all(isinstance(s, str) and s for s in stop_strings):
            raise ValueError(f"stop_strings must be a list of non-empty strings, got {stop_strings!r}")
        if detokenize is None:
            raise ValueError("stop_strings need detokenize=tokenizer.decode to turn ids into text")
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype must be one of {KV_CACHE_DTYPES} (None: the compute dtype), "
                         f"got {kv_cache_dtype!r}")
    if kv_cache_dtype is not None and cfg.attn_impl == "pallas":
        raise ValueError(f"kv_cache_dtype={kv_cache_dtype!r} with attn_impl='pallas': the Pallas decode "
                         "kernel reads a float cache; use the default kv_cache_dtype or attn_impl='auto'")
    wte = params.get("wte") if isinstance(params, dict) else None
    if wte is None or tuple(wte.shape) != (cfg.vocab_size, cfg.d_model):
        raise ValueError(f"params do not match cfg: wte is {getattr(wte, 'shape', None)}, expected "
                         f"({cfg.vocab_size}, {cfg.d_model})")
    return prompts, stops, _check_lora(lora, cfg, len(prompts))


def _check_lora(lora: Any, cfg: ModelConfig, n_prompts: int) -> Any:
    """None, one LoraAdapter for every row, or a list with one adapter (or None) per prompt, which
    becomes one StackedLora so that every row decodes in the same compiled call."""
    from nanojax.lora import LoraAdapter, LoraError, stack_adapters
    from nanojax.lora.adapter import check_adapter

    if lora is None:
        return None
    if isinstance(lora, LoraAdapter):
        check_adapter(lora, cfg)
        return lora
    if isinstance(lora, list | tuple):
        if len(lora) != n_prompts:
            raise LoraError(f"lora is a list of {len(lora)} adapters for {n_prompts} prompts; give one per "
                            "prompt (None for a row without one), or a single adapter for all")
        return None if all(a is None for a in lora) else stack_adapters(list(lora), cfg)
    raise LoraError(f"lora must be a LoraAdapter, a list of them (None allowed) per prompt, or None; got "
                    f"{type(lora).__name__}")


def _check_draft(draft: Any, cfg: ModelConfig, prompts: list[list[int]], max_new: int, k: Any, ngram: Any,
                 repetition_penalty: float | None, overflow: str, kv_cache_dtype: str | None,
                 lora: Any) -> tuple[Params | None, DraftSpec] | None:
    """None, or (draft params, DraftSpec) for speculative decoding (infer/speculative.py)."""
    if draft is None:
        return None
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
        raise ValueError(f"num_speculative_tokens must be an int >= 1 (tokens the draft proposes per "
                         f"target call; 3-8 is typical), got {k!r}")
    what = "speculative decoding (draft=...)"
    if overflow != "error":
        raise ValueError(f"{what} supports overflow='error' only, got overflow={overflow!r}; keep "
                         "prompt + max_new_tokens within max_seq_len or decode without a draft")
    if kv_cache_dtype is not None:
        raise ValueError(f"{what} keeps the KV cache in the compute dtype; got kv_cache_dtype="
                         f"{kv_cache_dtype!r}: drop it or decode without a draft")
    if lora is not None:
        raise ValueError(f"{what} does not take a LoRA adapter; merge it first (nj.merge_lora) or "
                         "decode without a draft")
    if repetition_penalty is not None and repetition_penalty != 1.0:
        raise ValueError(f"{what} does not support repetition_penalty (got {repetition_penalty!r}): "
                         "the penalty of each verified position would depend on the draft tokens before it")
    if cfg.attn_impl == "pallas":
        raise ValueError(f"{what} verifies k+1 tokens per step with XLA attention; the target has "
                         "attn_impl='pallas': use attn_impl='auto' for it")
    if isinstance(draft, str):
        if draft != "prompt_lookup":
            raise ValueError(f"draft must be (draft_params, draft_cfg), 'prompt_lookup' or None, "
                             f"got {draft!r}")
        if isinstance(ngram, bool) or not isinstance(ngram, int | np.integer) or ngram < 1:
            raise ValueError(f"prompt_lookup_ngram must be an int >= 1 (the longest n-gram matched), "
                             f"got {ngram!r}")
        return None, DraftSpec(None, int(k), int(ngram))
    if not (isinstance(draft, tuple | list) and len(draft) == 2 and isinstance(draft[1], ModelConfig)):
        raise ValueError("draft must be a (draft_params, draft_cfg) pair with a nanojax ModelConfig, "
                         f"'prompt_lookup' or None; got {type(draft).__name__}")
    dparams, dcfg = draft
    if dcfg.vocab_size != cfg.vocab_size:
        raise ValueError(f"the draft model's vocab_size ({dcfg.vocab_size}) differs from the target's "
                         f"({cfg.vocab_size}); the draft must share the target's tokenizer and vocabulary")
    if dcfg.attn_impl == "pallas":
        raise ValueError("the draft model has attn_impl='pallas'; speculative decoding needs "
                         "attn_impl='auto'")
    wte = dparams.get("wte") if isinstance(dparams, dict) else None
    if wte is None or tuple(wte.shape) != (dcfg.vocab_size, dcfg.d_model):
        raise ValueError(f"draft params do not match draft_cfg: wte is {getattr(wte, 'shape', None)}, "
                         f"expected ({dcfg.vocab_size}, {dcfg.d_model})")
    longest = max(len(p) for p in prompts)
    if longest + max_new > dcfg.max_seq_len:
        raise ValueError(f"the longest prompt ({longest} tokens) + max_new_tokens ({max_new}) exceeds the "
                         f"draft model's context max_seq_len={dcfg.max_seq_len}; lower max_new_tokens to "
                         f"{max(0, dcfg.max_seq_len - longest)} or use a draft with a longer context")
    return dparams, DraftSpec(dcfg, int(k))


# ----------------------------------------------------------------------------------------------
# The public calls: streaming, sliding past the context, and generate on top of the stream.


def generate_stream(
    params: Params,
    cfg: ModelConfig,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    repetition_penalty: float | None = None,
    stop_tokens: Sequence[int] | None = None,
    seed: int = 0,
    *,
    chunk_size: int = 16,
    stop_strings: Sequence[str] | None = None,
    detokenize: Callable[[list[int]], str] | None = None,
    overflow: str = "error",
    kv_cache_dtype: str | None = None,
    lora: Any = None,
    draft: Any = None,
    num_speculative_tokens: int = 4,
    prompt_lookup_ngram: int = 3,
    stats: dict | None = None,
) -> Iterator[list[list[int]]]:
    """Like `generate`, but yields the new tokens as they come: one list per prompt per chunk.

    Each chunk is one compiled multi-step decode call of up to `chunk_size` tokens, the KV cache
    carried from chunk to chunk; the host syncs once per chunk. Concatenating the yields gives
    exactly `generate`'s result for the same arguments and seed. A finished row yields [].

    stop_strings: text that ends a row; checked on `detokenize(tokens)` at chunk boundaries and
      cut off (the returned tokens decode to the text before the stop string). Tokens that could
      be the start of a stop string are held back until the next chunk decides.
    overflow: "error" (default) rejects prompt + max_new_tokens > cfg.max_seq_len. "slide" keeps
      going past the context like nanoGPT's crop: when the longest row's context is full, every
      unfinished row is re-prefilled with its last max_seq_len // 2 tokens and decoding goes on
      (positions restart at 0; the model sees only that window). Each slide costs one prefill.
    lora, draft, num_speculative_tokens, prompt_lookup_ngram, stats: as in `generate`.
    """
    prompts, stops, lora = _validate(params, cfg, prompts, max_new_tokens, temperature, top_k, top_p, min_p,
                                     repetition_penalty, stop_tokens, overflow, chunk_size, stop_strings,
                                     detokenize, kv_cache_dtype, lora)
    spec_draft = _check_draft(draft, cfg, prompts, int(max_new_tokens), num_speculative_tokens,
                              prompt_lookup_ngram, repetition_penalty, overflow, kv_cache_dtype, lora)
    yield from _stream(params, cfg, prompts, int(max_new_tokens), temperature, top_k, top_p, min_p,
                       repetition_penalty, stops, seed, int(chunk_size), stop_strings, detokenize,
                       kv_cache_dtype=kv_cache_dtype, lora=lora, draft=spec_draft, stats=stats)


def _stream(params: Params, cfg: ModelConfig, prompts: list[list[int]], max_new: int, temperature: float,
            top_k: int | None, top_p: float | None, min_p: float | None,
            repetition_penalty: float | None, stops: list[int], seed: int, chunk_size: int,
            stop_strings: Sequence[str] | None, detokenize: Callable[[list[int]], str] | None,
            logits_log: list | None = None, kv_cache_dtype: str | None = None,
            lora: Any = None, draft: tuple[Params | None, DraftSpec] | None = None,
            stats: dict | None = None) -> Iterator[list[list[int]]]:
    """The validated core of generate_stream: rounds (one per slide) of prefill + decode chunks.

    logits_log: when a list, each round appends (rows, float32 logits (B_round, t, V)).
    draft: (draft params or None, DraftSpec) for speculative decoding (one round: overflow='error').
    stats: when a dict, speculative decoding's counters are added to it (see `generate`).
    """
    spec, knobs = make_spec(temperature, top_k, top_p, min_p, repetition_penalty)
    knobs = {k: jnp.asarray(v) for k, v in knobs.items()}  # on device once, not per call
    stop_arr = jnp.asarray(_stop_ids(stops))
    watch = _TextWatch(list(stop_strings), detokenize) if stop_strings else None
    B, T = len(prompts), cfg.max_seq_len
    generated: list[list[int]] = [[] for _ in range(B)]  # the new tokens so far, per row
    emitted = [0] * B  # how many of them were yielded
    finished = [max_new == 0] * B
    round_idx = 0
    while not all(finished):
        rows = [b for b in range(B) if not finished[b]]
        remaining = max_new - len(generated[rows[0]])  # all unfinished rows advance together
        ctx = [prompts[b] + generated[b] for b in rows]
        if round_idx > 0 or max(len(c) for c in ctx) >= T:  # the longest row filled the context:
            ctx = [c[-(T // 2):] for c in ctx]  # slide, every row to its last T // 2 tokens
        budget = min(remaining, T - max(len(c) for c in ctx))
        round_lora = lora.rows(rows) if hasattr(lora, "rows") else lora  # a StackedLora: these rows' ids
        if draft is not None:
            rnd = start_speculative(params, cfg, draft[0], draft[1], ctx, budget, spec, knobs, stop_arr, seed,
                                    debug=logits_log is not None)
        else:
            rnd = _start(params, cfg, ctx, budget, spec, knobs, stop_arr, seed, round_idx,
                         debug=logits_log is not None, kv_cache_dtype=kv_cache_dtype, lora=round_lora)
        base = [len(generated[b]) for b in rows]
        target = 0
        while True:
            target = min(budget, target + chunk_size)
            rnd.advance(target)
            toks, t = rnd.fetch()
            last = t >= budget
            chunk: list[list[int]] = [[] for _ in range(B)]
            newly_done = np.zeros((len(rows),), bool)
            for j, b in enumerate(rows):
                if finished[b]:
                    continue
                row = _cut_at_stop_token(toks[j], stops)
                hit_token = bool(stops) and len(row) > 0 and row[-1] in stops
                generated[b] = generated[b][: base[j]] + row
                n, hit_text = len(generated[b]), False
                if watch is not None:
                    final = hit_token or (last and remaining == budget)
                    n, hit_text = watch.safe_len(generated[b], final)
                    if hit_text:
                        generated[b] = generated[b][:n]
                chunk[b] = generated[b][emitted[b]:n]
                emitted[b] = n
                if hit_token or hit_text:
                    finished[b] = newly_done[j] = True
            if any(chunk):
                yield chunk
            if last or all(finished[b] for b in rows):
                break
            if newly_done.any():
                rnd.mark_done(newly_done)
        if logits_log is not None:
            logits_log.append((rows, np.asarray(rnd.state["logits"])[:, :t]))
        if stats is not None and draft is not None:
            for name, v in rnd.stats().items():
                stats[name] = stats.get(name, 0) + v
            stats["acceptance_rate"] = stats["accepted"] / max(1, stats["proposed"])
        for b in rows:
            if len(generated[b]) >= max_new:
                finished[b] = True
        round_idx += 1
    tail = [generated[b][emitted[b]:] for b in range(B)]  # whatever a stop-string watch held back
    if any(tail):
        yield tail


def generate(
    params: Params,
    cfg: ModelConfig,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    repetition_penalty: float | None = None,
    stop_tokens: Sequence[int] | None = None,
    seed: int = 0,
    *,
    stop_strings: Sequence[str] | None = None,
    detokenize: Callable[[list[int]], str] | None = None,
    overflow: str = "error",
    return_logits: bool = False,
    kv_cache_dtype: str | None = None,
    lora: Any = None,
    draft: Any = None,
    num_speculative_tokens: int = 4,
    prompt_lookup_ngram: int = 3,
    stats: dict | None = None,
) -> list[list[int]] | tuple[list[list[int]], list[np.ndarray]]:
    """New tokens for each prompt: a ragged batch in, a ragged list of new token ids out.

    Args:
      prompts: B lists of int token ids in [0, V), of any lengths >= 1 (each gets its own
        positions, its own stop state).
      max_new_tokens: the budget per prompt, in tokens. prompt + budget must fit in
        cfg.max_seq_len unless overflow="slide" (see `generate_stream`).
      temperature: 0 is greedy (argmax; top_k/top_p/min_p are then ignored, repetition_penalty
        still applies, as in HF). > 0 divides the logits before sampling.
      top_k: sample among the k most likely tokens. top_p: among the smallest set whose
        probability mass is >= top_p (nucleus). min_p: drop tokens less likely than min_p x the
        most likely one. repetition_penalty: HF's, over prompt + generated tokens (> 1 discourages
        repeats). Applied in HF's order: penalty, temperature, top-k, top-p, min-p.
      stop_tokens: ids that end a row; the stop token is included in that row's output.
      seed: the sampling seed; same seed, same arguments -> same tokens (token t draws from
        fold_in(fold_in(key(seed), slide round), t), so streaming and chunking do not change the
        result).
      stop_strings, detokenize: cut each row before the first stop string in its decoded text.
      return_logits: also return, per prompt, the float32 (n, V) model logits (before any
        sampler) that produced each new token: a debugging and testing aid (costs memory).
      kv_cache_dtype: None keeps the KV cache in the compute dtype; "int8" stores it as int8
        with one scale per token and kv head (~4x less cache memory; infer/engine.py).
      lora: a LoRA adapter (nanojax.lora) for every row, or a list with one adapter or None per
        prompt: the rows' adapters are stacked (ranks zero-padded to the largest) and each row's
        low-rank update gathered inside the one compiled prefill and decode.
      draft: speculative decoding (infer/speculative.py). (draft_params, draft_cfg): a smaller
        model with the target's vocabulary proposes `num_speculative_tokens` (k) tokens per
        iteration and the target verifies them in one forward; "prompt_lookup": the proposal is
        what followed the most recent earlier occurrence of the row's last n-gram
        (n <= prompt_lookup_ngram) in its prompt and output. Greedy output equals plain greedy
        decoding; sampled output follows the same distribution (rejection sampling), though not
        the same tokens for a seed. Needs overflow="error"; no lora, kv_cache_dtype or
        repetition_penalty.
      stats: a dict that speculative decoding adds its counters to: "proposed" and "accepted"
        draft tokens (over live rows), "calls" (target verify forwards, prefill excluded) and
        "acceptance_rate" = accepted / proposed.

    Returns:
      list of B lists of new token ids (and the logits list when return_logits).
    """
    prompts, stops, lora = _validate(params, cfg, prompts, max_new_tokens, temperature, top_k, top_p, min_p,
                                     repetition_penalty, stop_tokens, overflow, 1, stop_strings, detokenize,
                                     kv_cache_dtype, lora)
    spec_draft = _check_draft(draft, cfg, prompts, int(max_new_tokens), num_speculative_tokens,
                              prompt_lookup_ngram, repetition_penalty, overflow, kv_cache_dtype, lora)
    out: list[list[int]] = [[] for _ in prompts]
    logits_log: list | None = [] if return_logits else None
    # Without stop strings one chunk covers the whole budget: the host syncs once, at the end.
    chunk = 16 if stop_strings else max(1, int(max_new_tokens))
    for part in _stream(params, cfg, prompts, int(max_new_tokens), temperature, top_k, top_p, min_p,
                        repetition_penalty, stops, seed, chunk, stop_strings, detokenize, logits_log,
                        kv_cache_dtype=kv_cache_dtype, lora=lora, draft=spec_draft, stats=stats):
        for b, toks in enumerate(part):
            out[b].extend(toks)
    if logits_log is None:
        return out
    pieces: list[list[np.ndarray]] = [[] for _ in prompts]
    for rows, lg in logits_log:
        for j, b in enumerate(rows):
            pieces[b].append(lg[j])
    logits = [np.concatenate(p)[: len(o)] if p else np.zeros((0, cfg.vocab_size), np.float32)
              for p, o in zip(pieces, out, strict=True)]
    return out, logits
