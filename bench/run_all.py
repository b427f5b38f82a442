"""`make bench`: every benchmark, one after another, each printing ratios against a baseline
measured in the same run. Run on an otherwise idle machine: the ratios are what count."""

from __future__ import annotations

import subprocess
import sys

BENCHES = ["bench.bench_streams", "bench.bench_integrity", "bench.bench_ingest", "bench.bench_sources", "bench.bench_plan", "bench.bench_models", "bench.bench_trainer", "bench.bench_weightings", "bench.bench_sampler", "bench.bench_predict", "bench.bench_gpu", "bench.bench_memory"]


def main() -> int:
    failed = []
    for module in BENCHES:
        print(f"\n=== {module} " + "=" * (70 - len(module)), flush=True)
        if subprocess.call([sys.executable, "-m", module]) != 0:
            failed.append(module)
    if failed:
        print(f"\nfailed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
