"""The node process's C heap: large buffers handed back to the system when freed.

glibc serves allocations from 128 KB up with mappings of their own, unmapped when freed,
but raises that threshold to the size of each such buffer freed (up to 32 MB): once a
model has run a few batches, its activation buffers come from the heap instead and stay
resident after the run. A node keeps the threshold where glibc starts it, 128 KB. Measured
on the demo node with its memory on the 8-bit embedding model (``bench/footprint.py``):
8 MB less at peak; single texts embed as fast, batches of 8 to 32 texts 15 to 25% slower
(their buffers are mapped afresh each run). A limit on the number of arenas
(``M_ARENA_MAX``) gave nothing more there and is not set. Where the C library is not
glibc nothing is changed.
"""

from __future__ import annotations

import ctypes
import os

#: glibc's ``mallopt`` parameters (malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
#: Buffers from this size up get their own mapping, unmapped when freed.
MMAP_THRESHOLD = 128 * 1024


def glibc() -> ctypes.CDLL | None:
    """The process's C library when it is glibc, else None."""
    confstr = getattr(os, "confstr", None)  # not on Windows
    try:
        version = confstr("CS_GNU_LIBC_VERSION") if confstr else None
    except (ValueError, OSError):  # an unknown name here, or not glibc
        version = None
    return ctypes.CDLL(None) if version else None


def tune(mmap_threshold: int = MMAP_THRESHOLD) -> bool:
    """Fix the mapping threshold (and the heap's trim threshold with it) at
    ``mmap_threshold`` bytes, once, early; False where there is no glibc to tune."""
    libc = glibc()
    if libc is None:
        return False
    # Fixing either turns off glibc's raising of both; the trim threshold follows so free
    # memory at the top of the heap is not kept beyond what one large buffer would be.
    return bool(libc.mallopt(M_MMAP_THRESHOLD, mmap_threshold)) and bool(
        libc.mallopt(M_TRIM_THRESHOLD, mmap_threshold)
    )
