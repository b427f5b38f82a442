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
from manytask.trainer.sweep import parse_weightings, static_grid


def test_weighting_list_always_has_equal_and_rlw_and_names_typos():
    assert parse_weightings("famo,cagrad") == ["equal", "rlw", "famo", "cagrad"]
    assert "nash_mtl" in parse_weightings("all")
    with pytest.raises(ConfigError, match=r"did you mean 'famo'"):
        parse_weightings("fam0")
    assert static_grid(["a", "b"]) == [
        {"a": 1.0, "b": 1.0}, {"a": 2.0, "b": 1.0}, {"a": 1.0, "b": 2.0}, {"a": 0.5, "b": 1.0}, {"a": 1.0, "b": 0.5},
    ]


def test_sweep_tiny_demo(tmp_path, demo_shards, capsys):
    recipe = write_recipe(tmp_path, demo_shards, logging={"wandb": False, "progress": False})
    args = ["compare", str(recipe), "trainer.max_steps=3", "trainer.eval_every=3", "trainer.warmup_steps=0",
            "--weightings", "famo", "--seeds", "2"]
    assert main(args) == 0
    out = tmp_path / "run" / "sweep"
    printed = capsys.readouterr().out
    assert "| single-task |" in printed and "tuned_static picked" in printed
    with open(out / "sweep.csv") as fh:
        table = list(csv.DictReader(fh))
    assert {r["weighting"] for r in table} == {"equal", "rlw", "famo", "tuned_static"}
    # Every multi-task number is the run's own final metric, and Δm's mean ± std is in the table.
    for r in table:
        if r["task"] != "delta_m":
            summary = json.loads((out / f"seed{r['seed']}" / r["weighting"] / "summary.json").read_text())
            assert float(r["multi_task"]) == summary[f"val/{r['task']}/{r['metric']}"]
    famo = [float(r["relative_pct"]) for r in table if r["weighting"] == "famo" and r["task"] == "delta_m"]
    assert len(famo) == 2
    line = next(line for line in (out / "sweep.md").read_text().splitlines() if line.startswith("| famo |"))
    assert line.endswith(f"{statistics.fmean(famo):+.2f} ± {statistics.stdev(famo):.2f} |")
