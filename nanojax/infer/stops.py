"""Stop tokens and stop strings on the host side of nanojax.infer.

Stop semantics: a stop token id *is* included in the returned tokens (as in HF `generate`), and
nothing after it is; a stop string is *not* included: the output is cut just before it (on token
boundaries; a token that straddles the stop string's start is dropped).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np


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
