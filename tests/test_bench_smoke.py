"""The benchmarks still run (tiny sizes, no timing asserted): `make bench` must not rot between
the runs whose figures the README quotes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str) -> str:
    done = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_model_benchmark_runs_on_the_cpu_path_a_gpu_would_take():
    out = run("bench.bench_models", "--device", "cpu", "--smoke")
    rows = [line.split() for line in out.splitlines() if line.strip()[:2] in ("4 ", "8 ", "16")]
    assert [r[0] for r in rows] == ["4", "8", "16", "8"]  # the last at DeepCTR-Torch's sizes
    for r in rows:
        looped, batched, ratio = float(r[1]), float(r[2]), float(r[3].rstrip("x"))
        # the ratio is a median of per-repetition ratios and the times are medians, so at these
        # millisecond sizes one slow repetition can pull them apart: only their sanity is checked
        assert looped > 0 and batched > 0 and 0 < ratio < float("inf")
    assert out.count("T=64:") == 2  # one task-scaling row per smoke size


def test_gpu_benchmark_measures_on_cpu_when_asked():
    out = run("bench.bench_gpu", "--cpu")
    assert "| 256 | fp32 |" in out and "| 1024 | fp32 |" in out


def test_data_benchmarks_run():
    out = run("bench.bench_sources", "--samples", "64000", "--repeats", "1", "--seconds", "0.3")
    assert "64 / 1 sources: first step" in out and "memory" in out
    out = run("bench.bench_plan", "--sources", "10", "--shards-per-source", "10")
    assert "growth 8 -> 8,192 readers" in out
def test_integrity_benchmark_runs_at_smoke_size():
    out = run("bench.bench_integrity", "--samples", "20000", "--repeats", "1")
    assert "verified / unverified: median" in out and "per CPU second" in out and "shards verify:" in out


def test_ingest_benchmark_runs_at_smoke_size():
    out = run("bench.bench_ingest", "--smoke")
    assert "conversion / pyarrow read:" in out and "peak RSS x4 table" in out
    if os.environ.get("MANYTASK_REQUIRE_COMPILED_KERNELS") == "1":  # (make test: the install built them)
        assert "with numpy in place of the compiled loops" in out


def test_memory_benchmark_runs_ddp_and_zero3_on_real_ranks():
    out = run("bench.bench_memory", "--smoke", "--engines", "ddp,zero3")
    rows = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| ") and "MiB" not in line}
    assert set(rows) == {"ddp", "zero3"}
    assert rows["ddp"].split("|")[3].strip() == "1.00"  # DDP is the baseline of its own run


def test_weightings_benchmark_runs_at_smoke_size():
    out = run("bench.bench_weightings", "--smoke")
    from manytask.trainer.weightings import WEIGHTINGS

    rows = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| ") and "x |" in line}
    assert set(rows) == {*WEIGHTINGS, "equal + T backward"}
    cells = {name: [c.strip() for c in line.split("|")[2:5]] for name, line in rows.items()}
    assert cells["equal"][0] == cells["equal"][2] == "1.00x"  # the baseline is itself, for time and memory
    assert cells["equal + T backward"][1] == "1.00x"  # the reference is itself in "time / reference"
    assert "T=2 (equal step" in out
