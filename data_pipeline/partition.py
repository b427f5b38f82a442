"""One epoch's global sample order of a source, and its split among readers.

The order is a pure function of (manifest, seed, source salt, epoch, shuffle window) and never
of the number of processes:
- the non-empty shards in the order `default_rng([seed, salt, epoch]).permutation(shards)`;
- their tar keys ("members": one sample, or a chunk of samples) in tar order, shard after
  shard. Consecutive shards whose members start in the same block of `window_members`
  members form a *group*; a group is cut into *windows* of `window_members` members (the last
  one shorter). A window never mixes groups, so locating it needs only shard-level sums;
- the samples of window w are permuted by the window generator keyed by (seed, salt, epoch,
  w): `"philox"` (the default; `philox_permutation`: numpy's counter-based Philox set
  directly to the key, ~10 us) or `"seed_sequence"` (`default_rng(key)`, ~30 us: a
  SeedSequence per window was a fixed cost per window that made many small sources read
  slower than one big one). The two give different orders; a stream position records which
  one it was taken with (`window_rng` in the loader state) and resumes with it.
Global position p (0 <= p < total) is the p-th sample of that order.

Readers (rank x worker, all of them) share the positions not yet consumed: `reader_part`
gives reader i of n the i-th of n contiguous runs of equal length (+-1 sample; the first
`remaining % n` readers hold one more) of the remaining positions in order. A fresh epoch's
remaining positions are one interval, so a reader's part is one contiguous slice of the
order and touches only the windows (shards, chunks) that slice covers.

Nothing here holds one entry per sample: the plan of an epoch costs O(shards) and a reader's
slice O(log shards); member-level sums are built only for the shards a reader touches.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from manytask.data_pipeline.manifest import Manifest

Intervals = list[tuple[int, int]]  # sorted, disjoint, non-empty [start, end) position ranges
# Window generators by name (see the module docstring); new streams use the first.
WINDOW_RNGS = ("philox", "seed_sequence")


# ---------------------------------------------------------------- interval sets


def merge(parts: Iterable[tuple[int, int]]) -> Intervals:
    """Union of [start, end) ranges as sorted disjoint intervals (touching ones joined)."""
    out: Intervals = []
    for s, e in sorted((int(s), int(e)) for s, e in parts if e > s):
        if out and s <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        else:
            out.append((s, e))
    return out


def complement(consumed: Intervals, total: int) -> Intervals:
    """[0, total) minus `consumed` (sorted, disjoint)."""
    out: Intervals = []
    at = 0
    for s, e in consumed:
        if s > at:
            out.append((at, min(s, total)))
        at = max(at, e)
    if at < total:
        out.append((at, total))
    return out


def length(iv: Intervals) -> int:
    return sum(e - s for s, e in iv)


def take_range(iv: Intervals, lo: int, hi: int) -> Intervals:
    """Elements lo..hi-1 of the concatenation of `iv`, as intervals."""
    out: Intervals = []
    before = 0
    for s, e in iv:
        n = e - s
        a, b = max(lo - before, 0), min(hi - before, n)
        if a < b:
            out.append((s + a, s + b))
        before += n
        if before >= hi:
            break
    return out


def balanced_bounds(total: int, n: int, i: int) -> tuple[int, int]:
    """[lo, hi) of reader i of n over `total` items: sizes differ by at most one."""
    q, r = divmod(total, n)
    lo = i * q + min(i, r)
    return lo, lo + q + (1 if i < r else 0)


def block_end(index: int, total: int, block_size: int) -> int:
    """End of the block holding position `index` of a reader's part of `total` positions, cut
    into ceil(total / block_size) blocks of equal length (+-1; the first ones longer): never
    a short tail block, whose reader would have to read its next block in the little time the
    trainer takes to use it (with many sources alike, all of them at once)."""
    n = -(-total // block_size)
    q, r = divmod(total, n)
    k = index // (q + 1) if index < r * (q + 1) else r + (index - r * (q + 1)) // q
    return balanced_bounds(total, n, k)[1]


def reader_part(remaining: Intervals, n_readers: int, reader: int) -> Intervals:
    """Reader `reader`'s share of the remaining positions (see the module docstring)."""
    lo, hi = balanced_bounds(length(remaining), n_readers, reader)
    return take_range(remaining, lo, hi)


# ---------------------------------------------------------------- the epoch order


