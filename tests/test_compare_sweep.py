"""`manytask compare --weightings ... --seeds N`: the weighting sweep on a tiny demo recipe, its
table checked against the runs' own metrics; bad weighting names named."""

from __future__ import annotations

import csv
import json
import statistics

import pytest
from conftest import write_recipe

from manytask.launch.cli import main
from manytask.schema import ConfigError
from manytask.trainer.compare import CompareRow
from manytask.trainer.sweep import format_sweep, parse_weightings, static_grid


def test_weighting_list_always_has_equal_and_rlw_and_names_typos():
    assert parse_weightings("famo,cagrad") == ["equal", "rlw", "famo", "cagrad"]
    assert "nash_mtl" in parse_weightings("all")
    with pytest.raises(ConfigError, match=r"did you mean 'famo'"):
        parse_weightings("fam0")
    assert static_grid(["a", "b"]) == [{"a": 1.0, "b": 1.0}, {"a": 2.0, "b": 1.0}, {"a": 1.0, "b": 2.0}]


def test_sweep_table_is_mean_and_std_over_seeds_best_first():
    def rows(a: float, b: float) -> list[CompareRow]:  # single-task mse 1.0 and auc 0.5
        return [CompareRow("r", "mse", 1.0, a, True), CompareRow("c", "auc", 0.5, b, False)]

    # Δm per seed: famo (+10 + 10)/2 = +10 and (+20 + 0)/2 = +10; equal -2.5 and +2.5.
    results = {"equal": [rows(1.05, 0.5), rows(0.95, 0.5)], "famo": [rows(0.9, 0.55), rows(0.8, 0.5)]}
    table = format_sweep(results, ["r", "c"], {"r": 1.0, "c": 2.0}).splitlines()
    assert table[2] == "| single-task | 1.0000 ± 0.0000 | 0.5000 ± 0.0000 | 0 |"
    assert table[3] == f"| famo | 0.8500 ± {statistics.stdev([0.9, 0.8]):.4f} | 0.5250 ± {statistics.stdev([0.55, 0.5]):.4f} | +10.00 ± 0.00 |"
    assert table[4].startswith("| equal |") and table[4].endswith(f"+0.00 ± {statistics.stdev([-2.5, 2.5]):.2f} |")


def test_sweep_tiny_demo(tmp_path, demo_shards, capsys):
    recipe = write_recipe(tmp_path, demo_shards, logging={"wandb": False, "progress": False})
    args = ["compare", str(recipe), "trainer.max_steps=3", "trainer.eval_every=3", "trainer.warmup_steps=0",
            "--weightings", "equal", "--seeds", "1"]
    assert main(args) == 0
    out = tmp_path / "run" / "sweep"
    printed = capsys.readouterr().out
    assert "| single-task |" in printed and "tuned_static picked" in printed
    with open(out / "sweep.csv") as fh:
        table = list(csv.DictReader(fh))
    assert {r["weighting"] for r in table} == {"equal", "rlw", "tuned_static"}
    # Every multi-task number is the run's own final metric, and Δm's mean ± std is in the table.
    for r in table:
        if r["task"] != "delta_m":
            summary = json.loads((out / f"seed{r['seed']}" / r["weighting"] / "summary.json").read_text())
            assert float(r["multi_task"]) == summary[f"val/{r['task']}/{r['metric']}"]
    (rlw,) = [float(r["relative_pct"]) for r in table if r["weighting"] == "rlw" and r["task"] == "delta_m"]
    line = next(line for line in (out / "sweep.md").read_text().splitlines() if line.startswith("| rlw |"))
    assert line.endswith(f"{rlw:+.2f} ± 0.00 |")
    assert (out / "seed0" / "static_grid3").is_dir()  # T + 1 = 4 grid points for the demo's 3 tasks
