"""Inference weights in one huge-page arena on the CPU (`pack_weights`).

A CPU decode step at batch 1 streams every weight from DRAM once per token, so it runs at the
machine's streaming rate, and on 4 KiB pages that rate is lower: the same C loop over llama-134m's
438 MB of products read 8-16% faster on 2 MiB pages (docs/performance/decode.md, "Decode on Zen 5: masked
loads and 2 MiB pages"). llama.cpp gets those pages for free: it maps the GGUF file, and the page
cache holds it in large folios. XLA's buffers come from glibc's heap (nanojax/_malloc.py), on
4 KiB pages.

`pack_weights` copies every array leaf of a params tree (float, quantized or LoRA) once into one
anonymous mapping that is 2 MiB-aligned and advised MADV_HUGEPAGE, each leaf on its own 4 KiB
boundary in tree order, and hands back jax arrays that alias it (`jax.device_put` of an aligned
numpy array is zero-copy on the CPU; the arrays keep the mapping alive). Values, dtypes, shapes
and the tree are unchanged, so every caller takes the result as it took the input.

It is a no-op (the tree comes back as is) off the CPU, for arrays split over several devices, and
where Python's mmap has no MADV_HUGEPAGE (not Linux). Where the kernel refuses the advice (no
transparent huge pages) the arena is on ordinary pages, and a leaf that jax copied instead of
aliasing would be too: the values are the same either way.
"""

from __future__ import annotations

import mmap
from typing import Any

import jax
import numpy as np

HUGE_PAGE = 2 << 20  # bytes: the x86-64 transparent huge page
_ALIGN = 4096  # bytes: each leaf starts on its own page


def _packable(leaf: Any) -> bool:
    """A jax array held whole by one CPU device (what an unsharded CPU params tree holds)."""
    if not isinstance(leaf, jax.Array) or leaf.nbytes == 0:
        return False
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.extended):  # PRNG keys: no host bytes to copy
        return False
    devices = leaf.devices()
    return len(devices) == 1 and next(iter(devices)).platform == "cpu" and leaf.is_fully_addressable


def pack_weights(params: Any) -> Any:
    """Returns params with every array leaf moved into one 2 MiB-page arena (module docstring).

    params: any pytree (a params dict, a quantized one, a LoRA adapter). Leaves that are not
    single-device CPU jax arrays are returned untouched, and a tree with none to pack comes back
    as is. Costs one copy of the packed bytes (~0.1 s per GB); call it once after loading or
    quantizing, not per generate call.
    """
    leaves, tree = jax.tree_util.tree_flatten(params)
    picks = [i for i, leaf in enumerate(leaves) if _packable(leaf)]
    if not picks or not hasattr(mmap, "MADV_HUGEPAGE"):
        return params
    offsets, size = {}, 0
    for i in picks:
        offsets[i] = size
        size += -(-leaves[i].nbytes // _ALIGN) * _ALIGN
    size = -(-size // HUGE_PAGE) * HUGE_PAGE
    # One spare huge page so the arena can start on a 2 MiB boundary wherever the mapping lands.
    region = mmap.mmap(-1, size + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    raw = np.frombuffer(region, dtype=np.uint8)
    start = -raw.ctypes.data % HUGE_PAGE
    try:  # before the first write, so the page faults allocate huge pages directly
        region.madvise(mmap.MADV_HUGEPAGE, start, size)
    except OSError:  # THP compiled out or disabled: ordinary pages, the copy still stands
        pass
    out = list(leaves)
    for i in picks:
        host = np.asarray(leaves[i])
        view = raw[start + offsets[i]:start + offsets[i] + host.nbytes].view(host.dtype).reshape(host.shape)
        view[...] = host
        view.flags.writeable = False  # the jax array aliases it: nothing may write it again
        out[i] = jax.device_put(view, next(iter(leaves[i].devices())))
    return jax.tree_util.tree_unflatten(tree, out)