@dataclass
class ShardPlan:
    """The shard-level sums of one epoch's shard order (see EpochOrder); read-only arrays."""

    order: np.ndarray  # epoch's i-th shard -> layout index
    shard_pos: np.ndarray  # first position per shard (+ the total)
    shard_mem: np.ndarray  # first member per shard (+ the number of members)
    group_shard: np.ndarray  # first shard per group (+ the number of shards)
    group_mem: np.ndarray  # first member per group (+ the number of members)
    group_win: np.ndarray  # first window per group (+ the number of windows)


@dataclass
class SourceLayout:
    """What of a manifest the order needs, computed once per source (O(shards))."""

    shard_ids: np.ndarray  # manifest indices of the non-empty shards
    samples: np.ndarray  # samples per non-empty shard
    members: np.ndarray  # members (tar keys) per non-empty shard
    unit: bool  # every member is one sample (sample layout): member sums are closed-form
    window_members: int
    manifest: Manifest = field(repr=False)
    _cums: dict[int, np.ndarray] = field(default_factory=dict, repr=False)
    _single: ShardPlan | None = field(default=None, repr=False)

    @classmethod
    def of(cls, m: Manifest, shuffle_buffer: int) -> SourceLayout:
        ids = np.array([i for i, s in enumerate(m.shards) if s.samples > 0], dtype=np.int64)
        chunk = m.chunk_size if m.layout == "chunk" else 1
        window = max(1, math.ceil(shuffle_buffer / chunk)) if shuffle_buffer > 0 else 1
        return cls(
            ids,
            np.array([m.shards[i].samples for i in ids], dtype=np.int64),
            np.array([len(m.shards[i].members) for i in ids], dtype=np.int64),
            all(len(m.shards[i].members) == m.shards[i].samples for i in ids),
            window,
            m,
        )

    @property
    def total(self) -> int:
        return int(self.samples.sum())

    def plan(self, order: np.ndarray) -> ShardPlan:
        """The shard-level sums of the shards in `order` (layout indices), O(shards)."""
        samples, members = self.samples[order], self.members[order]
        shard_pos = np.concatenate([[0], np.cumsum(samples)]).astype(np.int64)
        shard_mem = np.concatenate([[0], np.cumsum(members)]).astype(np.int64)
        k = self.window_members
        # Group of each shard: the block of k members its first member falls in; a group
        # starts at the first shard of each new block.
        block = shard_mem[:-1] // k
        starts = np.flatnonzero(np.concatenate([[True], block[1:] != block[:-1]])) if len(block) else np.zeros(0, np.int64)
        group_shard = np.concatenate([starts, [len(block)]]).astype(np.int64)
        group_mem = np.concatenate([shard_mem[starts], shard_mem[-1:]])
        n_windows = -(-(group_mem[1:] - group_mem[:-1]) // k)
        group_win = np.concatenate([[0], np.cumsum(n_windows)]).astype(np.int64)
        return ShardPlan(order, shard_pos, shard_mem, group_shard, group_mem, group_win)

    def single_plan(self) -> ShardPlan:
        """`plan` of the only order of a source with at most one shard, computed once."""
        got = self._single
        if got is None:
            got = self._single = self.plan(np.arange(len(self.shard_ids)))
        return got

    def member_cum(self, k: int) -> np.ndarray:
        """Sample offset of each member of non-empty shard k within its shard (+ its size)."""
        got = self._cums.get(k)
        if got is None:
            sizes = self.manifest.shards[int(self.shard_ids[k])].members
            got = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
            if len(self._cums) > 4096:
                self._cums.clear()
            self._cums[k] = got
        return got


class EpochOrder:
    """The global order of one epoch of one source (see the module docstring).

    Coordinates: position p (a sample of the order), member m (a tar key, counted over the
    epoch's shards in order), window w. All maps are O(log shards) plus, for the chunk layout,
    the touched shard's member sums.
    """

    def __init__(self, layout: SourceLayout, seed: int, salt: int, epoch: int, shuffle: bool = True,
                 window_rng: str = WINDOW_RNGS[0]):
        if window_rng not in WINDOW_RNGS:
            raise ValueError(f"window_rng must be one of {WINDOW_RNGS}, got {window_rng!r}")
        self.layout, self.seed, self.salt, self.epoch, self.shuffle = layout, seed, salt, epoch, shuffle
        self.window_rng = window_rng
        n = len(layout.shard_ids)
        if n > 1:
            # Once per source and epoch, so a SeedSequence costs little here (and keeps the order).
            plan = layout.plan(np.random.default_rng([seed, salt, epoch]).permutation(n))
        else:
            # A source written as one shard (the writer's default) has one order, and so one
            # plan, for every epoch: computed once (a reader of a small source starts an epoch
            # every few windows).
            plan = layout.single_plan()
        self.order = plan.order  # -> layout index
        self.shard_pos, self.shard_mem = plan.shard_pos, plan.shard_mem
        self.group_shard, self.group_mem, self.group_win = plan.group_shard, plan.group_mem, plan.group_win

    @property
    def total(self) -> int:
        return int(self.shard_pos[-1])

    @property
    def n_windows(self) -> int:
        return int(self.group_win[-1])

    def shard_at(self, i: int) -> int:
        """Manifest index of the i-th shard of this epoch."""
        return int(self.layout.shard_ids[self.order[i]])

    def shard_of_position(self, p: int) -> int:
        return int(self.shard_pos.searchsorted(p, "right")) - 1

    def member_of_position(self, p: int) -> int:
        """The member holding position p."""
        i = self.shard_of_position(p)
        off = p - int(self.shard_pos[i])
        if self.layout.unit:
            return int(self.shard_mem[i]) + off
        cum = self.layout.member_cum(int(self.order[i]))
        return int(self.shard_mem[i]) + int(cum.searchsorted(off, "right")) - 1

    def position_of_member(self, m: int) -> int:
        """The first position of member m (m = number of members gives `total`)."""
        if m >= int(self.shard_mem[-1]):
            return self.total
        i = int(self.shard_mem.searchsorted(m, "right")) - 1
        q = m - int(self.shard_mem[i])
        if self.layout.unit:
            return int(self.shard_pos[i]) + q
        return int(self.shard_pos[i]) + int(self.layout.member_cum(int(self.order[i]))[q])

    def window_of_member(self, m: int) -> int:
        g = int(self.group_mem.searchsorted(m, "right")) - 1
        return int(self.group_win[g]) + (m - int(self.group_mem[g])) // self.layout.window_members

    def window_members(self, w: int) -> tuple[int, int]:
        """[first, end) members of window w."""
        g = int(self.group_win.searchsorted(w, "right")) - 1
        first = int(self.group_mem[g]) + (w - int(self.group_win[g])) * self.layout.window_members
        return first, min(first + self.layout.window_members, int(self.group_mem[g + 1]))

    def window_positions(self, w: int) -> tuple[int, int]:
        """[start, end) positions of window w."""
        a, b = self.window_members(w)
        return self.position_of_member(a), self.position_of_member(b)

    def window_starts(self, w0: int, w1: int) -> tuple[np.ndarray, np.ndarray]:
        """(first member, first position) of windows w0..w1 and the end of w1, as arrays
        [w1 - w0 + 2] (windows tile the members in order: a window ends where the next starts).
        The same as `window_members` / `window_positions` window by window, in a few array
        operations for a reader's run of windows."""
        w = np.arange(w0, w1 + 1, dtype=np.int64)
        g = self.group_win.searchsorted(w, side="right") - 1
        first = self.group_mem[g] + (w - self.group_win[g]) * self.layout.window_members
        members = np.append(first, self.window_members(w1)[1])
        return members, self.positions_of_members(members)

    def positions_of_members(self, m: np.ndarray) -> np.ndarray:
        """`position_of_member` of each of the sorted members `m` (int64 array)."""
        i = np.minimum(self.shard_mem.searchsorted(m, side="right") - 1, len(self.shard_mem) - 2)
        q = m - self.shard_mem[i]
        if self.layout.unit:
            return self.shard_pos[i] + q
        out = np.empty(len(m), np.int64)
        lo = 0
        while lo < len(m):  # m is sorted: each shard the run touches is one stretch of it
            k = int(i[lo])
            hi = int(i.searchsorted(k, "right"))
            cum = self.layout.member_cum(int(self.order[k]))
            out[lo:hi] = self.shard_pos[k] + cum[np.minimum(q[lo:hi], len(cum) - 1)]
            lo = hi
        return out

    def window_of_position(self, p: int) -> int:
        return self.window_of_member(self.member_of_position(p))

    def window_permutation(self, w: int, n: int) -> np.ndarray:
        """Order of window w's n samples (identity without shuffling)."""
        if not self.shuffle:
            return np.arange(n)
        if self.window_rng == "seed_sequence":
            return np.random.default_rng([self.seed, self.salt, self.epoch, w]).permutation(n)
        return philox_permutation((self.seed, self.salt, self.epoch, w), n)

    def shard_members(self, first: int, end: int) -> Iterable[tuple[int, int, int]]:
        """(manifest shard, first member in shard, end member in shard) covering members
        [first, end) of the epoch, in order."""
        i = int(self.shard_mem.searchsorted(first, "right")) - 1
        while first < end:
            lo = int(self.shard_mem[i])
            hi = min(int(self.shard_mem[i + 1]), end)
            yield self.shard_at(i), first - lo, hi - lo
            first = hi
            i += 1

    def shards_of(self, part: Intervals) -> list[int]:
        """Manifest indices of the shards a reader of `part` opens (whole windows)."""
        out: list[int] = []
        for s, e in part:
            a = self.window_members(self.window_of_position(s))[0]
            b = self.window_members(self.window_of_position(e - 1))[1]
            i0 = int(self.shard_mem.searchsorted(a, "right")) - 1
            i1 = int(self.shard_mem.searchsorted(b - 1, "right")) - 1
            out.extend(self.shard_at(i) for i in range(i0, i1 + 1))
        return list(dict.fromkeys(out))


_PHILOX = threading.local()  # a generator per thread: its state is set, then drawn from


def philox_permutation(key: tuple[int, int, int, int], n: int) -> np.ndarray:
    """A permutation of range(n), a pure function of `key` = (seed, salt, epoch, window), all
    in [0, 2**64): numpy's Philox with key (seed, salt) and counter (0, 0, epoch, window), set
    on this thread's generator (~5 us less than building one per call, ~20 us less than a
    SeedSequence). Each (epoch, window) is a stream of draws of its own (2**128 draws before it
    would reach the next)."""
    seed, salt, epoch, window = key
    if not hasattr(_PHILOX, "draws"):
        _PHILOX.bits = np.random.Philox(0)
        _PHILOX.draws = np.random.Generator(_PHILOX.bits)
    _PHILOX.bits.state = {
        "bit_generator": "Philox",
        "state": {"counter": np.array([0, 0, epoch, window], np.uint64), "key": np.array([seed, salt], np.uint64)},
        "buffer": np.zeros(4, np.uint64), "buffer_pos": 4, "has_uint32": 0, "uinteger": 0,
    }
    return _PHILOX.draws.permutation(n)


def position_in(part: Intervals, index: int) -> tuple[int, int]:
    """(interval number, global position) of the index-th position of `part`."""
    before = 0
    for j, (s, e) in enumerate(part):
        if index < before + e - s:
            return j, s + index - before
        before += e - s
    return len(part), 0


@dataclass
class ReaderPlan:
    """Every reader's slice of a fresh epoch: positions [bounds[i], bounds[i+1]) and the
    shards it may open, `first_shard[i]` to `last_shard[i]` (epoch order, inclusive; whole
    shard groups, so a superset of what reading touches; 0 and -1 for an empty slice)."""

    bounds: np.ndarray  # [readers + 1]
    first_shard: np.ndarray  # [readers]
    last_shard: np.ndarray  # [readers]


def plan_readers(order: EpochOrder, n_readers: int) -> ReaderPlan:
    """All readers' slices of a fresh epoch at once, O(readers + shards) with numpy (the
    per-reader `reader_part` gives the same slices one reader at a time)."""
    total = order.total
    q, r = divmod(total, n_readers)
    i = np.arange(n_readers + 1, dtype=np.int64)
    bounds = i * q + np.minimum(i, r)
    lo, hi = bounds[:-1], np.maximum(bounds[1:] - 1, bounds[:-1])
    s0 = np.searchsorted(order.shard_pos, lo, side="right") - 1
    s1 = np.searchsorted(order.shard_pos, hi, side="right") - 1
    last = len(order.shard_pos) - 2
    g0 = np.searchsorted(order.group_shard, np.minimum(s0, last), side="right") - 1
    g1 = np.searchsorted(order.group_shard, np.minimum(s1, last), side="right") - 1
    first, end = order.group_shard[g0], order.group_shard[g1 + 1] - 1
    empty = bounds[1:] == bounds[:-1]  # more readers than samples: nothing to open
    return ReaderPlan(bounds, np.where(empty, 0, first), np.where(empty, -1, end))
