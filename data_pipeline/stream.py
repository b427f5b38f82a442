"""ShardStream: an infinite, deterministic, resumable stream of sample blocks for one source.

Order of samples (everything is a pure function of the manifest, the seed and the position):
- epoch e: shards permuted by `default_rng([seed, salt, e])`; split s (= rank * splits_per_rank
  + worker) takes the permuted shards at index % n_splits == s — no overlap, no loss.
- the split's epoch sequence is its shards' tar keys ("members", chunks) in order; consecutive
  groups of ceil(shuffle_buffer / chunk_size) members form a *window*, whose samples are
  permuted by `default_rng([seed, salt, e, s, window])`. Window sizes come from the manifest's
  `members` lists, so a resume skips whole shards without reading them.
- blocks: each window is emitted in blocks of `block_size` samples counted from the window
  start (the last block of a window may be shorter). A block carries the split's `Position`
  before and after it, so a consumer knows exactly how far it has read.

A `Position` is (epoch, index, skipped): `index` counts manifest sample slots of the split's
epoch sequence (corrupt samples skipped with `skip_corrupt` still advance it) and `skipped`
counts the slots skipped so far. Restarting `blocks()` at any position yields exactly the
samples an uninterrupted run would have yielded from there; a position inside a block yields
a first block only up to the next block boundary, so later block boundaries never move.
"""

from __future__ import annotations

import logging
import math
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from manytask.data_pipeline.integrity import nonfinite_message, nonfinite_rows
from manytask.data_pipeline.manifest import FieldInfo, Manifest
from manytask.data_pipeline.shard_reader import ShardError, read_shard
from manytask.schema import ConfigError

log = logging.getLogger(__name__)


class Position(NamedTuple):
    """Where a split is: sample slot `index` of its epoch `epoch`; `skipped` corrupt slots so far."""

    epoch: int
    index: int
    skipped: int = 0


START = Position(0, 0, 0)


@dataclass
class Block:
    """Up to block_size samples of one split (one DataLoader worker).

    data:   field -> array [n, ...] (numpy in the stream; tensors after the loader's worker).
    before/after: the split's position before and after this block.
    offset: leading samples of the block already consumed before a resume and left out here.
    """

    worker: int
    before: Position
    after: Position
    offset: int
    size: int
    data: dict[str, Any]


@dataclass
class SplitPlan:
    """One split's epoch sequence: its shards and members in order, grouped into windows."""

    shards: np.ndarray  # manifest shard indices, in this split's order
    shard_first: np.ndarray  # index of each shard's first member in `sizes` (+ total at the end)
    sizes: np.ndarray  # samples per member, all members of `shards` in order
    member_start: np.ndarray  # slot offset of each member (+ total at the end)
    window_members: int  # members per window
    window_start: np.ndarray  # slot offset of each window (+ total at the end)

    @property
    def total(self) -> int:
        return int(self.member_start[-1])

    @property
    def n_windows(self) -> int:
        return len(self.window_start) - 1


def source_salt(name: str) -> int:
    """A stable per-source seed component (source order in the recipe may change)."""
    return zlib.crc32(name.encode())


