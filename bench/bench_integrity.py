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
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from manytask.data_pipeline.loader import MIN_BLOCK, SourceLoader
from manytask.data_pipeline.shard_tools import verify
from manytask.data_pipeline.shard_writer import write_shards
from manytask.data_pipeline.stream import ShardStream


def stream_rate(m, total: int, batch: int = 256) -> float:
    """Samples/s through SourceLoader (0 workers, as bench_streams), start-up excluded."""
    loader = SourceLoader(ShardStream(m, shuffle_buffer=8192, block_size=MIN_BLOCK, name="bench"))
    loader.take(batch)
    t0 = time.perf_counter()
    got = 0
    while got < total:
        got += len(loader.take(batch)["x"])
    rate = got / (time.perf_counter() - t0)
    loader.close()
    return rate


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
        ratios, rates = [], {"plain": [], "verified": []}
        for _ in range(args.repeats):  # interleaved, paired: other tenants' load hits both alike
            a = stream_rate(plain, n - 256)
            b = stream_rate(verified, n - 256)
            rates["plain"].append(a)
            rates["verified"].append(b)
            ratios.append(b / a)
        size = sum(s.bytes for s in verified.shards)
        t0 = time.perf_counter()
        _, problems = verify(tmp)
        verify_s = time.perf_counter() - t0
        assert not problems, problems
    print(f"{'chunk-layout stream':<32} {'samples/s':>12}")
    print(f"{'checksums not recorded':<32} {statistics.median(rates['plain']):>12,.0f}")
    print(f"{'verified as read (xxh3 per key)':<32} {statistics.median(rates['verified']):>12,.0f}")
    print(f"verified / unverified: median {statistics.median(ratios):.3f}x over {args.repeats} paired runs "
          f"(range {min(ratios):.3f}-{max(ratios):.3f}; goal >= 0.90)")
    print(f"shards verify: {size / 2**20:.0f} MiB in {verify_s:.2f}s = {size / 2**20 / verify_s:,.0f} MiB/s")


if __name__ == "__main__":
    main()
