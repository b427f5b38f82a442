"""Keep freed memory inside the training process (CPU, glibc).

A training step allocates the same large tensors every step (activations, their gradients).
glibc hands blocks above its mmap threshold back to the OS on free, and trims the heap top
above its trim threshold, so each step page-faults the same memory back in: about 2,600
minor faults per step of the benchmark MMoE (batch 1024), a sixth of its step time. Raising
both thresholds keeps freed memory for the next step, as CUDA's caching allocator does on a
GPU. The cost is that RSS stays at the step's peak instead of dipping between steps (the first
few steps grow the heap until freed blocks coalesce into ones the next step fits in; then it
stays flat: tests/test_memory.py).

No-op off Linux/glibc, and when MANYTASK_KEEP_FREED_MEMORY=0.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
_done = False


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process (once). True if applied."""
    global _done
    if _done:
        return True
    if not sys.platform.startswith("linux") or os.environ.get("MANYTASK_KEEP_FREED_MEMORY", "1") == "0":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl or another libc without mallopt
        return False
    # Blocks up to 1 GiB come from the heap (glibc versions that cap the threshold lower refuse
    # it: then their maximum, 32 MiB, still covers most per-step tensors).
    if not mallopt(M_MMAP_THRESHOLD, 1 << 30):
        mallopt(M_MMAP_THRESHOLD, 32 << 20)
    mallopt(M_TRIM_THRESHOLD, 1 << 30)
    _done = True
    return True
