"""Where a rank's blocks are read: in the training process, or in a bounded pool of workers.

`InProcessBlocks`: one reader per source, read in the training process (data.num_workers 0).

`WorkerPool`: `num_workers` processes per rank, however many sources there are. Worker w is
reader w of this rank for every source; it reads ahead up to `prefetch` blocks per source,
taking the sources in turn, and writes each block into its own shared-memory slot (an
anonymous shared mmap made before the fork), so a block reaches the trainer as one memcpy out
of shared memory instead of a pickle through a pipe. A pipe per worker carries only the
block's header one way and the freed slot ("credit") back. Memory is bounded by
workers x sources x prefetch x block bytes; the pages of slots never used are never touched.

Errors in a worker (a corrupt shard, say) travel to the trainer with the block they replace and
are raised there, naming the shard and key as in-process reading would.
"""

from __future__ import annotations

import atexit
import mmap
import multiprocessing as mp
import pickle
import signal
import sys
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from manytask.data_pipeline.stream import Block, Position, ShardStream

ALIGN = 64


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


class InProcessBlocks:
    """Blocks of reader 0 of every source, read in this process."""

    shared = False

    def __init__(self, streams: list[ShardStream], starts: list[list[tuple[Position, int]]]):
        self._gens: list[Iterator[Block]] = [s.blocks(0, *st[0]) for s, st in zip(streams, starts)]

    def next_block(self, source: int, worker: int) -> Block:
        return next(self._gens[source])

    def release(self, source: int, block: Block) -> None:
        pass

    def close(self) -> None:
        for g in self._gens:
            g.close()
        self._gens = []


class _Slots:
    """Where each (source, slot) block lives in a worker's shared buffer."""

    def __init__(self, streams: list[ShardStream], prefetch: int):
        self.fields = [list(s.fields.items()) for s in streams]
        self.offsets: list[list[int]] = []
        at = 0
        for s in streams:
            row = sum(_align(np.dtype(i.dtype).itemsize * int(np.prod(i.shape, dtype=np.int64))) for i in s.fields.values())
            size = _align(row * s.block_size + ALIGN * len(s.fields))
            self.offsets.append([at + k * size for k in range(prefetch)])
            at += prefetch * size
        self.total = max(at, ALIGN)

    def writer(self, buf: mmap.mmap, source: int, slot: int) -> Callable[[str, tuple, np.dtype], np.ndarray]:
        """An `out_buffer` for ShardStream: each field's array laid out in the slot in turn."""
        at = [self.offsets[source][slot]]

        def out(name: str, shape: tuple, dtype: np.dtype) -> np.ndarray:
            arr = np.ndarray(shape, dtype, buffer=buf, offset=at[0])
            at[0] += _align(arr.nbytes)
            return arr

        return out

    def meta(self, buf: mmap.mmap, data: dict[str, np.ndarray]) -> list[tuple]:
        """Where the block's arrays (views of `buf`) lie, for `read` in the trainer."""
        base = np.frombuffer(buf, np.uint8).ctypes.data
        out = []
        for name, arr in data.items():
            at = arr.ctypes.data - base if arr.size else 0  # an empty block has nothing to point at
            if not 0 <= at < len(buf):
                raise RuntimeError(f"field '{name}' of a block is not in the worker's shared slot")
            out.append((name, arr.dtype.str, arr.shape, at))
        return out

    @staticmethod
    def read(buf: mmap.mmap, meta: list[tuple]) -> dict[str, np.ndarray]:
        return {name: np.ndarray(shape, np.dtype(dt), buffer=buf, offset=at) for name, dt, shape, at in meta}


def _worker_setup() -> None:
    """Leave SIGTERM/SIGUSR1 to the trainer (SLURM signals every process of the job, and a
    worker dying on it would crash the step the trainer wants to finish), and die with the
    trainer: an orphaned worker would keep the dead rank's sockets open and stall its peers."""
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        # A worker's big allocations are window payloads read once: give them back on free
        # (the trainer's keep_freed_memory, inherited through fork, would keep every one).
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        libc.mallopt(M_MMAP_THRESHOLD, 128 << 10)
        libc.mallopt(M_TRIM_THRESHOLD, 1 << 20)


def _portable(err: BaseException) -> BaseException:
    try:
        pickle.dumps(err)
        return err
    except Exception:  # noqa: BLE001 - any unpicklable error is sent as its text
        return RuntimeError(f"{type(err).__name__}: {err}")


