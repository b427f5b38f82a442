"""Batches for the trainer: every source mixed per step, resumable exactly, at any world size.

`MultiSourceLoader(cfg, rank, world_size)`: `next_batch(counts)` takes counts[i] samples from
source i and builds a `Batch`. Where the parts live:
- sources.py: the recipe's sources checked against their manifests (once per run);
- stream.py / partition.py: each source's global order per epoch and a reader's blocks of it;
- worker_pool.py: where blocks are read (in-process with data.num_workers 0, or num_workers
  processes per rank shared by every source);
- cursor.py: how far the trainer has read each source (per rank, and job-wide);
- batch.py: the Batch and how it is built; validation.py: the validation reader.
With the pool, every source's block in hand is also kept as arrays (`HeadRows`), so a step
whose rows lie inside those blocks costs a few array operations over all sources and one
gather per field (`BatchBuilder.gather_spans`), not Python work per source.

State: `state_dict()` holds, per source, this rank's cursor (exact resume with the same world
size and workers) and the consumed part of each epoch's global order over *all* ranks
(gathered with one collective when torch.distributed runs). A state from another world size
or worker count resumes from the latter: the positions no rank has consumed are split anew
among the new readers, so the epoch continues with nothing repeated and nothing skipped.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch.distributed as dist

from manytask.config import Config
from manytask.data_pipeline.batch import Batch, BatchBuilder, Spans
from manytask.data_pipeline.cursor import Consumed, SourceCursor, consumed_of
from manytask.data_pipeline.manifest import sample_bytes
from manytask.data_pipeline.partition import WINDOW_RNGS
from manytask.data_pipeline.sources import check_sources
from manytask.data_pipeline.stream import (
    BLOCK_LAYOUTS,
    Partition,
    Position,
    ShardStream,
    source_salt,
)
from manytask.data_pipeline.worker_pool import InProcessBlocks, WorkerPool

log = logging.getLogger(__name__)
# 3: each source records its window generator (`window_rng`); states of version 2 were
# recorded with "seed_sequence" and resume with it.
# 4: each source records where its blocks end (`block_layout`); states of version 3 and
# before were recorded with "window" and resume with it.
STATE_VERSION = 4
# Samples per block a worker sends: each block costs a fixed amount of hand-over work (in the
# worker, the pipe and the trainer), so every source's blocks are MIN_BLOCK samples (or its
# share of a bigger batch) while the read-ahead budget allows: a block of every source per
# reader within READ_AHEAD_BYTES (read-ahead memory is per rank, whatever the number of
# sources); with more sources or wider samples than that holds, blocks shrink, to
# MIN_SOURCE_BLOCK at least.
MIN_BLOCK = 4096
READ_AHEAD_BYTES = 64 << 20
MIN_SOURCE_BLOCK = 1024


def default_block_size(batch_size: int, sources: int, row_bytes: int) -> int:
    """Samples per block of each source (see MIN_BLOCK): max(MIN_BLOCK, its share of a batch)
    while `sources` such blocks of samples of `row_bytes` (the widest source's) fit
    READ_AHEAD_BYTES, else what fits, at least MIN_SOURCE_BLOCK."""
    fits = READ_AHEAD_BYTES // (sources * max(1, row_bytes))
    return max(MIN_SOURCE_BLOCK, min(max(MIN_BLOCK, batch_size // sources), fits))


class HeadRows:
    """Each source's block in hand, as arrays, for the worker pool path of `next_batch`:
    `used` and `size` rows of it (size 0: none in hand), `rows` where the batch builder's
    outputs start in the pool's buffer (see BatchBuilder.block_rows). While a block is in
    hand its cursor's `used` is kept here (written back by `MultiSourceLoader._sync`)."""

    def __init__(self, sources: int, outputs: int):
        self.used = np.zeros(sources, np.int64)
        self.size = np.zeros(sources, np.int64)
        self.rows = np.full((sources, outputs), -1, np.int64)
        self.blocks = np.full(sources, None, dtype=object)  # Block or None, indexed like the arrays

    def hold(self, i: int, cursor: SourceCursor, build: BatchBuilder) -> None:
        """Take source i's block in hand from its cursor (after the cursor moved)."""
        head = cursor.head
        self.blocks[i] = head
        self.used[i] = cursor.used if head is not None else 0
        self.size[i] = head.size if head is not None else 0
        if head is not None:
            self.rows[i] = build.block_rows(i, head)


class MultiSourceLoader:
    """Batches mixed from every source of the recipe, for one rank.

    Construction checks every source's manifest against the recipe (ConfigError naming the
    source, manifest and field). Streams are seeded by (seed, source name, epoch, window);
    `seed` defaults to `cfg.run.seed`. `block_size`: samples per reader block (default
    `default_block_size`). Memory is a per-rank budget: `data.shuffle_buffer` samples of
    shuffle window in all, split evenly among the sources (each at least one chunk), so 64
    sources hold what 1 source holds, and READ_AHEAD_BYTES of blocks per reader.
    Use as a context manager or call `close()`.
    """

    def __init__(
        self, cfg: Config, rank: int = 0, world_size: int = 1, seed: int | None = None,
        block_size: int | None = None,
    ):
        self.cfg = cfg
        self.rank, self.world_size = rank, world_size
        self.sources = check_sources(cfg)
        self.names = [s.name for s in cfg.data.sources]
        self._build = BatchBuilder(cfg, self.sources)
        self.seed = cfg.run.seed if seed is None else seed
        self.num_workers = cfg.data.num_workers
        n = len(self.names)
        self.block_size = block_size or default_block_size(cfg.data.batch_size, n, max(self._row_bytes(i) for i in range(n)))
        buffer = cfg.data.shuffle_buffer
        self.shuffle_window = -(-buffer // n) if buffer > 0 else 0  # samples per source
        self._cursors = [SourceCursor(self._stream(i)) for i in range(len(self.names))]
        self._blocks: InProcessBlocks | WorkerPool | None = None
        self._heads: HeadRows | None = None

    def _row_bytes(self, i: int) -> int:
        """Bytes of one sample of source i as its blocks hold it (the fields batches need)."""
        fields = self.sources.manifests[i].fields
        return sum(sample_bytes(fields[f]) for f in self._build.fields(i))

    def _stream(self, i: int, partition: Partition | None = None, block_size: int | None = None,
                window_rng: str = WINDOW_RNGS[0], block_layout: str = BLOCK_LAYOUTS[0]) -> ShardStream:
        d, src = self.cfg.data, self.cfg.data.sources[i]
        return ShardStream(
            self.sources.manifests[i], self.rank, self.world_size, self.seed, self.shuffle_window,
            d.skip_corrupt, self._build.fields(i), splits_per_rank=self.num_workers,
            block_size=block_size or self.block_size, salt=source_salt(src.name), name=src.name,
            partition=partition,
            check_finite=list(src.inputs) if d.on_nonfinite_input != "allow" else None,
            on_nonfinite=d.on_nonfinite_input, window_rng=window_rng, block_layout=block_layout,
        )

    @property
    def cursors(self) -> list[SourceCursor]:
        """Per-source cursors (each with its `.stream`), up to date."""
        self._sync()
        return self._cursors

    loaders = cursors

    def _start(self) -> None:
        self._heads = HeadRows(len(self._cursors), len(self._build.gatherable))
        streams = [c.stream for c in self._cursors]
        starts = [c.starts() for c in self._cursors]
        if self.num_workers == 0:
            self._blocks = InProcessBlocks(streams, starts)
        else:
            # Read-ahead is a per-rank budget too: 2 blocks per source and worker, 1 beyond 8
            # sources (a source's next block then comes from the next worker, already read).
            self._blocks = WorkerPool(streams, starts, self.num_workers, prefetch=2 if len(streams) <= 8 else 1)

    def next_batch(self, counts: list[int]) -> Batch:
        """A Batch of sum(counts) samples: counts[i] from source i, sources in recipe order.

        inputs: field -> [B, ...]; labels: task -> [B, ...]; masks: task -> bool [B];
        source_id: long [B]. Every recipe task is present in labels and masks.
        """
        c = np.asarray(counts)
        if c.shape != (len(self._cursors),) or c.dtype.kind not in "iu" or (c < 0).any():
            raise ValueError(f"counts must be {len(self._cursors)} non-negative ints, got {counts}")
        if self._blocks is None:
            self._start()
        blocks = self._blocks
        if blocks.shared:
            blocks.demand = c  # paces the credits (WorkerPool.release)
        if blocks.shared and self._build.all_gatherable:
            batch = self._gather_from_pool(c.astype(np.int64, copy=False))
        else:
            counts = c.tolist()
            cursors = self._cursors
            pieces = [cursors[i].pieces(n, blocks, i) if n else [] for i, n in enumerate(counts)]
            batch = self._build.gather(pieces, counts)
            for i, c in enumerate(cursors):  # the batch holds copies: the used-up slots go back now
                if c.finished:
                    c.release(blocks, i)
        blocks.flush()
        return batch

    def _gather_from_pool(self, c: np.ndarray) -> Batch:
        """next_batch with a worker pool (c: int64 [sources], rows per source): the sources
        whose rows all lie inside their block in hand (almost all, almost always) are taken
        with a few array operations over every source at once; only a source that runs out of
        its block goes through its cursor."""
        heads, blocks, build = self._heads, self._blocks, self._build
        wanted = c > 0
        inside = heads.size - heads.used > c
        fast = np.flatnonzero(wanted & inside)
        slow = np.flatnonzero(wanted & ~inside).tolist()
        if not slow:
            spans = Spans(fast, heads.used[fast], c[fast], heads.rows[fast], heads.blocks[fast])
        else:
            # The slow sources' pieces as lists, joined to the fast spans once.
            source, lo, n, rows, held = [], [], [], [], list(heads.blocks[fast])
            for i in slow:
                cursor = self._cursors[i]
                if cursor.head is not None:
                    cursor.used = int(heads.used[i])
                for block, a, b in cursor.pieces(int(c[i]), blocks, i):
                    source.append(i)
                    lo.append(a)
                    n.append(b - a)
                    rows.append(build.block_rows(i, block))
                    held.append(block)
                heads.hold(i, cursor, build)
            source_all = np.concatenate([fast, np.array(source, np.int64)])
            order = np.argsort(source_all, kind="stable")  # the slow pieces came last: recipe order
            spans = Spans(source_all[order], np.concatenate([heads.used[fast], np.array(lo, np.int64)])[order],
                          np.concatenate([c[fast], np.array(n, np.int64)])[order],
                          np.concatenate([heads.rows[fast], np.array(rows, np.int64).reshape(len(rows), heads.rows.shape[1])])[order],
                          [held[k] for k in order.tolist()])
        heads.used[fast] += c[fast]
        batch = build.gather_spans(spans, c, blocks)
        for i in slow:  # the batch holds copies: the used-up slots go back now
            self._cursors[i].release(blocks, i)
        return batch

    def _sync(self) -> None:
        """Write the pool path's per-source counts back into the cursors."""
        heads = self._heads
        if heads is None:
            return
        for i, cursor in enumerate(self._cursors):
            if cursor.head is not None and cursor.head is heads.blocks[i]:
                cursor.used = int(heads.used[i])

    def skipped(self) -> dict[str, int]:
        """Corrupt samples skipped so far, per source."""
        return {n: c.skipped for n, c in zip(self.names, self._cursors)}

    def epochs(self) -> dict[str, int]:
        """Current (slowest reader's) epoch per source."""
        return {n: c.epoch for n, c in zip(self.names, self._cursors)}

    # ------------------------------------------------------------ state

    def consumed(self) -> dict[str, Consumed]:
        """Per source, what the whole job has consumed (one collective when distributed)."""
        self._sync()
        local = [c.progress() for c in self._cursors]
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() == self.world_size > 1:
            gathered: list[Any] = [None] * self.world_size
            dist.all_gather_object(gathered, local)
        else:
            gathered = [local]
        return {
            name: consumed_of(c.stream, [r for rank in gathered for r in rank[i]], c.skipped_base)
            for i, (name, c) in enumerate(zip(self.names, self._cursors))
        }

    def state_dict(self) -> dict[str, Any]:
        """Plain ints/lists/dicts (loads with `torch.load(weights_only=True)`). Call it on
        every rank at once when distributed (it gathers every rank's progress)."""
        consumed = self.consumed()  # (cursors synced)
        out = {}
        for name, c in zip(self.names, self._cursors):
            s, m = c.stream, c.stream.manifest
            drop = c.drop if c.head is None else c.head.offset + c.used
            drop_positions = c.drop_positions if c.head is None else c.head.positions_consumed(drop)
            out[name] = {
                "world_size": s.world_size, "readers_per_rank": s.splits_per_rank,
                "shards": len(m.shards), "samples": m.total_samples,
                "shuffle_buffer": s.shuffle_buffer, "block_size": s.block_size, "window_rng": s.window_rng,
                "block_layout": s.block_layout,
                "partition": Consumed(0, s.partition.consumed).to_state()["intervals"],
                "positions": [list(p) for p in c.positions], "next_worker": c.next,
                "drop": drop, "drop_positions": drop_positions, "skipped_base": c.skipped_base,
                "consumed": consumed[name].to_state(),
            }
        return {"version": STATE_VERSION, "sources": out}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a position: exactly (same world size, workers and data), or else by
        splitting what no rank consumed among this run's readers (see the module doc)."""
        self.close()
        saved = state.get("sources", {})
        for i, name in enumerate(self.names):
            if name not in saved:
                log.warning("source '%s' has no saved data position; it starts from the beginning", name)
                continue
            self._load_source(i, saved[name], int(state.get("version", 1)))
        extra = set(saved) - set(self.names)
        if extra:
            log.warning("saved data positions for sources %s not in the recipe are ignored", sorted(extra))

    def _load_source(self, i: int, st: dict[str, Any], version: int) -> None:
        c = self._cursors[i]
        m = c.stream.manifest
        same_data = (version >= 2 and st["shards"] == len(m.shards) and st["samples"] == m.total_samples
                     and st["shuffle_buffer"] == c.stream.shuffle_buffer)
        if not same_data:
            epoch = min(p[0] for p in st["positions"])
            log.warning(
                "source '%s': the saved data position was recorded over other data (%s shards, %s "
                "samples, shuffle_buffer %s; now %s, %s, %s) or by an older version; restarting "
                "epoch %d from its beginning.", self.names[i], st.get("shards"), st.get("samples"),
                st.get("shuffle_buffer"), len(m.shards), m.total_samples, c.stream.shuffle_buffer, epoch,
            )
            c.positions = [Position(epoch, 0, 0)] * c.readers
            c.skipped_base = int(st["skipped_base"]) + sum(int(p[2]) for p in st["positions"])
            return
        # The order the position counts in: a state without it was written before "philox".
        window_rng = st.get("window_rng", "seed_sequence")
        if window_rng not in WINDOW_RNGS:
            raise ValueError(f"source '{self.names[i]}': the saved data position has window_rng {window_rng!r}; "
                             f"this version knows {', '.join(WINDOW_RNGS)} (a checkpoint of a newer manytask?)")
        # Where blocks end: a state without it was written before "span".
        block_layout = st.get("block_layout", "window")
        if block_layout not in BLOCK_LAYOUTS:
            raise ValueError(f"source '{self.names[i]}': the saved data position has block_layout {block_layout!r}; "
                             f"this version knows {', '.join(BLOCK_LAYOUTS)} (a checkpoint of a newer manytask?)")
        same_layout = st["world_size"] == self.world_size and st["readers_per_rank"] == c.readers
        if same_layout:
            # Block boundaries decide how readers interleave: keep the saved ones.
            partition = Partition(c.stream.n_readers, Consumed.from_state({"epoch": 0, "intervals": st["partition"]}).intervals)
            new = SourceCursor(self._stream(i, partition, int(st["block_size"]), window_rng, block_layout))
            new.positions = [Position(*p) for p in st["positions"]]
            new.next, new.drop = int(st["next_worker"]), int(st["drop"])
            new.drop_positions = int(st.get("drop_positions", new.drop))
            new.skipped_base = int(st["skipped_base"])
            self._cursors[i] = new
            return
        done = Consumed.from_state(st["consumed"])
        log.info(
            "source '%s': resuming epoch %d, recorded by %s ranks x %s readers, with %s x %s: "
            "the positions not yet consumed are split among the new readers",
            self.names[i], done.epoch, st["world_size"], st["readers_per_rank"], self.world_size, c.readers,
        )
        # A state of the "window" layout was written when the block size was a different
        # function of the recipe: keep its size too, so the old run's order is kept.
        block_size = int(st["block_size"]) if block_layout == "window" else None
        new = SourceCursor(self._stream(i, Partition(c.stream.n_readers, done.intervals), block_size, window_rng,
                                        block_layout))
        new.positions = [Position(done.epoch, 0, 0)] * new.readers
        # The job-wide count, kept by every rank alike (so it is not summed over ranks).
        new.skipped_base = done.skipped if self.rank == 0 else 0
        self._cursors[i] = new

    def close(self) -> None:
        """Stop the workers and forget prefetched blocks (the position is kept)."""
        self._sync()
        self._heads = None
        for c in self._cursors:
            c.detach()
        if self._blocks is not None:
            self._blocks.close()
            self._blocks = None

    def __enter__(self) -> MultiSourceLoader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
