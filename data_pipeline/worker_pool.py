"""Where a rank's blocks are read: in the training process, or in a bounded pool of workers.

`InProcessBlocks`: one reader per source, read in the training process (data.num_workers 0).

`WorkerPool`: `num_workers` processes per rank, however many sources there are. The rank has
num_workers readers per source (see stream.py); process `process_of(source, reader)` reads
that reader's blocks of that source, up to `prefetch` ahead, taking its (source, reader) pairs
in turn, and writes each block into its own slot of one shared buffer (an anonymous shared
mmap made before the fork, a region per reader), so a block reaches the
trainer as one copy out of shared memory instead of a pickle through a pipe. A pipe per
worker carries only the blocks' headers one way and the freed slots ("credits") back, both
in batches: with many sources a step frees and a worker fills many slots at once, and one
message each way instead of one per block spares the system calls and, on a loaded machine,
the wake-ups that each wait for a core. Memory is bounded by workers x sources x prefetch x
block bytes; the pages of slots never used are never touched.

Each field's array in a slot starts at a multiple of its row size (`_Slots.unit`), so the
trainer can view the whole buffer as rows of that field (`WorkerPool.rows`) and gather a
step's rows of every source with one `np.take` per field (`batch.BatchBuilder.gather`).

Errors in a worker (a corrupt shard, say) travel to the trainer with the block they replace and
are raised there, naming the shard and key as in-process reading would.
"""

from __future__ import annotations

import atexit
import functools
import math
import mmap
import multiprocessing as mp
import pickle
import select
import signal
import sys
import weakref
from collections import deque
from collections.abc import Iterator
from typing import Any

import numpy as np

from manytask.data_pipeline.remote import OpenFiles
from manytask.data_pipeline.stream import Block, Position, ShardStream

ALIGN = 64
# A worker sends its blocks' headers once it has this many blocks or rows (or nothing more to read).
BATCH_BLOCKS = 16
BATCH_ROWS = 4096
# Bytes of freed memory a worker keeps for reuse (see _worker_setup).
WORKER_HEAP_KEEP = 16 << 20
# Freed slots go back to a worker in batches of a quarter of its slots, unless a source has
# fewer than this many steps of rows ready: then at once (see WorkerPool.release).
CREDIT_STEPS = 8


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

    def flush(self) -> None:
        pass

    def close(self) -> None:
        for g in self._gens:
            g.close()
        self._gens = []


@functools.cache
def _unit(row_bytes: int) -> int:
    """Where an array of rows of `row_bytes` may start: a multiple of the row size (so the
    buffer viewed as such rows holds it at a whole row) and of ALIGN (for SIMD), unless that
    common multiple is unreasonably large (the trainer then copies such a field piece by piece)."""
    unit = math.lcm(ALIGN, max(1, row_bytes))
    return unit if unit <= 64 * ALIGN else ALIGN


