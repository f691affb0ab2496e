"""The CPU heap that benchmarks/speed.py times on, and the page faults its calls take.

glibc hands memory back to the kernel whenever the free space at the top of its heap grows past a
threshold (trimming), and maps requests above another threshold on their own, unmapped again when
freed; either way the next allocation there is mapped afresh, and every page faults and is zeroed
on first touch. In speed.py's rounds one layer's freed temporaries then decide whether the next
layer's output lands on fresh pages. Measured (4096 x 1024 x 1024, bfloat16 forward, two threads,
in rounds): whichever layer was timed right after the pure-PyTorch reference took about 2000 page
faults and 1.5 ms more per call (low-rank's forward 2.7 ms instead of 1.1 when it came second,
NanoMoE's 2.7 instead of 1.2), the others none. ``steady_heap`` keeps what is freed, as a caching
allocator (jemalloc, tcmalloc) would, so every layer's calls reuse memory alike, and
``minor_faults`` lets the table show what each call still faults.
"""

import ctypes
import ctypes.util
import resource

_M_TRIM_THRESHOLD = -1  # mallopt's parameter numbers (malloc.h)
_M_MMAP_THRESHOLD = -3
# glibc's largest mmap threshold on 64-bit: requests of 32 MiB or more are still mapped on their
# own (every layer's alike: an output at 8192 tokens and 2048 features).
_LARGEST_MMAP_THRESHOLD = 32 << 20
_NEVER_TRIM = 2**31 - 1


def steady_heap() -> str:
    """Turns glibc's trimming off and its mmap threshold up to the largest, for this process;
    returns what it set, or why nothing was set (another C library)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return "unchanged (no mallopt)"
    if not (
        mallopt(_M_TRIM_THRESHOLD, _NEVER_TRIM)
        and mallopt(_M_MMAP_THRESHOLD, _LARGEST_MMAP_THRESHOLD)
    ):
        return "unchanged (mallopt refused)"
    return "glibc: no trimming, mmap from 32 MiB"


def minor_faults() -> int:
    """Page faults this process has taken that needed no disk: a fresh page's, among them."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
