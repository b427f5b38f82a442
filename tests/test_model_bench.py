"""bench/bench_predict.py still runs (tiny sizes, no timing asserted): `make bench` must not rot."""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import ROOT


def test_predict_benchmark_runs():
    env = dict(os.environ, WANDB_MODE="disabled")
    done = subprocess.run([sys.executable, "-m", "bench.bench_predict", "--smoke"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line.split() for line in done.stdout.splitlines() if line.strip().startswith("cpu")]
    assert [r[1] for r in rows] == ["1", "256"]  # one latency row per smoke batch size
    assert all(float(r[2]) > 0 and float(r[3]) > 0 for r in rows)
    assert "predict / training forward:" in done.stdout
