"""Keep freed memory inside the training process (CPU, glibc).

A training step allocates the same large tensors every step (activations, their gradients).
glibc hands blocks above its mmap threshold back to the OS on free, and trims the heap top
above its trim threshold, so each step page-faults the same memory back in: about 2,600
minor faults per step of the benchmark MMoE (batch 1024), a sixth of its step time. Raising
both thresholds keeps freed memory for the next step, as CUDA's caching allocator does on a
GPU. The cost is that RSS stays at the step's peak instead of dipping between steps (the first
few steps grow the heap until freed blocks coalesce into ones the next step fits in; then it
stays flat: tests/test_memory.py).

Not for engines that shard the model (DeepSpeed): they allocate and free buffers of many sizes
every step (gathered parameters, reduction buckets, flat gradient partitions), which a heap that
keeps everything fragments: ZeRO-3's peak per rank on the 138M-parameter benchmark model was
4,046 MiB with the thresholds raised, 2,317 MiB without. For them the mmap threshold is instead
fixed at 1 MiB, so every larger block goes back to the OS when freed: glibc's own threshold
rises with each freed block up to 32 MiB, and the heap then fragments the same way on models
whose gathered parameters are below that (a 50M-parameter ZeRO-3 run peaked 0.3 GiB higher).

No-op off Linux/glibc, and when MANYTASK_KEEP_FREED_MEMORY=0.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
_done = False
SHARDING_ENGINES = ("deepspeed", "fsdp")  # engine names whose blocks go back to the OS (see above)
RETURN_ABOVE = 1 << 20  # their fixed mmap threshold


def keep_freed_memory(engine: str = "single") -> bool:
    """Set glibc's thresholds for this process (once) for `engine` (the recipe's `engine.name`):
    keep freed memory, or for an engine that shards the model return every block of 1 MiB and
    more when freed. True if freed memory is kept."""
    global _done
    if _done or not sys.platform.startswith("linux") or os.environ.get("MANYTASK_KEEP_FREED_MEMORY", "1") == "0":
        return _done
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl or another libc without mallopt
        return False
    if engine in SHARDING_ENGINES:
        mallopt(M_MMAP_THRESHOLD, RETURN_ABOVE)  # fixed: glibc no longer raises it as blocks are freed
        return False
    # Blocks up to 1 GiB come from the heap (glibc versions that cap the threshold lower refuse
    # it: then their maximum, 32 MiB, still covers most per-step tensors).
    if not mallopt(M_MMAP_THRESHOLD, 1 << 30):
        mallopt(M_MMAP_THRESHOLD, 32 << 20)
    mallopt(M_TRIM_THRESHOLD, 1 << 30)
    _done = True
    return True


# What the allocators say when a process's memory runs out: torch's CPU allocator (a cap such as
# `ulimit -v` / `prlimit --data`, or the machine's memory), the CUDA caching allocator, Python.
OUT_OF_MEMORY_MARKERS = ("can't allocate memory", "Cannot allocate memory", "out of memory")


def out_of_memory_message(err: BaseException) -> str | None:
    """A user-facing explanation when `err` is an out-of-memory error, else None.

    Says which process ran out, and the fix: an engine that shards the model states across ranks
    (DDP holds the whole model, its gradients and AdamW's two moments on every rank, 16 bytes per
    fp32 parameter; ZeRO-3 or FSDP hold about 1/N of that on each of N ranks).
    """
    text = str(err)
    if not (isinstance(err, MemoryError) or (isinstance(err, RuntimeError) and any(m in text for m in OUT_OF_MEMORY_MARKERS))):
        return None
    rank = f"rank {os.environ['RANK']}" if "RANK" in os.environ else "this process"
    first_line = text.strip().splitlines()[0] if text.strip() else type(err).__name__
    return (
        f"out of memory on {rank} ({first_line}). Every rank of engine ddp/single holds the whole "
        f"model, its gradients and the optimizer's moments (16 bytes per fp32 parameter with AdamW): "
        f"shard them across ranks with engine deepspeed and zero_optimization stage 3 "
        f"(configs/demo_zero3.yaml; stage 2 shards gradients and optimizer state only), or lower "
        f"data.batch_size for activations"
    )
