"""glibc malloc settings that stop XLA:CPU from page-faulting its scratch buffers every step.

XLA:CPU allocates its temporary buffer afresh on every execution; glibc serves large blocks with
mmap and returns them on free, so each step faults the whole buffer back in (~14k minor faults,
~30 ms of kernel time for a tiny model; DESIGN.md). Keeping freed memory in one arena, never
mmapping and never trimming, turns that into a free-list hit. Must run before JAX allocates.

Trimming is off outright, not capped: with a 1 GiB or 2 GiB threshold, GPT-2 124M at 2x256 still
faulted ~290k pages back in every step (~30% of its step time); with trimming off, none. The cost
is that the process keeps its peak heap until exit, as a caching allocator does.

One arena, so all threads take one lock: more arenas ran the quickstart step 10-25% faster, but a
thread on any arena but the first gets a block over its 64 MiB heap from mmap whatever
M_MMAP_MAX says, and GPT-2 124M faulted ~240k pages back in every step (docs/performance/
training.md, "bf16 at the quickstart shape"). Kernels should not malloc per call for that reason.
"""

from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8


def tune_malloc() -> bool:
    """Applies the settings on glibc; returns whether it did. NANOJAX_MALLOC=0 opts out."""
    if os.environ.get("NANOJAX_MALLOC", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other libcs have no mallopt
        return False
    ok = mallopt(M_MMAP_MAX, 0) == 1  # never serve a block with mmap
    ok &= mallopt(M_TRIM_THRESHOLD, -1) == 1  # -1: never give freed heap back (mallopt(3))
    ok &= mallopt(M_ARENA_MAX, 1) == 1  # one arena: XLA's worker threads reuse the same free lists
    return bool(ok)
