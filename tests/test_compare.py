"""`manytask compare`: the multi-task model against one single-task baseline per task.

Story: Δm from known numbers; the single-task recipe derived from a multi-source recipe; then
a tiny demo recipe compared for real, its table checked against its own numbers, and
compared again with --reuse without training anything.
"""

from __future__ import annotations

import csv
import json
import math

import pytest
from conftest import write_recipe

from manytask.config import config_from_dict, load_config
from manytask.launch.cli import main
from manytask.trainer import compare as C
from manytask.trainer.compare import CompareRow, delta_m, single_task_config


def test_delta_m_known_numbers():
    rows = [
        CompareRow("ctr", "auc", single=0.80, multi=0.84, lower_is_better=False),  # +5 %
        CompareRow("price", "mse", single=2.0, multi=2.5, lower_is_better=True),  # −25 %
        CompareRow("kind", "accuracy", single=0.50, multi=0.55, lower_is_better=False),  # +10 %
    ]
    assert [round(r.relative, 10) for r in rows] == [5.0, -25.0, 10.0]
    assert delta_m(rows) == pytest.approx(-10.0 / 3)
    assert delta_m([CompareRow("y", "mse", 1.0, 0.9, True)]) == pytest.approx(10.0)  # lower mse: better
    assert math.isnan(delta_m([CompareRow("y", "mse", 0.0, 0.1, True)]))
    assert math.isnan(delta_m([]))


def test_single_task_config_keeps_only_its_task_and_sources(tmp_path):
    cfg = config_from_dict({
        "run": {"dir": str(tmp_path / "run")},
        "data": {"sources": [
            {"name": "clicks", "train": "c", "val": "cv", "inputs": ["x"], "labels": {"ctr": "click", "cvr": "buy"}},
            {"name": "reviews", "train": "r", "inputs": ["x", "text"], "labels": {"stars": "stars"}},
        ]},
        "tasks": {"ctr": {"type": "binary"}, "cvr": {"type": "binary", "metrics": ["accuracy"]},
                  "stars": {"type": "multiclass"}},
        "model": {"name": "mmoe", "params": {"encoder": {"fields": ["x", "text"]}, "expert_hidden": [64, 32],
                                            "tower_hidden": [16], "activation": "gelu"}},
        "sampler": {"strategy": "manual", "weights": {"clicks": 3.0, "reviews": 1.0}},
        "weighting": {"name": "uncertainty"},
        "engine": {"name": "ddp"},
        "monitor": {"affinity_every": 10},
    })
    st = single_task_config(cfg, "cvr", tmp_path / "single_cvr")
    assert list(st.tasks) == ["cvr"] and st.tasks["cvr"].metrics == ["accuracy", "auc"]
    assert [(s.name, s.labels) for s in st.data.sources] == [("clicks", {"cvr": "buy"})]
    assert st.sampler.weights == {"clicks": 3.0}
    assert st.model.name == "single_task"
    assert st.model.params == {"encoder": {"fields": ["x"]}, "hidden": [64, 32, 16],
                               "activation": "gelu", "dropout": 0.0}
    assert (st.weighting.name, st.engine.name, st.monitor.affinity_every) == ("equal", "single", 0)
    assert (st.trainer, st.data.batch_size, st.run.seed) == (cfg.trainer, cfg.data.batch_size, cfg.run.seed)
    assert st.run.dir == str(tmp_path / "single_cvr")


def test_single_task_config_one_label_of_a_multilabel_task_and_kept_model(tmp_path):
    cfg = config_from_dict({
        "run": {"dir": str(tmp_path / "run")},
        "data": {"sources": [{"name": "yeast", "train": "t", "val": "v", "inputs": ["x"],
                              "labels": {"functions": "labels", "other": "y"}}]},
        "tasks": {"functions": {"type": "multilabel", "out_dim": 14}, "other": {"type": "regression"}},
        "model": {"name": "multi_head", "params": {"hidden": [32], "tower_hidden": [8]}},
    })
    st = single_task_config(cfg, "functions", tmp_path / "label_03", label_field="label_03")
    assert list(st.tasks) == ["label_03"] and st.tasks["label_03"].type == "binary"
    assert st.data.sources[0].labels == {"label_03": "label_03"}
    assert st.model.params["hidden"] == [32, 8]
    kept = single_task_config(cfg, "other", tmp_path / "other", keep_model=True)
    assert (kept.model.name, kept.model.params, list(kept.tasks)) == ("multi_head", cfg.model.params, ["other"])


def test_compare_tiny_demo_then_reuse(tmp_path, demo_shards, capsys, monkeypatch):
    recipe = write_recipe(tmp_path, demo_shards, logging={"wandb": False, "progress": False})
    args = ["compare", str(recipe), "trainer.max_steps=8", "trainer.eval_every=8", "trainer.warmup_steps=0"]
    assert main(args) == 0
    out_dir = tmp_path / "run" / "compare"
    printed = capsys.readouterr().out
    assert "| task | metric | single-task | multi-task |" in printed and "Δm = " in printed

    # The table is consistent with the runs' own final metrics and Δm with the table.
    with open(out_dir / "compare.csv") as fh:
        table = list(csv.DictReader(fh))
    tasks = load_config(recipe).task_names
    assert [r["task"] for r in table] == [*tasks, "delta_m"]
    rows = []
    for r in table[:-1]:
        single = json.loads((out_dir / f"single_{r['task']}" / "summary.json").read_text())
        multi = json.loads((out_dir / "mtl" / "summary.json").read_text())
        key = f"val/{r['task']}/{r['metric']}"
        assert float(r["single_task"]) == single[key] and float(r["multi_task"]) == multi[key]
        rows.append(CompareRow(r["task"], r["metric"], single[key], multi[key], r["lower_is_better"] == "1"))
    assert {r["task"]: r["metric"] for r in table[:-1]} == {"regress_a": "mse", "regress_b": "mse", "click": "auc"}
    expected = sum((-1 if r.lower_is_better else 1) * (r.multi - r.single) / r.single * 100 for r in rows) / 3
    assert float(table[-1]["relative_pct"]) == pytest.approx(expected)
    assert f"Δm = {expected:+.2f}%" in (out_dir / "compare.md").read_text()
    logged = json.loads((out_dir / "tables" / "compare.json").read_text())  # MetricsLogger.log_table
    assert logged["columns"][:4] == ["task", "metric", "single_task", "multi_task"] and len(logged["rows"]) == 4
    assert load_config(out_dir / "single_click" / "config.yaml").model.name == "single_task"

    # --reuse reads the finished runs: nothing is trained again, the numbers are the same.
    monkeypatch.setattr("manytask.trainer.loop.train", lambda cfg: pytest.fail("trained again"))
    again = C.compare(load_config(recipe, args[2:]), reuse=True, say=lambda _: None)
    assert [round(r.relative, 9) for r in again] == [round(r.relative, 9) for r in rows]
