"""ShardStream: an infinite, deterministic, resumable stream of sample blocks for one reader.

A *reader* is one (rank, worker) pair; a job has `n_readers = world_size x readers_per_rank`
of them per source. Every epoch of a source has one global order of its samples, independent
of the number of readers (`partition.EpochOrder`); reader i reads its part of the positions
not yet consumed (`partition.Partition.part`): a contiguous slice of the order in a fresh
epoch, so every sample is read exactly once per epoch across all readers and readers' parts
differ by at most one sample. The epoch's tail needs no special case: a reader that finishes
its part goes on with its part of the next epoch (nothing dropped, nothing padded), so near an
epoch boundary readers may briefly be in different epochs.

A reader reads only the windows its slice covers: their shards, and within a shard only their
tar keys (a seek to the key's byte offset when the manifest records `offsets`).

Blocks: a reader's part of an epoch is cut into ceil(part / block_size) blocks of equal
length (+-1, `partition.block_end`), across windows and intervals ("span" layout). A block is
one hand-over from a worker to the trainer and one turn in the trainer's round robin over a
source's readers; with many sources, whose windows are small (the shuffle budget is split
among them), ending a block with every window made that fixed cost be paid many times per
sample. States recorded before "span" used the "window" layout: blocks end at multiples of
`block_size` counted from the window start and at every window end; they resume with it
(each reader's samples are the same in both layouts; the rank's interleaving of its readers
differs). A block carries the reader's `Position` before and after it, so a consumer knows
exactly how far it has read.

A `Position` is (epoch, index, skipped): `index` counts the positions of the reader's part of
`epoch` consumed so far (corrupt samples skipped with `skip_corrupt` still advance it) and
`skipped` counts the positions skipped so far. Restarting `blocks()` at any position yields
exactly the samples an uninterrupted run would have yielded from there; a position inside a
block yields a first block only up to the next block boundary, so later boundaries never move.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from manytask.data_pipeline.integrity import nonfinite_message, nonfinite_rows, size_problem
from manytask.data_pipeline.manifest import FieldInfo, Manifest
from manytask.data_pipeline.partition import (
    WINDOW_RNGS,
    EpochOrder,
    Intervals,
    SourceLayout,
    block_end,
    complement,
    length,
    position_in,
    reader_part,
)
from manytask.data_pipeline.remote import OpenFiles, local_file
from manytask.data_pipeline.shard_reader import ShardError, read_shard
from manytask.schema import ConfigError

log = logging.getLogger(__name__)


class Position(NamedTuple):
    """Where a reader is: position `index` of its part of epoch `epoch`; `skipped` corrupt so far."""

    epoch: int
    index: int
    skipped: int = 0


START = Position(0, 0, 0)
# Where a reader's blocks end (see the module docstring); new streams use the first.
BLOCK_LAYOUTS = ("span", "window")


class Segment(NamedTuple):
    """Part of a block from one window: positions `slots` (window-local, in order) of the
    window's `arrays`; rows_of_slot maps a slot to its row (-1: none), None = the same."""

    arrays: dict[str, np.ndarray]
    rows_of_slot: np.ndarray | None
    slots: np.ndarray


@dataclass
class Block:
    """Up to block_size samples of one reader.

    data:   field -> array [n, ...].
    before/after: the reader's position before and after this block.
    offset: leading samples of the block already consumed before a resume and left out here.
    slot_ends: None when every position of the block has its row; else, for each row (the
            left-out ones included), how many positions of the block end with it (corrupt
            positions skipped in between count) — how far a partly consumed block has gone.
    slot, at: in a worker pool, the block's slot and each field's byte offset in the pool's
            shared buffer (set by `WorkerPool.next_block`).
    rows:   the batch builder's note of where its outputs' rows start in that buffer.
    """

    worker: int
    before: Position
    after: Position
    offset: int
    size: int
    data: dict[str, Any]
    slot_ends: np.ndarray | None = None
    slot: int = -1
    at: dict[str, int] = field(default_factory=dict)
    rows: tuple[int, ...] | None = None

    def positions_consumed(self, rows: int) -> int:
        """Positions of this block used up by its first `rows` rows (the offset included)."""
        if rows <= 0:
            return 0
        return rows if self.slot_ends is None else int(self.slot_ends[rows - 1])