def _worker_main(worker: int, streams: list[ShardStream], starts: list[list[tuple[Position, int]]],
                 conn: Any, buf: mmap.mmap, slots: _Slots, prefetch: int) -> None:
    _worker_setup()
    n = len(streams)
    gens = [s.blocks(worker, *st[worker]) for s, st in zip(streams, starts)]
    free = [deque(range(prefetch)) for _ in range(n)]
    failed = [False] * n
    turn = 0
    while True:
        # Take the credits sent back; wait for one when every source is full (or failed).
        while conn.poll() or not any(free[i] and not failed[i] for i in range(n)):
            msg = conn.recv()
            if msg is None:
                return
            free[msg[0]].append(msg[1])
        i = next(k % n for k in range(turn, turn + n) if free[k % n] and not failed[k % n])
        turn = i + 1
        slot = free[i].popleft()
        streams[i].out_buffer = slots.writer(buf, i, slot)  # the block is gathered into the slot
        try:
            block = next(gens[i])
        except BaseException as err:  # noqa: BLE001 - raised in the trainer instead
            failed[i] = True
            conn.send((i, slot, None, _portable(err)))
            continue
        meta = slots.meta(buf, block.data)
        block.data = {}
        conn.send((i, slot, block, meta))


# Pools still open at interpreter exit are closed first: multiprocessing's exit hook joins
# every child, and a worker that ignores SIGTERM would otherwise hang a crashed trainer there.
# (atexit runs hooks last-registered first; multiprocessing registered its hook on import.)
_OPEN: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _close_open_pools() -> None:
    for pool in list(_OPEN):
        pool.close()


class WorkerPool:
    """`num_workers` reader processes shared by every source of one rank (see module doc).

    streams: one per source (each with num_workers readers per rank); starts[source][worker]:
    (position, drop) of that reader; prefetch: blocks read ahead per source and worker.
    """

    shared = True

    def __init__(self, streams: list[ShardStream], starts: list[list[tuple[Position, int]]],
                 num_workers: int, prefetch: int = 2):
        ctx = mp.get_context("fork")  # the shared buffers are inherited, not re-created
        self.slots = _Slots(streams, prefetch)
        self._bufs: list[mmap.mmap] = []
        self._conns: list[Any] = []
        self._procs: list[Any] = []
        self._ready: list[list[deque]] = [[deque() for _ in streams] for _ in range(num_workers)]
        for w in range(num_workers):
            buf = mmap.mmap(-1, self.slots.total)  # MAP_SHARED | MAP_ANONYMOUS
            here, there = ctx.Pipe()
            proc = ctx.Process(
                target=_worker_main, args=(w, streams, starts, there, buf, self.slots, prefetch),
                name=f"manytask-reader-{w}", daemon=True,
            )
            proc.start()
            there.close()
            self._bufs.append(buf)
            self._conns.append(here)
            self._procs.append(proc)
        _OPEN.add(self)

    def next_block(self, source: int, worker: int) -> Block:
        """Worker `worker`'s next block of `source`; its data are views of shared memory, valid
        until `release`."""
        ready = self._ready[worker][source]
        while not ready:
            try:
                i, slot, block, meta = self._conns[worker].recv()
            except EOFError:
                code = self._procs[worker].exitcode
                raise RuntimeError(f"data worker {worker} died (exit code {code})") from None
            self._ready[worker][i].append((slot, block, meta))
        slot, block, meta = ready.popleft()
        if block is None:
            raise meta
        block.data = self.slots.read(self._bufs[worker], meta)
        block.slot = slot  # type: ignore[attr-defined]
        return block

    def release(self, source: int, block: Block) -> None:
        """Give the block's slot back to its worker (its data must no longer be used)."""
        block.data = {}
        try:
            self._conns[block.worker].send((source, block.slot))  # type: ignore[attr-defined]
        except (BrokenPipeError, OSError):
            pass  # the worker is gone; next_block reports it

    def close(self) -> None:
        """Stop the workers (they ignore SIGTERM, so a stuck one is killed)."""
        for conn in self._conns:
            try:
                conn.send(None)
            except (BrokenPipeError, OSError):
                pass
        for proc in self._procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)
        for conn in self._conns:
            conn.close()
        self._conns, self._procs, self._bufs = [], [], []
        _OPEN.discard(self)
