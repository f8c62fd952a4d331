"""The host side of prefix reuse: an LRU map from prompt prefixes, in whole BLOCK-token blocks,
to blocks of a device pool (infer/slots.py holds the pool and the compiled copies).

As in vLLM's automatic prefix caching, block i of a prompt is named by a hash of all the tokens
up to its end (a chain: sha256 of the previous block's name and this block's tokens), so equal
names mean equal prefixes, and a lookup walks a new prompt's blocks from the start until the
first miss. The least recently used blocks are evicted first; the capacity is in tokens.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np


def block_names(tokens: Sequence[int], n_blocks: int, block: int) -> list[bytes]:
    """The chained names of the first n_blocks full blocks of tokens."""
    names, prev = [], b""
    arr = np.asarray(tokens[: n_blocks * block], np.int64)
    for i in range(n_blocks):
        prev = hashlib.sha256(prev + arr[i * block:(i + 1) * block].tobytes()).digest()
        names.append(prev)
    return names


class PrefixStore:
    """Which pool block holds which prefix block. capacity_blocks: the pool's size."""

    def __init__(self, capacity_blocks: int, block: int):
        self.capacity, self.block = capacity_blocks, block
        self._blocks: OrderedDict[bytes, int] = OrderedDict()  # name -> pool block, oldest first
        self._free = list(range(capacity_blocks - 1, -1, -1))

    def __len__(self) -> int:
        return len(self._blocks)

    def lookup(self, tokens: Sequence[int], max_blocks: int) -> list[int]:
        """Pool blocks holding the longest cached prefix of tokens (at most max_blocks), marked
        as just used."""
        found = []
        for name in block_names(tokens, min(max_blocks, len(tokens) // self.block), self.block):
            if name not in self._blocks:
                break
            self._blocks.move_to_end(name)
            found.append(self._blocks[name])
        return found

    def insert(self, tokens: Sequence[int]) -> list[tuple[int, int]]:
        """Records tokens' full blocks (as many as fit). Returns (block index in the prompt, pool
        block) for each block that must be copied into the pool now; known ones are only touched."""
        n = min(len(tokens) // self.block, self.capacity)
        copies = []
        for i, name in enumerate(block_names(tokens, n, self.block)):
            if name in self._blocks:
                self._blocks.move_to_end(name)
                continue
            if self._free:
                dst = self._free.pop()
            else:  # evict the least recently used; this prompt's earlier blocks were just touched
                _, dst = self._blocks.popitem(last=False)
            self._blocks[name] = dst
            copies.append((i, dst))
        return copies
