"""Relaunching a run with a changed recipe: what may change (max_steps, LR schedule, logging,
eval, checkpoints, ...) is applied from the resumed step on and announced; anything else is
refused before a single file is written, naming every key with its old and new value, and
`config.yaml` always holds what actually runs."""

from __future__ import annotations

import json

import pytest
import yaml
from conftest import write_recipe

from manytask.config import load_config
from manytask.launch.cli import main
from manytask.trainer.engines import lr_lambda

FAST = {"data": {"batch_size": 64, "num_workers": 0, "shuffle_buffer": 256},
        "model": {"name": "mmoe", "params": {"num_experts": 2, "expert_hidden": [8], "tower_hidden": [4]}},
        "trainer": {"max_steps": 20, "lr": 0.003, "warmup_steps": 2, "eval_every": 1000, "log_every": 1},
        "checkpoint": {"every": 10}, "logging": {"wandb": False, "progress": False, "heatmap_every": 0}}


def train(recipe, *overrides: str) -> int:
    return main(["train", str(recipe), *overrides])


def metrics(run) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


@pytest.fixture
def finished(tmp_path, demo_shards):
    recipe = write_recipe(tmp_path, demo_shards, **FAST)
    assert train(recipe) == 0
    return recipe, tmp_path / "run"


def test_lr_and_max_steps_changes_apply_from_the_resumed_step(finished, capsys):
    recipe, run = finished
    assert train(recipe, "trainer.lr=0.03", "trainer.max_steps=30", "trainer.log_every=2") == 0
    out = capsys.readouterr().out
    assert "recipe change applied from step 20: trainer.lr: 0.003 -> 0.03" in out
    assert "trainer.max_steps: 20 -> 30" in out and "trainer.log_every: 1 -> 2" in out
    rows = metrics(run)
    assert sorted(rows)[-6:] == [20, 22, 24, 26, 28, 30]  # the new logging frequency
    new = load_config(recipe, ["trainer.lr=0.03", "trainer.max_steps=30"])
    factor = lr_lambda(new)
    for step in (22, 30):  # the LR the new schedule gives, not the old one's
        assert rows[step]["perf/lr"] == pytest.approx(0.03 * factor(step))
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["trainer"]["lr"] == 0.03 and saved["trainer"]["max_steps"] == 30
    history = [json.loads(line) for line in (run / "config_history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == [0, 20]
    assert history[1]["changes"]["trainer.lr"] == {"old": 0.003, "new": 0.03}


def test_other_changes_are_refused_before_any_file_is_written(finished, capsys):
    recipe, run = finished
    before = {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in run.rglob("*")}
    code = train(recipe, "model.params.expert_hidden=[32]", "weighting.name=dwa", "trainer.lr=0.03")
    assert code == 2
    err = capsys.readouterr().err
    assert "refusing to resume from" in err and "step_00000020" in err
    assert "model.params.expert_hidden: [8] -> [32]" in err
    assert "weighting.name: 'uncertainty' -> 'dwa'" in err
    assert "trainer.lr" not in err.split("Keys that may change")[0], "only refused keys are listed"
    after = {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in run.rglob("*")}
    assert after == before, "no file written or touched"
    # `manytask launch` refuses the same before it starts a single process, once.
    assert main(["launch", "--nproc", "2", str(recipe), "weighting.name=dwa"]) == 2
    err = capsys.readouterr().err
    assert err.count("refusing to resume") == 1 and "weighting.name: 'uncertainty' -> 'dwa'" in err
    # A fresh start in the same directory is the user's explicit choice.
    assert train(recipe, "weighting.name=dwa", "run.resume=never", "trainer.max_steps=5") == 0