@dataclass
class Partition:
    """How the readers of a run share a source's epochs.

    n_readers: readers of the whole job (world_size x readers per rank).
    consumed:  epoch -> positions consumed before this run's reader layout began (an elastic
               resume); those positions are left out and the rest is split anew.
    """

    n_readers: int
    consumed: dict[int, Intervals] = field(default_factory=dict)

    def remaining(self, epoch: int, total: int) -> Intervals:
        return complement(self.consumed.get(epoch, []), total)

    def part(self, epoch: int, total: int, reader: int) -> Intervals:
        """Reader `reader`'s positions of `epoch` (see partition.reader_part)."""
        return reader_part(self.remaining(epoch, total), self.n_readers, reader)


def source_salt(name: str) -> int:
    """A stable per-source seed component (source order in the recipe may change)."""
    return zlib.crc32(name.encode())


class ShardStream:
    """Deterministic shuffled blocks of one source's samples for one rank's readers.

    manifest: the source's shards; rank/world_size: this process's place in the job;
    splits_per_rank: readers per rank (worker processes; 0 workers = 1 reader in-process);
    seed + salt seed every permutation; shuffle_buffer: samples shuffled together (0 = keep
    the manifest order); fields: the fields to decode (default all); block_size: samples per
    block; name: used in error messages; partition: how readers share the epochs (default: a
    fresh split among world_size x splits_per_rank readers). check_finite: float input fields
    checked for NaN/inf as they are read (labels may hold NaN: "no label"); on_nonfinite:
    "error" (ShardError naming source, shard, sample key and field) or "skip" (such samples are
    skipped and counted). window_rng: the generator that shuffles each window (see partition.py;
    "seed_sequence" reproduces the order of streams recorded before "philox"). block_layout:
    where blocks end ("span": the reader's part of an epoch cut into equal blocks of at most
    block_size, across windows; "window": at multiples of block_size from each window's start
    and at its end, as streams recorded before "span" did).
    """

    def __init__(
        self,
        manifest: Manifest,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle_buffer: int = 8192,
        skip_corrupt: bool = False,
        fields: list[str] | None = None,
        *,
        splits_per_rank: int = 1,
        block_size: int = 1024,
        salt: int = 0,
        name: str = "",
        partition: Partition | None = None,
        check_finite: list[str] | None = None,
        on_nonfinite: str = "error",
        window_rng: str = WINDOW_RNGS[0],
        block_layout: str = BLOCK_LAYOUTS[0],
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.manifest = manifest
        self.rank, self.world_size = rank, world_size
        self.seed = seed % 2**63  # SeedSequence wants non-negative entropy
        self.salt = salt
        self.shuffle_buffer = shuffle_buffer
        self.skip_corrupt = skip_corrupt
        self.splits_per_rank = max(1, splits_per_rank)
        self.block_size = max(1, block_size)
        self.name = name or manifest.path
        names = list(manifest.fields) if fields is None else list(fields)
        unknown = [f for f in names if f not in manifest.fields]
        if unknown:
            raise ConfigError(
                f"source '{self.name}': fields {unknown} are not in {manifest.path} "
                f"(it has: {', '.join(manifest.fields)})"
            )
        self.fields = {f: manifest.fields[f] for f in names}
        self.layout = SourceLayout.of(manifest, shuffle_buffer)
        self.n_readers = world_size * self.splits_per_rank
        self.check_finite = [f for f in (check_finite or []) if f in self.fields
                             and np.dtype(self.fields[f].dtype).kind == "f"]
        self.on_nonfinite = on_nonfinite
        self._nonfinite_logged = 0
        if self.layout.total < self.n_readers:
            raise ConfigError(
                f"source '{self.name}' ({manifest.path}): {self.layout.total} samples cannot "
                f"feed {self.n_readers} readers ({world_size} ranks x {self.splits_per_rank} "
                f"workers); every reader needs at least one sample per epoch. Fix: lower "
                f"data.num_workers or the number of processes."
            )
        self.partition = partition or Partition(self.n_readers)
        if window_rng not in WINDOW_RNGS:
            raise ValueError(f"source '{self.name}': window_rng must be one of {WINDOW_RNGS}, got {window_rng!r}")
        self.window_rng = window_rng
        if block_layout not in BLOCK_LAYOUTS:
            raise ValueError(f"source '{self.name}': block_layout must be one of {BLOCK_LAYOUTS}, got {block_layout!r}")
        self.block_layout = block_layout
        # (field, shape, dtype) -> array to write a block's field into (worker_pool's slots).
        self.out_buffer: Callable[[str, tuple, np.dtype], np.ndarray] | None = None
        # Local shards kept open between windows (a worker process's, see worker_pool).
        self.files: OpenFiles | None = None
        self._urls: dict[int, str] = {}  # shard -> url, resolved once
        self.indexed = all(
            len(s.offsets) == len(s.members) and s.url.endswith(".tar") and not s.url.startswith("pipe:")
            for s in (manifest.shards[int(i)] for i in self.layout.shard_ids)
        )
        # Local files only are kept open between windows (a remote stream held open by a
        # suspended reader would idle until its server drops it).
        self.local = all(local_file(self.url(int(i))) is not None for i in self.layout.shard_ids)
        self._orders: dict[int, EpochOrder] = {}
        self._size_ok: dict[int, bool] = {}  # shard -> its file size matched the manifest

    def url(self, shard: int) -> str:
        """The openable url of manifest shard `shard`."""
        got = self._urls.get(shard)
        if got is None:
            got = self._urls[shard] = self.manifest.shard_url(shard)
        return got

    def _check_size(self, shard: int) -> bool:
        """Whether a read of `shard` should check its file size. A shard is read again window
        after window: once its size matched the manifest, later reads skip the check (each key
        is still checked against its digest); a shard that failed it is checked (and reported)
        at every read, as before."""
        ok = self._size_ok.get(shard)
        if ok is None:
            info = self.manifest.shards[shard]
            ok = self._size_ok[shard] = size_problem(self.url(shard), info) is None
        return not ok

    def reader(self, worker: int) -> int:
        """The job-wide reader id of this rank's worker `worker`."""
        return self.rank * self.splits_per_rank + worker

    def order(self, epoch: int) -> EpochOrder:
        """Epoch `epoch`'s global order (the last few are cached)."""
        got = self._orders.get(epoch)
        if got is None:
            got = EpochOrder(self.layout, self.seed, self.salt, epoch, self.shuffle_buffer > 0, self.window_rng)
            if len(self._orders) >= 4:
                self._orders.pop(min(self._orders))
            self._orders[epoch] = got
        return got

    def part(self, epoch: int, worker: int) -> Intervals:
        """Positions of epoch `epoch` that this rank's worker `worker` reads."""
        return self.partition.part(epoch, self.layout.total, self.reader(worker))

    def epoch_size(self, epoch: int, worker: int) -> int:
        """Samples in this reader's part of epoch `epoch`."""
        return length(self.part(epoch, worker))

    def blocks(self, worker: int = 0, start: Position = START, drop: int = 0) -> Iterator[Block]:
        """Infinite blocks of this rank's reader `worker` from position `start`.

        drop: samples at the start of the first block that were already consumed (they are
        left out of it and reported as its `offset`; a drop longer than that block, possible
        only after a block-size change, continues into the next). Block data are fresh
        contiguous numpy arrays [n, ...] (in a worker: arrays in its shared slot, see
        `out_buffer`). A reader whose part of an epoch is empty (possible
        only after an elastic resume) yields one empty block for it.
        """
        epoch, index, skipped = start
        drop_left = [drop]
        while True:
            part = self.part(epoch, worker)
            n = length(part)
            if n == 0:
                yield Block(worker, Position(epoch, 0, skipped), Position(epoch + 1, 0, skipped), 0, 0, self._empty())
            elif index < n:
                for block in self._read_part(worker, epoch, part, index, skipped, drop_left):
                    skipped = block.after.skipped
                    yield block
            epoch, index = epoch + 1, 0

    def _read_part(self, worker: int, epoch: int, part: Intervals, index: int, skipped: int,
                   drop_left: list[int]) -> Iterator[Block]:
        order = self.order(epoch)
        total = length(part)
        j, pos = position_in(part, index)
        bs = self.block_size
        span = self.block_layout == "span"
        pending: list[Segment] = []  # the pieces of the block being built, in order
        before = Position(epoch, index, skipped)
        for nth, (s, e) in enumerate(part[j:]):
            pos = pos if nth == 0 else s  # a later interval may start inside the last window
            w0, w1 = order.window_of_position(pos), order.window_of_position(e - 1)
            # Shards without key offsets are streamed through the whole run of windows. Shards
            # with them are read window by window, only the keys this reader needs; in a worker
            # (which keeps local shards open) the windows read whole are streamed too, sparing a
            # shard read's setup per window.
            whole_from, whole_to = w1 + 1, w1  # windows streamed: none
            if not self.indexed:
                whole_from, whole_to = w0, w1
            elif self.files is not None and self.local:
                whole_from = w0 if pos == order.window_positions(w0)[0] else w0 + 1
                whole_to = w1 if e == order.window_positions(w1)[1] else w1 - 1
            members = None
            if whole_from <= whole_to:
                members = self._members(order, order.window_members(whole_from)[0], order.window_members(whole_to)[1])
            try:
                for w, (m0, m1), (p0, p1) in self._windows(order, w0, w1):
                    perm = order.window_permutation(w, p1 - p0)
                    lo, hi = max(pos, p0), min(e, p1)
                    streamed = members if whole_from <= w <= whole_to else None
                    arrays, rows_of_slot = self._read_window(order, m0, m1, streamed, perm[lo - p0 : hi - p0])
                    while lo < hi:
                        if span:  # the block's end in the part (see partition.block_end)
                            if not pending:
                                end = block_end(index, total, bs)
                            stop = min(lo + end - index, hi)
                        else:  # at the next multiple of block_size from the window start
                            stop = min(p0 + ((lo - p0) // bs + 1) * bs, hi)
                        pending.append(Segment(arrays, rows_of_slot, perm[lo - p0 : stop - p0]))
                        index += stop - lo
                        lo = stop
                        if span and index < end:
                            continue  # the block goes on in the next window
                        data, rows, slot_ends, missing = self._assemble(pending, drop_left)
                        pending = []
                        if lo >= hi:  # the window's last block: free it while suspended at the yield
                            arrays = rows_of_slot = None  # type: ignore[assignment]
                        skipped += missing
                        # The end of the part is the start of the next epoch's part.
                        after = Position(epoch, index, skipped) if index < total else Position(epoch + 1, 0, skipped)
                        yield Block(worker, before, after, rows[0], rows[1], data, slot_ends)
                        before = after
                    pos = p1
                    arrays = rows_of_slot = None  # type: ignore[assignment]  # freed before the next window is read
            finally:
                if members is not None:
                    members.close()

    def _assemble(self, pending: list[Segment], drop_left: list[int]) -> tuple[dict, tuple[int, int], np.ndarray | None, int]:
        """A block's (data, (offset, size), slot_ends, positions skipped) from its segments:
        their rows in order, less the first `drop_left[0]` (consumed before a resume)."""
        rows_of = []
        oks = []
        for seg in pending:
            if seg.rows_of_slot is None:
                rows_of.append(seg.slots)
                oks.append(None)
            else:
                mapped = seg.rows_of_slot[seg.slots]
                ok = mapped >= 0
                rows_of.append(mapped[ok])
                oks.append(ok)
        n_positions = sum(len(seg.slots) for seg in pending)
        n_rows = sum(len(r) for r in rows_of)
        slot_ends = None
        if any(ok is not None and not ok.all() for ok in oks):
            ok = np.concatenate([np.ones(len(seg.slots), bool) if k is None else k for seg, k in zip(pending, oks)])
            slot_ends = np.flatnonzero(ok) + 1
            if len(slot_ends):
                slot_ends[-1] = n_positions  # trailing skips end with the last row
        offset = min(drop_left[0], n_rows)  # normally the first block only
        drop_left[0] -= offset
        cut = offset
        for k, r in enumerate(rows_of):
            take = min(cut, len(r))
            rows_of[k] = r[take:]
            cut -= take
        kept = [(seg.arrays, r) for seg, r in zip(pending, rows_of) if len(r)] or [(pending[0].arrays, rows_of[0])]
        data = {name: self._gather(name, [(arrays[name], r) for arrays, r in kept]) for name in pending[0].arrays}
        return data, (offset, n_rows - offset), slot_ends, n_positions - n_rows

    @staticmethod
    def _windows(order: EpochOrder, w0: int, w1: int, batch: int = 256) -> Iterator[tuple[int, tuple[int, int], tuple[int, int]]]:
        """(window, (first, end) member, (start, end) position) of windows w0..w1, their bounds
        computed `batch` windows at a time (a reader's slice may hold very many)."""
        for a in range(w0, w1 + 1, batch):
            b = min(a + batch - 1, w1)
            members, positions = order.window_starts(a, b)
            m, p = members.tolist(), positions.tolist()
            for k in range(b - a + 1):
                yield a + k, (m[k], m[k + 1]), (p[k], p[k + 1])

    def _gather(self, name: str, pieces: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
        """The rows `rows` of each (window array, rows) piece, joined in order into one fresh
        array, written where `out_buffer` says (a worker's shared slot) if set."""
        if self.out_buffer is None and len(pieces) == 1:
            window, rows = pieces[0]
            return window[rows]
        window = pieces[0][0]
        shape = (sum(len(r) for _, r in pieces), *window.shape[1:])
        out = np.empty(shape, window.dtype) if self.out_buffer is None else self.out_buffer(name, shape, window.dtype)
        at = 0
        for window, rows in pieces:
            # mode "clip": "raise" would buffer `out`
            window.take(rows, axis=0, out=out[at : at + len(rows)], mode="clip")
            at += len(rows)
        return out

    def _empty(self) -> dict[str, np.ndarray]:
        return {f: np.zeros((0, *i.shape), i.dtype) for f, i in self.fields.items()}

    def _members(self, order: EpochOrder, first: int, end: int) -> Iterator[tuple[int, dict | None, np.ndarray | None]]:
        """(samples, data or None if corrupt, rows to keep or None = all) for members
        [first, end) of the epoch, in order."""
        m = self.manifest
        for shard, q0, q1 in order.shard_members(first, end):
            info, url = m.shards[shard], self.url(shard)
            for i, key, data in read_shard(
                url, self.fields, m.layout, info.members, start=q0, stop=q1, offsets=info.offsets,
                skip_corrupt=self.skip_corrupt, manifest=m.path, shard=info, check_size=self._check_size(shard),
                files=self.files,
            ):
                yield info.members[i], *self._kept(data, url, key)

    def _kept(self, data: dict | None, url: str, key: str | None) -> tuple[dict | None, np.ndarray | None]:
        """(data without the samples whose checked inputs are not finite, bool rows kept or
        None = all). Policy "error": ShardError naming source, shard, sample key, row and field."""
        if data is None or not self.check_finite:
            return data, None
        chunk = self.manifest.layout == "chunk"
        found = nonfinite_rows(data, self.check_finite, chunk)
        if found is None:
            return data, None
        field, bad = found
        message = nonfinite_message(self.name, url, key, field, int(np.argmax(bad)), chunk)
        if self.on_nonfinite != "skip":
            raise ShardError(message)
        if self._nonfinite_logged < 10:  # the skipped count goes on in data/<source>/skipped
            self._nonfinite_logged += 1
            log.warning("%s; skipping %d such sample(s) of that key", message.split("; fix")[0], int(bad.sum()))
        keep = ~bad
        if not chunk:  # one sample per key: the whole key goes
            return None, keep
        return {f: v[keep] for f, v in data.items()}, keep

    def _read_window(self, order: EpochOrder, first: int, end: int, members: Iterator | None,
                     need: np.ndarray) -> tuple[dict, np.ndarray | None]:
        """The samples of the window of members [first, end) as arrays [rows, ...] and, unless
        every position has its row, position -> row (-1 for a corrupt, skipped or unread one).
        need: the window-local positions the reader will take; with `members` None only the
        keys holding them are read."""
        m = self.manifest
        pieces = list(order.shard_members(first, end))
        sizes = [n for sh, q0, q1 in pieces for n in m.shards[sh].members[q0:q1]]  # samples per member
        parts: list[dict] = []
        # Per member: True (every row present), or the bool rows present; None = not read.
        present: list[bool | np.ndarray | None] = [None] * len(sizes)

        def add(j: int, data: dict | None, keep: np.ndarray | None) -> None:
            present[j] = keep if keep is not None else data is not None
            if data is not None and (keep is None or keep.any()):
                parts.append(data)

        if members is None:
            whole = len(need) == sum(sizes)  # the usual case: every key of the window
            if not whole:
                wanted = np.zeros(len(sizes), dtype=bool)
                wanted[np.repeat(np.arange(len(sizes)), sizes)[need]] = True
            k = 0
            for shard, q0, q1 in pieces:
                select = None if whole else {q0 + int(i) for i in np.flatnonzero(wanted[k : k + q1 - q0])}
                info, url = m.shards[shard], self.url(shard)
                if select is None or select:
                    for i, key, data in read_shard(
                        url, self.fields, m.layout, info.members, start=q0, stop=q1,
                        offsets=info.offsets, select=select, skip_corrupt=self.skip_corrupt,
                        manifest=m.path, shard=info, check_size=self._check_size(shard), files=self.files,
                    ):
                        add(k + i - q0, *self._kept(data, url, key))
                k += q1 - q0
        else:
            for j in range(len(sizes)):
                _size, data, keep = next(members)
                add(j, data, keep)
        arrays = stack_members(parts, self.fields, m.layout)
        if all(p is True for p in present):
            return arrays, None
        ok = np.concatenate([p if isinstance(p, np.ndarray) else np.full(n, bool(p)) for p, n in zip(present, sizes)])
        rows = np.cumsum(ok) - 1
        rows[~ok] = -1
        return arrays, rows


def stack_members(parts: list[dict], fields: dict[str, FieldInfo], layout: str) -> dict[str, np.ndarray]:
    """Decoded members (see `read_shard`) -> field -> one array [rows, ...] (a copy, except for a
    single chunk, whose read-only arrays are returned as they are)."""
    out = {}
    for name, info in fields.items():
        if not parts:
            out[name] = np.zeros((0, *info.shape), dtype=info.dtype)
        elif layout == "chunk":
            # one chunk: its arrays as read (blocks gather a copy from them anyway)
            out[name] = parts[0][name] if len(parts) == 1 else np.concatenate([p[name] for p in parts])
        else:
            out[name] = np.asarray([p[name] for p in parts], dtype=info.dtype)
    return out