class ShardStream:
    """Deterministic shuffled blocks of one source's samples for one rank's splits.

    manifest: the source's shards; rank/world_size: this process's place in the job;
    splits_per_rank: DataLoader workers per rank (0 workers = 1 split run in-process);
    seed + salt seed every permutation; shuffle_buffer: samples shuffled together (0 = keep
    the manifest order); fields: the fields to decode (default all); block_size: samples per
    block; name: used in error messages. check_finite: float input fields checked for NaN/inf
    as they are read (labels may hold NaN: "no label"); on_nonfinite: "error" (ShardError naming
    source, shard, sample key and field) or "skip" (such samples are skipped and counted).
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
        check_finite: list[str] | None = None,
        on_nonfinite: str = "error",
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
        self.check_finite = [f for f in (check_finite or []) if f in self.fields
                             and np.dtype(self.fields[f].dtype).kind == "f"]
        self.on_nonfinite = on_nonfinite
        self._nonfinite_logged = 0
        # Empty shards would only make some splits empty; they hold nothing to read.
        self.shard_ids = np.array([i for i, s in enumerate(manifest.shards) if s.samples > 0])
        self.n_splits = world_size * self.splits_per_rank
        if len(self.shard_ids) < self.n_splits:
            raise ConfigError(
                f"source '{self.name}' ({manifest.path}): {len(self.shard_ids)} non-empty shards "
                f"cannot feed {self.n_splits} readers ({world_size} ranks x "
                f"{self.splits_per_rank} DataLoader workers); every reader needs at least one "
                f"shard. Fix: lower data.num_workers or the number of processes, or re-shard "
                f"the source into >= {self.n_splits} shards (smaller samples_per_shard)."
            )
        chunk = manifest.chunk_size if manifest.layout == "chunk" else 1
        self.window_members = max(1, math.ceil(shuffle_buffer / chunk)) if shuffle_buffer > 0 else 1
        self._plans: dict[tuple[int, int], SplitPlan] = {}

    def split_id(self, worker: int) -> int:
        return self.rank * self.splits_per_rank + worker

    def plan(self, epoch: int, worker: int) -> SplitPlan:
        """The epoch sequence of this rank's split `worker` (cached for the current epoch)."""
        key = (epoch, worker)
        plan = self._plans.get(key)
        if plan is None:
            rng = np.random.default_rng([self.seed, self.salt, epoch])
            order = self.shard_ids[rng.permutation(len(self.shard_ids))]
            mine = order[self.split_id(worker) :: self.n_splits]
            per_shard = [self.manifest.shards[i].members for i in mine]
            counts = np.array([len(m) for m in per_shard], dtype=np.int64)
            sizes = np.concatenate([np.asarray(m, dtype=np.int64) for m in per_shard])
            member_start = np.concatenate([[0], np.cumsum(sizes)])
            k = self.window_members
            window_start = np.concatenate([member_start[:-1][::k], member_start[-1:]])
            plan = SplitPlan(
                mine, np.concatenate([[0], np.cumsum(counts)]), sizes, member_start, k, window_start
            )
            self._plans = {kk: v for kk, v in self._plans.items() if kk[1] != worker}
            self._plans[key] = plan
        return plan

    def epoch_size(self, epoch: int, worker: int) -> int:
        """Samples (manifest slots) in this split's epoch `epoch`."""
        return self.plan(epoch, worker).total

    def blocks(self, worker: int = 0, start: Position = START, drop: int = 0) -> Iterator[Block]:
        """Infinite blocks of split `worker` from position `start`.

        drop: samples at the start of the first block that were already consumed (they are
        left out of it and reported as its `offset`; a drop longer than that block, possible
        only after a block-size change, continues into the next). Block data are fresh
        contiguous numpy arrays [n, ...] (safe to hand to another process).
        """
        epoch, index, skipped = start
        while True:
            plan = self.plan(epoch, worker)
            if plan.total == 0:
                raise RuntimeError(f"source '{self.name}': split {worker} has no samples")
            if index >= plan.total:
                epoch, index = epoch + 1, 0
                continue
            first = int(np.searchsorted(plan.window_start, index, side="right")) - 1
            members = self._members(plan, first * plan.window_members)
            try:
                for w in range(first, plan.n_windows):
                    arrays, rows_of_slot = self._read_window(plan, w, members)
                    n_slots = int(plan.window_start[w + 1] - plan.window_start[w])
                    perm = self._window_order(epoch, worker, w, n_slots)
                    base = int(plan.window_start[w])
                    local = index - base
                    while local < n_slots:
                        end = min((local // self.block_size + 1) * self.block_size, n_slots)
                        slots = perm[local:end]
                        if rows_of_slot is None:
                            rows = slots
                        else:
                            rows = rows_of_slot[slots]
                            rows = rows[rows >= 0]
                        before = Position(epoch, index, skipped)
                        skipped += len(slots) - len(rows)
                        index = base + end
                        offset = min(drop, len(rows))  # normally the first block only
                        if offset:
                            rows, drop = rows[offset:], drop - offset
                        data = {k: v[rows] for k, v in arrays.items()}
                        yield Block(worker, before, Position(epoch, index, skipped), offset, len(rows), data)
                        local = end
            finally:
                members.close()
            epoch, index = epoch + 1, 0

    def _window_order(self, epoch: int, worker: int, window: int, n: int) -> np.ndarray:
        if self.shuffle_buffer <= 0:
            return np.arange(n)
        seq = [self.seed, self.salt, epoch, self.split_id(worker), window]
        return np.random.default_rng(seq).permutation(n)

    def _members(self, plan: SplitPlan, first: int) -> Iterator[tuple[int, dict | None, np.ndarray | None]]:
        """(samples, data or None if corrupt, bool mask of the rows to keep or None = all) for
        the split's members from index `first` on."""
        p0 = int(np.searchsorted(plan.shard_first, first, side="right")) - 1
        q = first - int(plan.shard_first[p0])
        m = self.manifest
        for p in range(p0, len(plan.shards)):
            shard = int(plan.shards[p])
            members = m.shards[shard].members
            for i, key, data in read_shard(
                m.shard_url(shard), self.fields, m.layout, members, start=q,
                skip_corrupt=self.skip_corrupt, manifest=m.path, shard=m.shards[shard],
            ):
                keep = None
                if data is not None and self.check_finite:
                    keep = self._finite_rows(data, m.shard_url(shard), key)
                yield members[i], data, keep
            q = 0

    def _finite_rows(self, data: dict, url: str, key: str | None) -> np.ndarray | None:
        """None when every checked field is finite; else the rows to keep (policy "skip") or a
        ShardError naming source, shard, sample key, row and field (policy "error")."""
        chunk = self.manifest.layout == "chunk"
        found = nonfinite_rows(data, self.check_finite, chunk)
        if found is None:
            return None
        field, bad = found
        message = nonfinite_message(self.name, url, key, field, int(np.argmax(bad)), chunk)
        if self.on_nonfinite != "skip":
            raise ShardError(message)
        if self._nonfinite_logged < 10:  # the skipped count goes on in data/<source>/skipped
            self._nonfinite_logged += 1
            log.warning("%s; skipping %d such sample(s) of that key", message.split("; fix")[0], int(bad.sum()))
        return ~bad

    def _read_window(self, plan: SplitPlan, w: int, members: Iterator) -> tuple[dict, np.ndarray | None]:
        """The window's samples as arrays [rows, ...] and, if some slots were corrupt or skipped,
        slot -> row (-1 for a skipped slot; None when every slot has its row)."""
        k = plan.window_members
        n_members = min(k, len(plan.sizes) - w * k)
        parts: list[dict] = []
        valid: list[np.ndarray] = []
        for _ in range(n_members):
            size, data, keep = next(members)
            valid.append(np.full(size, data is not None) if keep is None else keep)
            if data is not None:
                if keep is not None:
                    data = {f: (v[keep] if self.manifest.layout == "chunk" else v) for f, v in data.items()}
                    if not keep.any():
                        continue
                parts.append(data)
        arrays = stack_members(parts, self.fields, self.manifest.layout)
        if all(v.all() for v in valid):
            return arrays, None
        ok = np.concatenate(valid)
        rows = np.cumsum(ok) - 1
        rows[~ok] = -1
        return arrays, rows


def stack_members(parts: list[dict], fields: dict[str, FieldInfo], layout: str) -> dict[str, np.ndarray]:
    """Decoded members (see `read_shard`) -> field -> one array [rows, ...] (a copy)."""
    out = {}
    for name, info in fields.items():
        if not parts:
            out[name] = np.zeros((0, *info.shape), dtype=info.dtype)
        elif layout == "chunk":
            out[name] = np.concatenate([p[name] for p in parts])
        else:
            out[name] = np.asarray([p[name] for p in parts], dtype=info.dtype)
    return out
