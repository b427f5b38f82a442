"""Negative-transfer monitoring: task affinity sees correlated and anti-correlated task pairs,
does not change training by a single bit, and gate health warns about collapsed gates.

Story: write the MMoE synthetic pair at task correlation +1 and −1, train the demo recipe on
each a few dozen steps with affinity measured every 3 steps, and read the logged cosines.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import write_recipe
from PIL import Image

from manytask.config import ModelConfig, MonitorConfig, load_config
from manytask.data_pipeline.synthetic import prepare_demo
from manytask.models import build_model
from manytask.models.spec import FieldSpec, ModelSpec, TaskSpec
from manytask.trainer.logger import read_metrics
from manytask.trainer.loop import train
from manytask.trainer.monitor import (
    GateHealth,
    TaskAffinity,
    cosine_matrix,
    gate_experts_of,
    gate_health,
)
from manytask.trainer.report import write_report

PAIR = "affinity/regress_a/regress_b"
STEPS = 30


def train_pair(tmp: Path, data: Path, affinity_every: int) -> Path:
    recipe = write_recipe(
        tmp, data,
        trainer={"max_steps": STEPS, "eval_every": STEPS, "log_every": 1},
        monitor={"affinity_every": affinity_every, "affinity_window": 3},
        logging={"wandb": False, "heatmap_every": 10, "progress": False},
        # gate_dropout: training draws random numbers, so a measurement that touched the RNG
        # would show in the losses.
        model={"name": "mmoe", "params": {"num_experts": 4, "expert_hidden": [64], "tower_hidden": [32],
                                         "gate_dropout": 0.1}},
    )
    train(load_config(recipe))
    return tmp / "run"


@pytest.fixture(scope="module")
def pair_runs(tmp_path_factory) -> dict[str, Path]:
    """The demo recipe (3 tasks, an MMoE with one-layer experts) on the pair at correlation +1
    (with and without the affinity monitor) and −1."""
    root = tmp_path_factory.mktemp("pair")
    runs = {}
    for name, corr, every in [("pos", 1.0, 3), ("pos_off", 1.0, 0), ("neg", -1.0, 3)]:
        data = root / f"data{corr:+.0f}"
        if not data.exists():
            prepare_demo(data, n_train=4096, n_val=512, shards=2, chunk_size=256, correlation=corr)
        (root / name).mkdir()
        runs[name] = train_pair(root / name, data, every)
    return runs


def affinities(run: Path, after: int = 0) -> list[float]:
    """The logged regress_a/regress_b gradient cosines at steps > `after`."""
    return [row[PAIR] for row in read_metrics(run) if PAIR in row and row["step"] > after]


def test_affinity_sees_correlated_and_anticorrelated_tasks(pair_runs):
    assert len(affinities(pair_runs["pos"])) == len(affinities(pair_runs["neg"])) == STEPS // 3
    # Once heads and experts have trained 15 steps. Measured over seeds 0-2 and 30-60 steps:
    # +0.2..+0.6 at correlation +1, −0.1..−0.3 at −1; the −1 side is weaker because each
    # task's head can absorb a sign (see monitor.py).
    pos, neg = affinities(pair_runs["pos"], after=15), affinities(pair_runs["neg"], after=15)
    assert statistics.mean(pos) > 0.15 and min(pos) > 0
    assert statistics.mean(neg) < -0.1 and max(neg) < 0
    log = (pair_runs["neg"] / "train.log").read_text()
    assert "tasks 'regress_a' and 'regress_b' have had conflicting gradients" in log
    assert "'regress_a' and 'regress_b'" not in (pair_runs["pos"] / "train.log").read_text()


def test_affinity_does_not_change_training(pair_runs):
    with_aff, without = read_metrics(pair_runs["pos"]), read_metrics(pair_runs["pos_off"])
    keys = [k for k in with_aff[-1] if k.startswith(("train/", "val/"))]
    assert "train/loss" in keys and "val/regress_a/mse" in keys
    assert len(with_aff) == len(without) == STEPS + 1
    for a, b in zip(with_aff, without):
        assert {k: a.get(k) for k in keys} == {k: b.get(k) for k in keys}, a["step"]  # bitwise


def test_report_of_a_real_run_has_every_chart(pair_runs):
    run = pair_runs["pos"]
    names = {p.name: p for p in write_report(run)}
    for name in ("gates.png", "affinity.png", "train_loss.png", "loss_regress_a.png", "loss_click.png"):
        with Image.open(names[name]) as image:
            assert image.format == "PNG" and min(image.size) > 100
        assert names[name].stat().st_size > 5000
    heatmaps = sorted((run / "plots").glob("affinity_heatmap_*.png"))
    assert len(heatmaps) == STEPS // 3 and heatmaps[-1].stat().st_size > 5000
    last = read_metrics(run)[-1]
    assert last["gates/collapsed"] == 0 and last["gates/dead_experts"] == 0


# --------------------------------------------------------------------------- units
def test_cosine_matrix_and_conflict_window():
    m = cosine_matrix([torch.tensor([1.0, 0.0]), torch.tensor([-2.0, 0.0]), torch.zeros(2)])
    assert m[0, 1] == -1 and m[0, 0] == 1 and math.isnan(m[0, 2]) and math.isnan(m[2, 2])

    said: list[str] = []
    aff = TaskAffinity(MonitorConfig(affinity_window=2), ["a", "b", "c"])
    for _ in range(3):
        metrics = aff.record(m, step=1, say=said.append)
    assert metrics["affinity/a/b"] == -1 and math.isnan(metrics["affinity/a/c"])
    assert metrics["affinity/conflicting_pairs"] == 1
    assert len(said) == 1 and "'a' and 'b'" in said[0]  # warned once, when the window filled
    aff.record(-m, step=2, say=said.append)  # positive again: streak reset, no new warning
    assert aff.state_dict() == {"negative_run": {"a/b": 0}} and len(said) == 1


def gate_job():
    said: list[str] = []
    return SimpleNamespace(step=7, run=SimpleNamespace(say=said.append)), said


def gates(**per_gate: list[float]) -> dict[str, float]:
    return {f"gates/{g}/expert_{e}": w for g, ws in per_gate.items() for e, w in enumerate(ws)}


def test_gate_health_warns_on_collapse_and_dead_experts():
    cfg = MonitorConfig(collapse_threshold=0.9, dead_threshold=0.01)
    health = GateHealth(cfg)
    job, said = gate_job()
    collapsed = gates(ctr=[0.97, 0.01, 0.005, 0.015], cvr=[0.95, 0.02, 0.005, 0.025])
    assert health.check(job, collapsed) == {"gates/collapsed": 2.0, "gates/dead_experts": 1.0}
    assert len(said) == 2
    assert "gate collapse in ctr, cvr" in said[0] and "dead experts expert_2" in said[1]
    health.check(job, collapsed)
    assert len(said) == 2  # no repeat while nothing changes
    assert GateHealth(cfg).load_state_dict(health.state_dict()) is None


def test_gate_health_silent_on_healthy_gates():
    health = GateHealth(MonitorConfig())
    job, said = gate_job()
    healthy = gates(ctr=[0.4, 0.3, 0.2, 0.1], cvr=[0.1, 0.2, 0.3, 0.4])
    assert health.check(job, healthy) == {"gates/collapsed": 0.0, "gates/dead_experts": 0.0}
    assert said == []
    # Without expert names, gates are grouped per level suffix and expert position.
    ple = {"a/level0": [0.001, 0.5, 0.499], "b/level0": [0.5, 0.001, 0.499]}
    assert gate_health(ple, MonitorConfig()) == ([], [])


def test_gate_health_follows_the_model_expert_names_across_ple_gates():
    """PLE, 2 tasks, 1 own + 1 shared expert per level, 2 levels: position 0 of each task gate
    is that task's own expert, which the level's shared gate sees at another position."""
    spec = ModelSpec(
        inputs={"x": FieldSpec("float32", (4,))},
        tasks={"a": TaskSpec("regression", 1), "b": TaskSpec("binary", 1)},
        sources=["s"],
    )
    model = build_model(ModelConfig("ple", {"num_levels": 2, "task_experts": 1, "shared_experts": 1}), spec)
    names = gate_experts_of(model)
    assert names["(shared)/level0"] == ["level0/a.0", "level0/b.0", "level0/shared.0"]
    assert names["a/level1"] == ["level1/a.0", "level1/shared.0"]
    means = {
        "a/level0": [0.001, 0.999], "b/level0": [0.6, 0.4],
        "(shared)/level0": [0.3, 0.3, 0.4],  # a's own level-0 expert is used by the shared gate
        "a/level1": [0.002, 0.998], "b/level1": [0.5, 0.5],  # level 1 has no shared gate
    }
    collapsed, dead = gate_health(means, MonitorConfig(collapse_threshold=0.99), names)
    assert collapsed == ["a/level0", "a/level1"]
    assert dead == ["level1/a.0"]  # level0/a.0 lives on through the shared gate
    # by position alone, a's dead level-1 expert hides behind b's live one at the same index
    assert gate_health(means, MonitorConfig(collapse_threshold=0.99))[1] == []
