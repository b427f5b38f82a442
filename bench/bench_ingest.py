"""Table ingestion: `manytask shards write` on a generated Parquet table with string, list and
numeric columns, against pyarrow reading the same file, in the same run; peak memory of the
conversion for that table and one `--scale` times as large.

    .venv/bin/python -m bench.bench_ingest [--rows 5000000] [--scale 4] [--pairs 5] [--smoke]

The table: city (string, Zipf over 2,000 values), device (string, 5 values), genres
(list<string>, 0-4 of 8), user_id (string, 1M values), age (float, 5 % missing), income (float),
y (float label), click (int label). The conversion fits vocabularies and statistics on the
training split (pass 1), then encodes and writes shards with checksums (pass 2): specs
`city:cat device:cat genres:multi:k=4 user=user_id:hash=1048576 age:num:fill=mean
income:num:log`, targets `y click`.

Each measurement runs in a fresh child process, which reports its own peak RSS
(`resource.getrusage(RUSAGE_SELF).ru_maxrss`), so one measurement's memory never counts in
another's. Goals: conversion rows/s >= 0.4x pyarrow's read rate of the same file; peak RSS of
the large table within 1.2x of the small one's (memory bounded by the record batch).

On a shared machine one pair of runs swings by 2x, so the small table is read and converted
`--pairs` times, interleaved (read, convert, read, convert, ...: other tenants' load hits both
alike), and the ratio reported is the median of the pairs' ratios, with their range. Each pair
also converts once more with the numpy code in place of the compiled loops
(data_pipeline/encode_kernels.c; MANYTASK_NO_COMPILED_KERNELS=1), against the same read.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

FEATURES = ["city:cat", "device:cat", "genres:multi:k=4", "user=user_id:hash=1048576",
            "age:num:fill=mean", "income:num:log"]
TARGETS = ["y", "click"]


def generate(path: Path, rows: int, seed: int = 0, group: int = 250_000) -> None:
    """Write the benchmark table as Parquet, `group` rows at a time (bounded memory)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    cities = pa.array([f"city_{i:04d}" for i in range(2000)])
    devices = pa.array(["ios", "android", "web", "tv", "other"])
    genres = pa.array(["Action", "Comedy", "Drama", "Horror", "Romance", "SciFi", "Docu", "Kids"])
    writer = None
    for lo in range(0, rows, group):
        m = min(group, rows - lo)
        offsets = np.r_[0, np.cumsum(rng.integers(0, 5, m))].astype(np.int32)
        age = rng.normal(40, 12, m)
        age[rng.random(m) < 0.05] = np.nan
        users = pa.array(rng.integers(0, 10**6, m)).cast(pa.string())
        table = pa.table({
            "city": cities.take(pa.array(np.minimum(rng.zipf(1.3, m) - 1, 1999))),
            "device": devices.take(pa.array(rng.integers(0, 5, m))),
            "genres": pa.ListArray.from_arrays(pa.array(offsets), genres.take(pa.array(rng.integers(0, 8, offsets[-1])))),
            "user_id": pc.binary_join_element_wise("u", users, ""),
            "age": pa.array(age, from_pandas=True), "income": rng.lognormal(10, 1, m),
            "y": rng.normal(size=m).astype(np.float32), "click": rng.integers(0, 2, m),
        })
        if writer is None:
            writer = pq.ParquetWriter(path, table.schema)
        writer.write_table(table)
    writer.close()


def child(mode: str, path: str, out: str) -> None:
    """One measurement in this (fresh) process; prints {rows, seconds, rss_mib} as JSON."""
    import pyarrow.dataset as ds
    import pyarrow.parquet as pq

    if mode == "convert":  # (it imports webdataset, and so torch: only where it is needed)
        from manytask.data_pipeline.table_to_shards import convert_table

        # The last conversion's shards go just before this one starts, untimed (--force would
        # remove them, timed). Not earlier: this VM gives memory that has been free for a
        # second or two back to its host, and writing 208 MB of new shards into such memory
        # cost 0.55-0.64 s of kernel time against 0.05 s into memory freed just before
        # (measured with plain file writes); a machine that keeps its free memory pays 0.05 s.
        shutil.rmtree(out, ignore_errors=True)
    t0, cpu0 = time.perf_counter(), time.process_time()
    rows = 0
    if mode == "read":  # how shards write reads: row group by row group, no pre-buffering
        with pq.ParquetFile(path, pre_buffer=False) as f:
            for batch in f.iter_batches(batch_size=131_072):
                rows += batch.num_rows
    elif mode == "read-default":  # pyarrow.dataset with its defaults
        for batch in ds.dataset(path, format="parquet").to_batches(batch_size=131_072):
            rows += batch.num_rows
    else:
        manifests = convert_table(path, out, FEATURES, TARGETS, samples_per_shard=500_000)
        rows = sum(m.total_samples for m in manifests.values())
    seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"rows": rows, "seconds": seconds, "cpu_seconds": cpu, "rss_mib": rss}))


