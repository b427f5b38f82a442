"""What verifying shards costs: the chunk-layout stream with the manifest's checksums checked as
it reads (per-key xxh3 + size at open) vs the same stream over the same shards with the
checksums left out of the manifest, in the same run.

    .venv/bin/python -m bench.bench_integrity [--samples N] [--repeats R]

Goal: verification costs <= 10 % of the stream rate (ratio >= 0.90). Also prints the rate of
`manytask shards verify` (whole-file + per-key xxh3) in MB/s.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from manytask.data_pipeline.cursor import SourceCursor
from manytask.data_pipeline.loader import MIN_BLOCK
from manytask.data_pipeline.shard_tools import verify
from manytask.data_pipeline.shard_writer import write_shards
from manytask.data_pipeline.stream import ShardStream
from manytask.data_pipeline.worker_pool import InProcessBlocks


def stream_rate(m, total: int, batch: int = 256) -> tuple[float, float]:
    """(samples per second, samples per CPU second) through a SourceCursor reading in this
    process (0 workers, as bench_streams), start-up excluded. The CPU-time rate counts only
    this process's work, so it moves less with other tenants' load than the wall-clock one."""
    stream = ShardStream(m, shuffle_buffer=8192, block_size=MIN_BLOCK, name="bench")
    cursor = SourceCursor(stream)
    blocks = InProcessBlocks([stream], [cursor.starts()])
    cursor.take(batch, blocks, 0)
    t0, cpu0 = time.perf_counter(), time.process_time()
    got = 0
    while got < total:
        got += len(cursor.take(batch, blocks, 0)["x"])
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    blocks.close()
    return got / wall, got / cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, default=1_000_000)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        rng = np.random.default_rng(0)
        n = args.samples
        arrays = {"x": rng.standard_normal((n, 32)).astype(np.float32),
                  "y": rng.standard_normal(n).astype(np.float32), "label": rng.integers(0, 10, n)}
        verified = write_shards(Path(tmp), arrays, samples_per_shard=-(-n // 8), chunk_size=1024)
        verified.path = str(Path(tmp) / "manifest.json")
        plain = copy.deepcopy(verified)
        for s in plain.shards:
            s.bytes, s.xxh3, s.member_xxh3 = 0, "", []
        ratios, cpu_ratios, rates = [], [], {"plain": [], "verified": [], "plain_cpu": [], "verified_cpu": []}
        for r in range(args.repeats):  # interleaved, paired: other tenants' load hits both alike
            order = ("plain", "verified") if r % 2 == 0 else ("verified", "plain")  # neither always first
            got = {name: stream_rate(plain if name == "plain" else verified, n - 256) for name in order}
            rates["plain"].append(got["plain"][0])
            rates["verified"].append(got["verified"][0])
            rates["plain_cpu"].append(got["plain"][1])
            rates["verified_cpu"].append(got["verified"][1])
            ratios.append(got["verified"][0] / got["plain"][0])
            cpu_ratios.append(got["verified"][1] / got["plain"][1])
        size = sum(s.bytes for s in verified.shards)
        t0 = time.perf_counter()
        _, problems = verify(tmp)
        verify_s = time.perf_counter() - t0
        assert not problems, problems
    print(f"{'chunk-layout stream':<32} {'samples/s':>12}")
    print(f"{'checksums not recorded':<32} {statistics.median(rates['plain']):>12,.0f}")
    print(f"{'verified as read (xxh3 per key)':<32} {statistics.median(rates['verified']):>12,.0f}")
    print(f"verified / unverified: median {statistics.median(ratios):.3f}x over {args.repeats} paired runs "
          f"(range {min(ratios):.3f}-{max(ratios):.3f}; goal >= 0.90); per CPU second: median "
          f"{statistics.median(cpu_ratios):.3f}x (range {min(cpu_ratios):.3f}-{max(cpu_ratios):.3f}); best "
          f"run / best run: {max(rates['verified']) / max(rates['plain']):.3f}x, per CPU second "
          f"{max(rates['verified_cpu']) / max(rates['plain_cpu']):.3f}x; "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"shards verify: {size / 2**20:.0f} MiB in {verify_s:.2f}s = {size / 2**20 / verify_s:,.0f} MiB/s")


if __name__ == "__main__":
    main()
