"""How far the trainer has read each source: per rank, reader by reader; and job-wide.

- `SourceCursor`: one source on one rank — per local reader the position of the blocks the
  trainer consumed (prefetched blocks are not counted), which reader's block comes next and
  how much of it was used; `pieces(n)` names the next n samples as rows of blocks, `take(n)`
  returns them as arrays. Exact resume with the same world size and workers restores it.
- `Consumed` / `consumed_of`: what the whole job has consumed of one source, in world-size-
  independent terms (intervals of each epoch's global order), from every reader's progress:
  a resume with another world size or worker count splits the rest of the epoch anew.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from manytask.data_pipeline.batch import Piece
from manytask.data_pipeline.partition import Intervals, length, merge, take_range
from manytask.data_pipeline.stream import START, Block, Position, ShardStream


@dataclass
class Consumed:
    """What the whole job has consumed of one source: every epoch before `epoch`, and of the
    later ones the position `intervals`; `skipped` corrupt samples so far."""

    epoch: int
    intervals: dict[int, Intervals]
    skipped: int = 0

    def to_state(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "skipped": self.skipped,
                "intervals": [[e, [list(p) for p in iv]] for e, iv in sorted(self.intervals.items())]}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Consumed:
        return cls(int(state["epoch"]), {int(e): [tuple(p) for p in iv] for e, iv in state["intervals"]},
                   int(state.get("skipped", 0)))


class SourceCursor:
    """One source on one rank: what the trainer consumed, reader by reader.

    Blocks are taken from the rank's readers in turn (0, 1, ..., 0, ...); a half-consumed
    block is re-read from its start position minus the samples already used.
    """

    def __init__(self, stream: ShardStream):
        self.stream = stream
        self.readers = stream.splits_per_rank
        self.positions = [START] * self.readers  # per local reader, consumed by the trainer
        self.next = 0  # local reader whose block comes next
        self.drop = 0  # rows of that reader's next block already consumed
        self.drop_positions = 0  # positions those rows cover (corrupt ones included)
        self.skipped_base = 0  # skipped samples recorded under an older reader layout
        self.head: Block | None = None
        self.used = 0
        self.finished: list[Block] = []  # consumed blocks whose data the last take may still show

    def starts(self) -> list[tuple[Position, int]]:
        """(position, drop) of every local reader, where its blocks should start."""
        return [(p, self.drop if w == self.next else 0) for w, p in enumerate(self.positions)]

    def take(self, n: int, blocks: Any, index: int) -> dict[str, np.ndarray]:
        """The next n samples: field -> array [n, ...], valid until the next `take` (it may
        be a view of a worker's shared memory, whose slot is handed back then)."""
        self.release(blocks, index)
        blocks.flush()
        pieces = self.pieces(n, blocks, index)
        if not pieces:
            return {f: np.zeros((0, *i.shape), i.dtype) for f, i in self.stream.fields.items()}
        if len(pieces) == 1:
            block, lo, hi = pieces[0]
            return {f: a[lo:hi] for f, a in block.data.items()}
        return {f: np.concatenate([b.data[f][lo:hi] for b, lo, hi in pieces]) for f in pieces[0][0].data}

    def pieces(self, n: int, blocks: Any, index: int) -> list[Piece]:
        """The next n samples as pieces (block, lo, hi) — rows lo..hi-1 of a block's arrays —
        valid until `release`. A block used up while more rows are needed is copied out and
        its slot given back at once: its worker may need that slot for the rows still to come."""
        head, used = self.head, self.used
        if head is not None and used + n < head.size:  # the common case: inside the block in hand
            self.used = used + n
            return [(head, used, used + n)]
        pieces: list[Piece] = []
        while n > 0:
            if self.head is None:
                block = blocks.next_block(index, self.next)
                if block.worker != self.next:  # the round-robin contract resume depends on
                    raise RuntimeError(
                        f"source '{self.stream.name}': got a block of reader {block.worker}, "
                        f"expected reader {self.next}"
                    )
                self.head, self.used = block, 0
            head = self.head
            k = min(n, head.size - self.used)
            if k:
                pieces.append((head, self.used, self.used + k))
            self.used += k
            n -= k
            if self.used == head.size:  # fully consumed: the reader's position moves on
                self.positions[head.worker] = head.after
                self.next = (head.worker + 1) % self.readers
                self.drop = self.drop_positions = 0
                self.head = None
                if n == 0:
                    self.finished.append(head)  # the pieces may show its rows
                    continue
                if k and blocks.shared:  # more to take: own the part, give the slot back now
                    lo = pieces[-1][1]
                    part = {f: a[lo : lo + k].copy() for f, a in head.data.items()}
                    pieces[-1] = (Block(head.worker, head.before, head.after, 0, k, part), 0, k)
                blocks.release(index, head)
        return pieces

    def release(self, blocks: Any, index: int) -> None:
        """Give back the slots of the blocks the last pieces used up."""
        if self.finished:
            for done in self.finished:
                blocks.release(index, done)
            self.finished = []

    def detach(self) -> None:
        """Forget the block in hand, keeping how much of it was used (before the workers stop)."""
        self.finished = []
        if self.head is not None:
            self.drop = self.head.offset + self.used
            self.drop_positions = self.head.positions_consumed(self.drop)
            self.head = None

    @property
    def skipped(self) -> int:
        """Corrupt samples skipped so far (consumed blocks only)."""
        return self.skipped_base + sum(p.skipped for p in self.positions)

    @property
    def epoch(self) -> int:
        """The epoch of the slowest reader."""
        return min(p.epoch for p in self.positions)

    def progress(self) -> list[tuple[int, int, int, int]]:
        """(job-wide reader id, epoch, positions consumed of its part, skipped) per local reader."""
        out = []
        for w, p in enumerate(self.positions):
            epoch, index = p.epoch, p.index
            if w == self.next:
                if self.head is not None:
                    epoch = self.head.before.epoch
                    index = self.head.before.index + self.head.positions_consumed(self.head.offset + self.used)
                else:
                    index += self.drop_positions
            out.append((self.stream.reader(w), epoch, index, p.skipped))
        return out


def consumed_of(stream: ShardStream, progress: list[tuple[int, int, int, int]], skipped_base: int) -> Consumed:
    """The job-wide consumed positions of one source, from every reader's progress."""
    total = stream.layout.total
    lo = min(e for _, e, _, _ in progress)
    hi = max(e for _, e, _, _ in progress)
    intervals: dict[int, Intervals] = {}
    for e in range(lo, hi + 1):
        pieces = list(stream.partition.consumed.get(e, []))
        for reader, epoch, index, _ in progress:
            if epoch < e:
                continue
            part = stream.partition.part(e, total, reader)
            pieces += part if epoch > e else take_range(part, 0, index)
        intervals[e] = merge(pieces)
    while lo in intervals and length(intervals[lo]) == total:  # epochs every reader finished
        del intervals[lo]
        lo += 1
    return Consumed(lo, intervals, skipped_base + sum(s for _, _, _, s in progress))
