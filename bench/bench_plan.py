"""The read plan at scale, on paper: 1,000 sources, 100,000 shards, up to 1,024 ranks x 8 workers.

    .venv/bin/python -m bench.bench_plan [--sources N] [--shards-per-source N]

Builds in-memory manifests (chunk layout, 100-2,000 samples per shard) and prints, for 8 to
8,192 readers:
- `all readers`: the whole job's plan for one epoch (every reader's slice and shard range of
  every source, `partition.plan_readers`), time and peak memory (tracemalloc);
- `one reader`: what one rank's worker computes for itself at start (its slice of every source
  with `reader_part` and the shards it opens), time and peak memory.
The epoch order of a source costs O(shards) and is the same for every reader count; a reader's
own slice costs O(log shards), so the one-reader figures stay flat as readers grow.
"""

from __future__ import annotations

import argparse
import time
import tracemalloc

import numpy as np

from manytask.data_pipeline.manifest import FieldInfo, Manifest, ShardInfo
from manytask.data_pipeline.partition import EpochOrder, SourceLayout, plan_readers, reader_part


def manifests(sources: int, shards: int, chunk: int = 1024) -> list[Manifest]:
    rng = np.random.default_rng(0)
    out = []
    for _ in range(sources):
        sizes = rng.integers(100, 2000, shards)
        infos = [ShardInfo(f"s{i}.tar", int(s), [chunk] * (int(s) // chunk) + ([int(s) % chunk] if s % chunk else []))
                 for i, s in enumerate(sizes)]
        out.append(Manifest("chunk", chunk, {"x": FieldInfo("float32", (4,))}, infos))
    return out


def timed(fn) -> tuple[float, float]:
    """(seconds, peak MiB allocated while running fn)."""
    tracemalloc.start()
    t0 = time.perf_counter()
    fn()
    seconds = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    return seconds, peak


def plan_everyone(epoch: list[EpochOrder], readers: int, opened: list[float]) -> None:
    """Every reader's slice and shard range of every source; mean shards per reader to `opened`."""
    for order in epoch:
        plan = plan_readers(order, readers)
        opened.append(float(np.mean(plan.last_shard - plan.first_shard + 1)))


def plan_one(epoch: list[EpochOrder], readers: int) -> None:
    """What the last reader computes for itself: its slice and shards of every source."""
    for order in epoch:
        part = reader_part([(0, order.total)], readers, readers - 1)
        order.shards_of(part)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sources", type=int, default=1000)
    ap.add_argument("--shards-per-source", type=int, default=100)
    args = ap.parse_args()
    t0 = time.perf_counter()
    ms = manifests(args.sources, args.shards_per_source)
    layouts = [SourceLayout.of(m, 8192) for m in ms]
    print(f"{args.sources:,} sources, {args.sources * args.shards_per_source:,} shards, "
          f"{sum(m.total_samples for m in ms):,} samples (manifests built in {time.perf_counter() - t0:.1f}s)")

    def orders() -> list[EpochOrder]:
        return [EpochOrder(layout, 1, s, 0) for s, layout in enumerate(layouts)]

    sec, mib = timed(orders)
    print(f"epoch orders of every source: {sec * 1e3:.0f} ms, peak {mib:.1f} MiB (the same for any number of readers)")
    epoch = orders()
    print(f"{'readers':>8} {'all readers':>12} {'peak MiB':>9} {'one reader':>11} {'peak MiB':>9} {'shards/reader':>14}")
    base = None
    for readers in (8, 64, 512, 4096, 8192):
        opened: list[float] = []
        all_s, all_mib = timed(lambda n=readers, out=opened: plan_everyone(epoch, n, out))
        one_s, one_mib = timed(lambda n=readers: plan_one(epoch, n))
        base = base or (all_s, one_s)
        print(f"{readers:>8,} {all_s * 1e3:>9.0f} ms {all_mib:>9.1f} {one_s * 1e3:>8.1f} ms {one_mib:>9.2f} {np.mean(opened):>14.1f}")
    print(f"growth 8 -> 8,192 readers: all readers {all_s / base[0]:.1f}x (linear in readers would be 1024x), "
          f"one reader {one_s / base[1]:.2f}x")


if __name__ == "__main__":
    main()
