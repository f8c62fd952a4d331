"""Stop tokens and stop strings on the host side of nanojax.infer.

Stop semantics: a stop token id *is* included in the returned tokens (as in HF `generate`), and
nothing after it is; a stop string is *not* included: the output is cut just before it (on token
boundaries; a token that straddles the stop string's start is dropped).

`token_event` is the serving engine's side of the same rules (infer/scheduler.py): a request's new
tokens, its stops, the text it can be sent so far and its logprobs, as one Event.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from nanojax.infer.requests import Event, Request, TokenLogprob


def _stop_ids(stops: list[int]) -> np.ndarray:
    n = 8 * max(1, -(-len(stops) // 8))  # a multiple of 8 slots, so the count rarely recompiles
    arr = np.full((n,), -1, np.int32)
    arr[: len(stops)] = stops
    return arr


def _cut_at_stop_token(row: np.ndarray, stops: list[int]) -> list[int]:
    out = row.tolist()
    if stops:
        hits = np.flatnonzero(np.isin(row, stops))
        if hits.size:
            out = out[: hits[0] + 1]
    return out


class _TextWatch:
    """Stop strings on decoded text, checked at chunk boundaries on the host.

    Holds back tokens whose text could still be the start of a stop string, so what was already
    yielded never has to be taken back.
    """

    def __init__(self, stop_strings: list[str], detokenize: Callable[[list[int]], str]):
        self.stops = stop_strings
        self.decode = detokenize
        self.hold = max(len(s) for s in stop_strings) - 1

    def safe_len(self, toks: list[int], final: bool) -> tuple[int, bool]:
        """(number of tokens that may be emitted, whether a stop string was hit)."""
        text = self.decode(toks)
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            limit, stopped = min(hits), True
        elif final:
            return len(toks), False
        else:
            limit, stopped = len(text) - self.hold, False
        n = len(toks)
        while n > 0 and len(self.decode(toks[:n])) > limit:
            n -= 1
        return n, stopped


def releasable(text: str, sent: int, stop_strings: Sequence[str], final: bool) -> int:
    """How much of a stream's decoded text may go out now (an index into text; text[:sent] has
    gone already). All of it at the end; before that, hold back a tail of U+FFFD (the decoder's
    stand-in for an incomplete UTF-8 sequence, which the next token may complete) and the longest
    tail that could be the start of a stop string (so sent text never has to be taken back)."""
    end = len(text)
    if final:
        return end
    while end > sent and text[end - 1] == "\ufffd":
        end -= 1
    hold = 0
    for s in stop_strings:
        for k in range(min(len(s) - 1, end - sent), hold, -1):
            if text.endswith(s[:k], 0, end):
                hold = k
                break
    return end - hold


def token_event(req: Request, toks: list[int], out: dict[str, np.ndarray], row: int, tokenizer: Any) -> Event:
    """The serving engine's host side of new tokens: appends toks to req.generated up to the first
    stop (a stop token id, a stop string, the max_tokens budget) and returns the Event to send, its
    finish_reason set when the request is done. out: the device call's output (for logprobs: a
    prefill's "logprob" (R,), "top_ids"/"top_logprobs" (R, N_TOP), or a decode chunk's with a
    step axis after R); row: the request's row there. tokenizer None: events carry no text."""
    p = req.params
    ids, reason, cut = [], None, None
    for tok in toks:
        ids.append(tok)
        req.generated.append(tok)
        if tok in p.stop_token_ids:
            reason = "stop"
            break
        if p.stop:
            text = tokenizer.decode(req.generated)
            hits = [i for i in (text.find(s, max(0, req.text_sent - len(s))) for s in p.stop) if i >= 0]
            if hits:
                reason, cut = "stop", text[: min(hits)]
                break
        if len(req.generated) >= p.max_tokens:
            reason = "length"
            break
    text = _new_text(req, reason, cut, tokenizer)
    logprobs = None
    if p.logprobs is not None:
        lp, top_ids, top_lp = out["logprob"], out["top_ids"], out["top_logprobs"]
        if lp.ndim == 1:  # prefill: one token, no step axis
            lp, top_ids, top_lp = lp[:, None], top_ids[:, None], top_lp[:, None]
        logprobs = tuple(TokenLogprob(tok, float(lp[row, j]), tuple(
            (int(top_ids[row, j, m]), float(top_lp[row, j, m])) for m in range(p.logprobs)))
            for j, tok in enumerate(ids))
    done = reason is not None
    return Event(token_ids=tuple(ids), text=text, logprobs=logprobs, finish_reason=reason,
                 prompt_tokens=req.prompt_tokens if done else 0,
                 completion_tokens=len(req.generated) if done else 0,
                 prefix_hit=req.prefix_hit if req.first else 0)


def _new_text(req: Request, reason: str | None, cut: str | None, tokenizer: Any) -> str:
    """The text that can be sent now: all of it at the end; before that, held back while it
    ends in a partial UTF-8 character or could be the start of a stop string."""
    if tokenizer is None:
        return ""
    if cut is not None:
        full = cut
    else:
        ids = req.generated
        if reason == "stop" and ids and ids[-1] in req.params.stop_token_ids:
            ids = ids[:-1]  # a stop token is reported in token_ids, not in the text
        full = tokenizer.decode(ids)
    end = releasable(full, req.text_sent, req.params.stop, final=reason is not None)
    piece = full[req.text_sent:end]
    req.text_sent = max(req.text_sent, end)
    return piece
