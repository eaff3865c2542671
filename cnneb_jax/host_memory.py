"""Freed host memory kept for reuse, so that XLA:CPU's large buffers stop costing page faults.

Every call of a compiled program on the CPU allocates its temporary buffer afresh (hundreds
of MB for a train step) and frees it at the end. glibc serves an allocation over 32 MB with
a fresh `mmap` and returns it with `munmap`, so each call touches every page of it anew:
about 210,000 page faults and 0.4 s of kernel time per `full` train step at batch 8.
XLA's worker threads allocate from arenas of their own, where glibc falls back to `mmap` for
such sizes whatever its settings. With one arena, no `mmap` and the top of the heap never
given back, the same memory is reused call after call (docs/experiments.md §23: the `cifar`
train step 1.27x, the `full` one 1.11x, its forward 1.06x faster).

This is a setting of the whole process, and it only works before any second thread has
allocated (glibc fixes its arena limit then; set later, XLA's threads keep arenas of their
own and the step got slower, not faster). So it acts only while the process has one thread,
and does nothing otherwise: the entry points call `keep_freed_memory()` first thing, before
NumPy or JAX start theirs; a user's script may do the same, first. The cost: the process does
not give freed memory back to the system while it runs. CNNEB_HOST_MEMORY=default leaves
glibc as it is. On a C library other than glibc it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os

# mallopt parameters (glibc's malloc.h)
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8
KEEP_TOP_BYTES = -1   # mallopt takes an int; -1 becomes SIZE_MAX: never trim


@functools.cache
def keep_freed_memory() -> bool:
    """Asks glibc to serve every allocation from one heap and keep what is freed (once per
    process). Returns True when it did; False where it cannot (not glibc, or the process
    already runs other threads) or was told not to (CNNEB_HOST_MEMORY=default)."""
    if os.environ.get("CNNEB_HOST_MEMORY", "").strip().lower() == "default":
        return False
    if _threads() != 1:
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return False
    if not hasattr(libc, "gnu_get_libc_version"):   # not glibc: its mallopt means other things
        return False
    mallopt = libc.mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return all(mallopt(param, value) == 1 for param, value in
               ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, KEEP_TOP_BYTES)))


def _threads() -> int:
    """Threads of this process (Linux); 0 where it cannot tell."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return 0
