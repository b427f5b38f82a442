"""Stream throughput vs a plain reader of the same shards, per layout and worker count.

    .venv/bin/python -m bench.bench_streams [--samples-chunk N] [--samples-sample N]

Writes a temporary dataset in both layouts (x float32 [32], y float32, label int64), then
measures samples/s of
- `plain`: tarfile stream mode + `np.frombuffer` over every member (the `.npy` header parsed
  once per distinct header, `.cls` with `int()`), no grouping, shuffling or batching — the
  floor any reader of these bytes pays;
- `stream`: a `SourceCursor` over a `ShardStream` (shuffle_buffer 8192, blocks of 4096 as in
  MultiSourceLoader, `take(256)`), read in-process (0 workers) or by the rank's worker pool
  (2 workers; blocks handed over in shared memory), start-up excluded.
and prints the ratio stream / plain of the same layout (goal: >= 0.7), in wall-clock samples/s
and in CPU time per sample summed over the reading processes (the reader's cost whatever
else runs on the machine; with W workers on W free cores the wall rate approaches W / CPU).
Start-up (the workers' fork, every reader's first window) is left out of both: the clock
starts once every reader has handed over a block.
"""

from __future__ import annotations

import argparse
import os
import resource
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from manytask.data_pipeline.cursor import SourceCursor
from manytask.data_pipeline.loader import MIN_BLOCK
from manytask.data_pipeline.manifest import Manifest
from manytask.data_pipeline.shard_reader import NpyDecoder, split_member_name
from manytask.data_pipeline.shard_writer import write_shards
from manytask.data_pipeline.stream import ShardStream
from manytask.data_pipeline.worker_pool import InProcessBlocks, WorkerPool


def make_data(root: Path, n: int, layout: str, shards: int) -> Manifest:
    rng = np.random.default_rng(0)
    arrays = {
        "x": rng.standard_normal((n, 32)).astype(np.float32),
        "y": rng.standard_normal(n).astype(np.float32),
        "label": rng.integers(0, 10, n),
    }
    return write_shards(root / layout, arrays, samples_per_shard=-(-n // shards), chunk_size=1024, layout=layout)


def plain_reader(m: Manifest) -> int:
    """Samples read by the plain reader (one pass over every shard)."""
    npy = NpyDecoder()
    samples = 0
    for i in range(len(m.shards)):
        with tarfile.open(m.shard_url(i), mode="r|") as tar:
            for info in tar:
                buf = tar.extractfile(info).read()
                suffix = split_member_name(info.name)[1]
                if suffix.endswith(".npy"):
                    arr = npy(buf)
                    if suffix == "x.npy":
                        samples += arr.shape[0] if m.layout == "chunk" else 1
                else:
                    int(buf)
    return samples


def cpu_seconds(pids: list[int] = ()) -> float:
    """CPU time of this process and of the live processes `pids` (the workers)."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    total = me.ru_utime + me.ru_stime
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
    return total


def stream_reader(m: Manifest, workers: int, total: int, batch: int = 256) -> tuple[int, float, float]:
    """(samples, seconds, CPU seconds of all processes) for `total` samples through a
    SourceCursor, start-up excluded: the clock starts once every reader has handed over its
    first block (the workers' fork and first windows are a one-off, not a rate)."""
    stream = ShardStream(m, shuffle_buffer=8192, splits_per_rank=workers, block_size=MIN_BLOCK, name="bench")
    cursor = SourceCursor(stream)
    starts = [cursor.starts()]
    blocks = InProcessBlocks([stream], starts) if workers == 0 else WorkerPool([stream], starts, workers)
    pids = [p.pid for p in getattr(blocks, "_procs", [])]
    warm = 0
    while warm < MIN_BLOCK * max(1, workers):  # a block from every reader
        warm += len(cursor.take(batch, blocks, 0)["x"])
    cpu0, t0 = cpu_seconds(pids), time.perf_counter()
    got = 0
    while got < total:
        got += len(cursor.take(batch, blocks, 0)["x"])
    seconds = time.perf_counter() - t0
    cpu = cpu_seconds(pids) - cpu0
    blocks.close()
    return got, seconds, cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples-chunk", type=int, default=400_000)
    ap.add_argument("--samples-sample", type=int, default=6_000)
    ap.add_argument("--repeats", type=int, default=3, help="best of N, readers interleaved")
    args = ap.parse_args()
    torch.set_num_threads(1)
    load_before = os.getloadavg()[0]  # printed with the figures: wall-clock ratios swing with it
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for layout, n in (("chunk", args.samples_chunk), ("sample", args.samples_sample)):
            t0 = time.perf_counter()
            m = make_data(Path(tmp), n, layout, shards=8)
            write_s = time.perf_counter() - t0
            best = {"plain": 0.0, 0: 0.0, 2: 0.0}
            cpu = {"plain": float("inf"), 0: float("inf"), 2: float("inf")}  # ns per sample
            for _ in range(args.repeats):  # interleaved, so load from other jobs hits all alike
                t0, c0 = time.perf_counter(), cpu_seconds()
                got = plain_reader(m)
                best["plain"] = max(best["plain"], got / (time.perf_counter() - t0))
                cpu["plain"] = min(cpu["plain"], (cpu_seconds() - c0) / got * 1e9)
                for workers in (0, 2):
                    got, seconds, cpu_s = stream_reader(m, workers, n)
                    best[workers] = max(best[workers], got / seconds)
                    cpu[workers] = min(cpu[workers], cpu_s / got * 1e9)
            rows.append((layout, "plain reader", "-", best["plain"], 1.0, cpu["plain"], 1.0, write_s))
            for workers in (0, 2):
                rows.append((layout, "ShardStream", workers, best[workers], best[workers] / best["plain"],
                             cpu[workers], cpu["plain"] / cpu[workers], None))
    print(f"{'layout':<8} {'reader':<13} {'workers':>7} {'samples/s':>12} {'vs plain':>9} {'CPU ns/sample':>14} {'vs plain':>9}")
    for layout, reader, workers, rate, ratio, ns, cpu_ratio, _ in rows:
        print(f"{layout:<8} {reader:<13} {workers!s:>7} {rate:>12,.0f} {ratio:>8.2f}x {ns:>14,.0f} {cpu_ratio:>8.2f}x")
    print("(write time: " + ", ".join(f"{r[0]} {r[7]:.1f}s" for r in rows if r[7] is not None)
          + f"; load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after)")


if __name__ == "__main__":
    main()
