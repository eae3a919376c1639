"""Keep freed CPU memory in the process for the next step instead of returning it to the system.

Each CPU training step frees and reallocates the same gradients and activations. glibc hands
large blocks back to the kernel when they are freed (mmap'd blocks, and the heap's top once
more than the trim threshold is free), so every step faults the pages in again: measured on
the seed preset (2 cores), about 0.1 s of a 2 s step. Raising the thresholds and serving
even the largest blocks from the heap (no mmap) keeps those pages mapped: the process does
not shrink between steps, and its peak grows a little where freed blocks do not fit the next
request (bench_memory, seed-262m: 4.16 -> 4.25 GiB, and 2.91 -> 2.94 with the memory switches).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -2, -3, -4
_MMAP_THRESHOLD = 32 * 2**20  # glibc's ceiling for the mmap threshold on 64-bit
_TRIM = 2**31 - 1  # an int: never trim the heap's top during training
_TOP_PAD = 256 * 2**20


@functools.cache
def keep_freed_memory() -> bool:
    """Set the allocator's thresholds once per process; False where glibc's mallopt is not there."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # another C library (musl has no mallopt)
        return False
    settings = (
        (_M_MMAP_THRESHOLD, _MMAP_THRESHOLD),
        # Blocks over the threshold (a GPT-2 embedding gradient is 154 MB) would still be mmap'd
        # and faulted in afresh each step: no mmap at all, they come from the kept heap too.
        (_M_MMAP_MAX, 0),
        (_M_TRIM_THRESHOLD, _TRIM),
        (_M_TOP_PAD, _TOP_PAD),
    )
    return all(mallopt(option, value) == 1 for option, value in settings)
