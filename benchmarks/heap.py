"""The CPU heap that benchmarks/speed.py times on, and the page faults its calls take.

glibc hands the top of its heap back to the kernel whenever the free space there grows past a
threshold (trimming; by default twice the largest mapping freed so far), and maps requests above
another threshold on their own, unmapped again when freed; either way that memory is mapped afresh
when next asked for, and every page faults and is zeroed on first touch. In speed.py's rounds one
layer's freed temporaries then decide whether the next layer's output lands on fresh pages.
Measured (4096 x 1024 x 1024, bfloat16 forward, two threads, in rounds): whichever layer was timed
right after the pure-PyTorch reference took about 2000 page faults and 1.5 ms more per call
(low-rank's forward 2.7 ms instead of 1.1 when it came second, NanoMoE's 2.7 instead of 1.2), the
others none. ``steady_heap`` keeps what is freed, as a caching allocator (jemalloc, tcmalloc)
would, so every layer's calls reuse memory alike, and ``minor_faults`` lets the table show what
each call still faults.
"""

import ctypes
import ctypes.util
import os
import resource

_M_TRIM_THRESHOLD = -1  # mallopt's parameter numbers (malloc.h)
_M_MMAP_THRESHOLD = -3
_NEVER_TRIM = 2**31 - 1
# Requests below the mmap threshold come from the heap, so they too are kept. glibc before 2.26ish
# refuses thresholds above 32 MiB (its cap on 64-bit then), later ones take any int.
_MMAP_THRESHOLDS = ((1 << 30, "1 GiB"), (32 << 20, "32 MiB"))


def steady_heap() -> str:
    """Turns glibc's trimming off and its mmap threshold up, for this process; returns what it
    set, or why nothing was set (another C library, or a preloaded allocator glibc's settings do
    not reach)."""
    preload = os.environ.get("LD_PRELOAD", "")
    if preload:
        return f"unchanged (LD_PRELOAD={preload})"
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return "unchanged (no mallopt)"
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    if not mallopt(_M_TRIM_THRESHOLD, _NEVER_TRIM):
        return "unchanged (mallopt refused)"
    for threshold, name in _MMAP_THRESHOLDS:
        if mallopt(_M_MMAP_THRESHOLD, threshold):
            return f"glibc: no trimming, mmap from {name}"
    return "glibc: no trimming (mmap threshold refused)"


def minor_faults() -> int:
    """Page faults this process has taken that needed no disk: a fresh page's, among them."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