def _round_up(n: int, unit: int) -> int:
    return -(-n // unit) * unit


class _SlotWriter:
    """ShardStream's `out_buffer` for one slot: hands out each field's array in turn, at a
    multiple of its row size (see _Slots), and remembers where it put them."""

    def __init__(self, buf: mmap.mmap, at: int):
        self.buf, self.at = buf, at
        self.placed: dict[str, tuple[np.ndarray, int]] = {}

    def __call__(self, name: str, shape: tuple, dtype: np.dtype) -> np.ndarray:
        start = _round_up(self.at, _unit(np.dtype(dtype).itemsize * math.prod(shape[1:])))
        arr = np.ndarray(shape, dtype, buffer=self.buf, offset=start)
        self.at = start + _round_up(arr.nbytes, ALIGN)
        self.placed[name] = (arr, start)
        return arr

    def meta(self, data: dict[str, np.ndarray]) -> list[tuple]:
        """Where the block's arrays lie in the buffer, for `_Slots.read` in the trainer."""
        out = []
        for name, arr in data.items():
            got = self.placed.get(name)
            if got is not None and got[0] is arr:
                at = got[1]
            elif arr.size == 0:
                at = 0  # an empty block has nothing to point at
            else:
                raise RuntimeError(f"field '{name}' of a block is not in the worker's shared slot")
            out.append((name, arr.dtype.str, arr.shape, at))
        return out


class _Slots:
    """Where each (source, slot) block lives in a reader's region of the shared buffer.

    A region is `total` bytes; reader w's region starts at w * total. Every field array of a
    slot starts at a multiple of `_unit(its row bytes)`, and `total` is a multiple of every
    unit, so that holds in every reader's region too.
    """

    def __init__(self, streams: list[ShardStream], prefetch: int):
        self.offsets: list[list[int]] = []
        units = [ALIGN]
        at = 0
        for s in streams:
            size = 0
            for info in s.fields.values():
                row = np.dtype(info.dtype).itemsize * int(np.prod(info.shape, dtype=np.int64))
                unit = _unit(row)
                units.append(unit)
                size += _round_up(row * s.block_size, ALIGN) + unit  # the array and its start's padding
            size = _round_up(size, ALIGN)
            self.offsets.append([at + k * size for k in range(prefetch)])
            at += prefetch * size
        self.total = _round_up(max(at, ALIGN), math.lcm(*units))

    def writer(self, buf: mmap.mmap, base: int, source: int, slot: int) -> _SlotWriter:
        """An `out_buffer` for ShardStream: each field's array laid out in the slot in turn
        (`base`: the reader's region)."""
        return _SlotWriter(buf, base + self.offsets[source][slot])

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
        # A worker's allocations are window payloads, freed and allocated again window after
        # window: keep them on the heap for reuse (a fresh mmap per window, glibc's default
        # above 128 KiB, costs a page fault per 4 KiB and made reading 2-3x slower), but not
        # the trainer's keep_freed_memory (up to 1 GiB, inherited through fork): beyond 16 MiB
        # allocations are mapped and given back, and so is free heap beyond 16 MiB.
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        libc.mallopt(M_MMAP_THRESHOLD, WORKER_HEAP_KEEP)
        libc.mallopt(M_TRIM_THRESHOLD, WORKER_HEAP_KEEP)


def _portable(err: BaseException) -> BaseException:
    try:
        pickle.dumps(err)
        return err
    except Exception:  # noqa: BLE001 - any unpicklable error is sent as its text
        return RuntimeError(f"{type(err).__name__}: {err}")


def process_of(source: int, reader: int, processes: int) -> int:
    """The worker process that reads `reader`'s blocks of `source`. Spread by source as well as
    by reader: when the trainer uses the sources evenly, all of them move from one reader's
    block to the next reader's in the same step; were reader w always process w, one process
    would then refill every source's slots while the other sat idle."""
    return (source + reader) % processes


def _worker_main(process: int, streams: list[ShardStream], starts: list[list[tuple[Position, int]]],
                 conn: Any, buf: mmap.mmap, slots: _Slots, prefetch: int) -> None:
    _worker_setup()
    files = OpenFiles()  # this process's open shards, shared by its streams
    for stream in streams:
        stream.files = files
    readers = len(starts[0]) if starts else 0
    # The (source, reader) pairs this process reads, each with its own blocks and slots.
    pairs = [(i, w) for i in range(len(streams)) for w in range(readers) if process_of(i, w, readers) == process]
    index = {pair: k for k, pair in enumerate(pairs)}
    gens = [streams[i].blocks(w, *starts[i][w]) for i, w in pairs]
    free = [deque(range(prefetch)) for _ in pairs]
    # Pairs with a free slot, in the order they are to be read; a failed pair leaves it.
    todo = deque(range(len(pairs)))
    out: list[tuple] = []  # read, not yet sent
    rows = 0  # rows in `out`
    # Whether credits are waiting, asked twice per block: one poll object kept for it
    # (Connection.poll builds a selector per call). A pipe message is read whole by recv, so
    # the descriptor is readable exactly when a message waits.
    poller = select.poll()
    poller.register(conn.fileno(), select.POLLIN)

    def incoming() -> bool:
        return bool(poller.poll(0))

    while True:
        # Take the credits sent back (each message a list of (source, reader, slot)); wait for
        # one when every slot is full, after handing over what was read.
        while incoming() or not todo:
            if out and not incoming():
                conn.send(out)
                out, rows = [], 0
            msg = conn.recv()
            if msg is None:
                files.close()
                return
            for i, w, slot in msg:
                k = index[i, w]
                if not free[k] and gens[k] is not None:
                    todo.append(k)
                free[k].append(slot)
        k = todo.popleft()
        slot = free[k].popleft()
        if free[k]:
            todo.append(k)  # round robin: its next block after the other pairs' next ones
        i, w = pairs[k]
        writer = streams[i].out_buffer = slots.writer(buf, w * slots.total, i, slot)  # the block is gathered into the slot
        try:
            block = next(gens[k])
        except BaseException as err:  # noqa: BLE001 - raised in the trainer instead
            gens[k] = None  # type: ignore[call-overload]
            if k in todo:
                todo.remove(k)
            out.append((i, w, slot, None, _portable(err)))
        else:
            # The block's header as a plain tuple (a dataclass pickles several times slower).
            out.append((i, w, slot, (block.worker, block.before, block.after, block.offset, block.size, block.slot_ends),
                        writer.meta(block.data)))
            rows += block.size
        # Hand over in batches, but do not sit on a batch's worth of rows the trainer may be
        # waiting for.
        if rows >= BATCH_ROWS or len(out) >= BATCH_BLOCKS or not todo or incoming():
            conn.send(out)
            out, rows = [], 0


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
        ctx = mp.get_context("fork")  # the shared buffer is inherited, not re-created
        self.slots = _Slots(streams, prefetch)
        self.buffer = mmap.mmap(-1, self.slots.total * num_workers)  # MAP_SHARED | MAP_ANONYMOUS
        self._conns: list[Any] = []
        self._procs: list[Any] = []
        self._ready: list[list[deque]] = [[deque() for _ in streams] for _ in range(num_workers)]
        self._credits: list[list[tuple[int, int, int]]] = [[] for _ in range(num_workers)]
        self._views: dict[tuple[str, tuple], np.ndarray] = {}
        # Credits are sent in batches: one freed slot per message woke the worker for one
        # block each step (with many sources a step frees about one), and every wake-up on a
        # loaded machine costs more than the block. A quarter of a worker's slots per batch
        # leaves it three quarters read ahead; a source about to run dry is served at once.
        slots_of = [prefetch * sum(process_of(i, w, num_workers) == p for i in range(len(streams)) for w in range(num_workers))
                    for p in range(num_workers)]
        self._credit_batch = [max(1, n // 4) for n in slots_of]
        self._urgent = [False] * num_workers
        self.demand: np.ndarray | None = None  # rows per step of each source (set by the loader)
        for w in range(num_workers):
            here, there = ctx.Pipe()
            proc = ctx.Process(
                target=_worker_main, args=(w, streams, starts, there, self.buffer, self.slots, prefetch),
                name=f"manytask-reader-{w}", daemon=True,
            )
            proc.start()
            there.close()
            self._conns.append(here)
            self._procs.append(proc)
        _OPEN.add(self)

    def next_block(self, source: int, worker: int) -> Block:
        """Reader `worker`'s next block of `source`; its data are views of shared memory, valid
        until `release`; `block.at` holds each field's byte offset in `buffer`."""
        ready = self._ready[worker][source]
        process = process_of(source, worker, len(self._procs))
        while not ready:
            self.flush(force=True)  # the credits the worker may be waiting for
            try:
                batch = self._conns[process].recv()
            except EOFError:
                code = self._procs[process].exitcode
                raise RuntimeError(f"data worker {process} died (exit code {code})") from None
            for i, w, slot, header, meta in batch:
                self._ready[w][i].append((slot, header, meta))
        slot, header, meta = ready.popleft()
        if header is None:
            raise meta
        worker, before, after, offset, size, slot_ends = header
        return Block(worker, before, after, offset, size, self.slots.read(self.buffer, meta), slot_ends,
                     slot, {name: at for name, _, _, at in meta})

    def release(self, source: int, block: Block) -> None:
        """Give the block's slot back to its worker (its data must no longer be used); the
        credit is sent by `flush`: with the worker's next batch of credits, or at once if
        `source` has fewer than CREDIT_STEPS steps of rows (`demand`) ready."""
        block.data = {}
        process = process_of(source, block.worker, len(self._procs))
        self._credits[process].append((source, block.worker, block.slot))
        if not self._urgent[process] and self._running_dry(source):
            self._urgent[process] = True

    def _running_dry(self, source: int) -> bool:
        """Whether the blocks of `source` received and not yet taken hold fewer rows than
        CREDIT_STEPS steps of its demand (unknown demand: yes)."""
        if self.demand is None:
            return True
        need = CREDIT_STEPS * int(self.demand[source])
        ready = 0
        for per_source in self._ready:
            for _slot, header, _meta in per_source[source]:
                if header is None:  # an error to raise: let the worker go on with the others
                    return True
                ready += header[4]  # its size
        return ready < need

    def flush(self, force: bool = False) -> None:
        """Send released slots back, one message per worker: a worker's full batch, an urgent
        one (see `release`), or, with `force`, all of them."""
        for p, (conn, credits) in enumerate(zip(self._conns, self._credits)):
            if credits and (force or self._urgent[p] or len(credits) >= self._credit_batch[p]):
                try:
                    conn.send(credits)
                except (BrokenPipeError, OSError):
                    pass  # the worker is gone; next_block reports it
                self._credits[p] = []
                self._urgent[p] = False

    def rows(self, dtype: np.dtype, shape: tuple) -> np.ndarray:
        """The whole shared buffer as rows [n, *shape] of `dtype`: a block's field of that kind
        starts at row `block.at[field] // row bytes` when that divides exactly (see _Slots)."""
        key = (np.dtype(dtype).str, tuple(shape))
        view = self._views.get(key)
        if view is None:
            row = np.dtype(dtype).itemsize * int(np.prod(shape, dtype=np.int64))
            view = np.ndarray((len(self.buffer) // row, *shape), dtype, buffer=self.buffer)
            self._views[key] = view
        return view

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
        self._conns, self._procs, self._views = [], [], {}
        _OPEN.discard(self)