def measure(mode: str, path: Path, out: Path, compiled: bool = True) -> dict:
    """One measurement in a child process (a conversion writes into `out`)."""
    env = dict(os.environ) if compiled else dict(os.environ, MANYTASK_NO_COMPILED_KERNELS="1")
    done = subprocess.run([sys.executable, "-m", "bench.bench_ingest", "--child", mode, str(path), str(out)],
                          capture_output=True, text=True, check=True, env=env)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=5_000_000)
    ap.add_argument("--scale", type=int, default=4, help="the large table has rows x scale rows")
    ap.add_argument("--pairs", type=int, default=5, help="interleaved read/convert pairs (median ratio)")
    ap.add_argument("--smoke", action="store_true", help="tiny tables (tests)")
    ap.add_argument("--child", nargs=3, metavar=("MODE", "PATH", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(*args.child)
        return
    rows = 20_000 if args.smoke else args.rows
    from manytask.data_pipeline.compiled_kernels import library

    compiled = library() is not None
    with tempfile.TemporaryDirectory() as tmp:
        small, large = Path(tmp, "small.parquet"), Path(tmp, "large.parquet")
        t0 = time.perf_counter()
        generate(small, rows)
        generate(large, rows * args.scale, seed=1)
        gen_s = time.perf_counter() - t0
        # interleaved read / convert of the small table: load from other jobs hits both alike
        pairs, numpy_only = [], []
        for _ in range(max(args.pairs, 1)):
            pairs.append((measure("read", small, Path(tmp, "out")), measure("convert", small, Path(tmp, "out"))))
            if compiled:  # the same conversion with the numpy code in place of the compiled loops
                numpy_only.append(pairs[-1][0]["seconds"] / measure("convert", small, Path(tmp, "out"), False)["seconds"])
        default = measure("read-default", small, Path(tmp, "out"))
        big = measure("convert", large, Path(tmp, "out"))
    ratios = [r["seconds"] / c["seconds"] for r, c in pairs]
    read, conv = pairs[ratios.index(sorted(ratios)[len(ratios) // 2])]  # the median pair
    cpu_ratios = sorted(r["cpu_seconds"] / c["cpu_seconds"] for r, c in pairs)
    rate = conv["rows"] / conv["seconds"]
    base = read["rows"] / read["seconds"]
    print(f"{'measurement':<40} {'rows':>11} {'rows/s':>11} {'peak RSS MiB':>13}")
    print(f"{'pyarrow reads the Parquet file':<40} {read['rows']:>11,} {base:>11,.0f} {read['rss_mib']:>13,.0f}")
    print(f"{'  pyarrow.dataset, default options':<40} {default['rows']:>11,} "
          f"{default['rows'] / default['seconds']:>11,.0f} {default['rss_mib']:>13,.0f}")
    print(f"{'shards write (2 passes, checksums)':<40} {conv['rows']:>11,} {rate:>11,.0f} {conv['rss_mib']:>13,.0f}")
    print(f"{f'shards write, table x{args.scale}':<40} {big['rows']:>11,} {big['rows'] / big['seconds']:>11,.0f} "
          f"{big['rss_mib']:>13,.0f}")
    print(f"conversion / pyarrow read: {rate / base:.2f}x, median of {len(pairs)} pairs "
          f"({min(ratios):.2f}-{max(ratios):.2f}x) (goal >= 0.4x; {rate / (default['rows'] / default['seconds']):.2f}x "
          f"of pyarrow's default read); peak RSS x{args.scale} table / "
          f"table: {big['rss_mib'] / conv['rss_mib']:.2f}x (goal <= 1.2x); tables generated in {gen_s:.0f}s")
    if compiled:
        numpy_only.sort()
        print(f"  with numpy in place of the compiled loops (encode_kernels.c): "
              f"{numpy_only[len(numpy_only) // 2]:.2f}x ({numpy_only[0]:.2f}-{numpy_only[-1]:.2f}x)")
    else:
        print("  (the compiled loops are off or not built: the conversion ran its numpy code; "
              "pip install -e . builds them)")
    # CPU seconds count only each process's own work (reading threads included): on a shared
    # machine they move less with other tenants' load than the wall-clock rates above.
    print(f"per CPU second: conversion / pyarrow read: {cpu_ratios[len(cpu_ratios) // 2]:.2f}x "
          f"({min(cpu_ratios):.2f}-{max(cpu_ratios):.2f}x; median pair {conv['cpu_seconds']:.1f} vs "
          f"{read['cpu_seconds']:.1f} CPU s); load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
