"""64 sources vs 1 source, the same total data, one rank with the shared worker pool.

    .venv/bin/python -m bench.bench_sources [--samples N] [--workers W] [--repeats R]

Writes N samples (x float32 [32], y float32, label int64) once as 1 source and once as 64
sources of N/64 samples (each written with `write_shards`' defaults: one shard), then, for each
layout in a fresh process (so memory is its own), builds a `MultiSourceLoader` with
`data.num_workers = W` and takes batches of 1024 spread evenly over the sources, measuring
- time to first step: from starting the rank's process (interpreter, imports) to its first
  batch, as a user waits for it; and the loader's part of it alone (construction + first
  batch: 64 sources read 64 first windows where 1 source reads one);
- memory per rank: proportional set size (PSS; shared pages split between the processes that
  map them) of the training process plus its workers, after the steady phase;
- the samples per block of each source (loader.default_block_size);
- steady samples/s over the following batches, and the CPU time per sample of the training
  process and its workers together over them (the steady rate where the rank has its cores to
  itself; on a shared machine the wall rate depends on the others' load more than on ours).
Prints the 64-source / 1-source ratios (goals: first step <= 2x, memory <= 1.5x, samples/s >= 0.8x),
the median over repetitions, the two layouts interleaved.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

BATCH = 1024


def write(root: Path, n: int, sources: int) -> list[str]:
    from manytask.data_pipeline.shard_writer import write_shards

    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, 32)).astype(np.float32)
    y = x[:, 0].copy()
    label = rng.integers(0, 10, n)
    out = []
    per = n // sources
    for s in range(sources):
        d = root / f"{sources}" / f"s{s}"
        sl = slice(s * per, (s + 1) * per)
        write_shards(d, {"x": x[sl], "y": y[sl], "label": label[sl]})
        out.append(str(d))
    return out


def pss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system) used so far by process `pid`."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(dirs: list[str], workers: int, seconds: float, launched: float) -> dict:
    """Run in a fresh process: time to first step, steady samples/s, PSS of rank + workers."""
    import torch

    from manytask.config import config_from_dict
    from manytask.data_pipeline.loader import MultiSourceLoader

    torch.set_num_threads(1)
    cfg = config_from_dict({
        "data": {"batch_size": BATCH, "num_workers": workers, "shuffle_buffer": 8192,
                 "sources": [{"name": f"s{i}", "train": d, "inputs": ["x"], "labels": {"t": "y", "c": "label"}}
                             for i, d in enumerate(dirs)]},
        "tasks": {"t": {"type": "regression"}, "c": {"type": "multiclass"}},
    })
    k = len(dirs)
    counts = [BATCH // k + (1 if i < BATCH % k else 0) for i in range(k)]
    t0 = time.perf_counter()
    loader = MultiSourceLoader(cfg)
    loader.next_batch(counts)
    first = time.perf_counter() - t0
    since_launch = time.time() - launched
    pids = [os.getpid()] + [p.pid for p in getattr(loader._blocks, "_procs", [])]
    cpu0 = sum(cpu_s(p) for p in pids)
    t0, steps = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        loader.next_batch(counts)
        steps += 1
    rate = steps * BATCH / (time.perf_counter() - t0)
    cpu_ns = (sum(cpu_s(p) for p in pids) - cpu0) / (steps * BATCH) * 1e9
    memory = sum(pss_kib(p) for p in pids) / 1024
    loader.close()
    return {"first_step_s": since_launch, "loader_first_s": first, "samples_per_s": rate, "pss_mib": memory,
            "processes": len(pids), "cpu_ns": cpu_ns, "block": loader.block_size}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, default=640_000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--measure", help=argparse.SUPPRESS)  # internal: json list of dirs
    ap.add_argument("--launched", type=float, default=0.0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        print(json.dumps(measure(json.loads(args.measure), args.workers, args.seconds, args.launched)))
        return
    load_before = os.getloadavg()  # printed with the figures: wall-clock ratios swing with it
    with tempfile.TemporaryDirectory() as tmp:
        layouts = {k: write(Path(tmp), args.samples, k) for k in (1, 64)}
        results: dict[int, list[dict]] = {1: [], 64: []}
        for _ in range(args.repeats):
            for k, dirs in layouts.items():
                cmd = [sys.executable, "-m", "bench.bench_sources", "--measure", json.dumps(dirs),
                       "--workers", str(args.workers), "--seconds", str(args.seconds), "--launched", repr(time.time())]
                out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
                results[k].append(json.loads(out.stdout.strip().splitlines()[-1]))
    med = {k: {m: statistics.median(r[m] for r in rs) for m in rs[0]} for k, rs in results.items()}
    print(f"{args.samples:,} samples, {args.workers} workers per rank, batch {BATCH} spread evenly; median of {args.repeats}; "
          f"load average {load_before[0]:.1f} before, {os.getloadavg()[0]:.1f} after")
    print(f"{'sources':>7} {'first step':>11} {'(loader)':>9} {'samples/s':>12} {'CPU ns/sample':>14} "
          f"{'PSS rank+workers':>17} {'processes':>9} {'block':>6}")
    for k in (1, 64):
        m = med[k]
        print(f"{k:>7} {m['first_step_s']:>10.2f}s {m['loader_first_s']:>8.2f}s {m['samples_per_s']:>12,.0f} "
              f"{m['cpu_ns']:>14,.0f} {m['pss_mib']:>13.0f} MiB {int(m['processes']):>9} {int(m['block']):>6}")
    r = {m: med[64][m] / med[1][m] for m in med[1]}
    print(f"64 / 1 sources: first step {r['first_step_s']:.2f}x (goal <= 2x; loader alone {r['loader_first_s']:.1f}x), "
          f"memory {r['pss_mib']:.2f}x (goal <= 1.5x), samples/s {r['samples_per_s']:.2f}x (goal >= 0.8x); "
          f"CPU per sample {1 / r['cpu_ns']:.2f}x as efficient (samples/s on a machine to itself)")


if __name__ == "__main__":
    main()
