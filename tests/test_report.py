"""A run's metrics.jsonl turns into readable PNG charts without W&B."""

from __future__ import annotations

import numpy as np
from PIL import Image

from manytask.config import Config
from manytask.trainer.logger import MetricsLogger
from manytask.trainer.plots import affinity_heatmap, gate_heatmap
from manytask.trainer.report import gate_keys, write_report

TASKS = ["ctr", "cvr"]


def log_a_run(run_dir) -> None:
    cfg = Config()
    cfg.logging.wandb = False
    logger = MetricsLogger(run_dir, cfg, is_rank0=True)
    for step in range(1, 21):
        row = {"train/loss": 2.0 / step, "perf/samples_per_s": 1000.0}
        for i, task in enumerate(TASKS):
            row[f"train/{task}/loss"] = (1 + i) / step
            row[f"weights/{task}"] = 1.0 + 0.01 * i * step
            row[f"sampler/{task}/prob"] = 0.5 + (0.01 * step if i else -0.01 * step)
        if step % 5 == 0:
            for i, task in enumerate(TASKS):
                gates = np.array([0.6, 0.3, 0.1]) if i else np.array([0.2, 0.3, 0.5])
                row.update({f"gates/{task}/expert_{e}": float(g) for e, g in enumerate(gates)})
                row[f"gates/{task}/entropy"] = 1.0
            row["affinity/ctr/cvr"] = -0.3
        logger.log(step, row)
        if step % 10 == 0:  # validation arrives as a separate line for the same step
            logger.log(step, {"val/ctr/auc": 0.7 + step / 100, "val/cvr/auc": 0.6})
    logger.finish()


def test_report_writes_every_chart(tmp_path):
    log_a_run(tmp_path)
    paths = write_report(tmp_path)
    names = sorted(p.name for p in paths)
    assert names == sorted([
        "loss_ctr.png", "loss_cvr.png", "train_loss.png", "gates.png", "affinity.png",
        "sampler.png", "weights.png",
    ])
    for path in paths:
        assert path.parent == tmp_path / "report" and path.stat().st_size > 5000
        with Image.open(path) as image:
            assert image.format == "PNG" and min(image.size) > 100


def test_report_skips_charts_without_metrics(tmp_path):
    cfg = Config()
    cfg.logging.wandb = False
    logger = MetricsLogger(tmp_path, cfg, is_rank0=True)
    logger.log(1, {"train/a/loss": 1.0})
    logger.finish()
    assert [p.name for p in write_report(tmp_path)] == ["loss_a.png", "train_loss.png"]


def test_report_reads_ple_and_shared_gate_keys():
    row = {"step": 5, "gates/a/entropy": 0.5}
    for gate, width in (("a", 2), ("a/level0", 3), ("(shared)/level0", 5), ("(shared)", 2)):
        row |= {f"gates/{gate}/expert_{e}": 1.0 / width for e in range(width)}
    found = gate_keys([row])
    assert {g: sorted(v) for g, v in found.items()} == {
        "a": [0, 1], "a/level0": [0, 1, 2], "(shared)/level0": [0, 1, 2, 3, 4], "(shared)": [0, 1],
    }
    assert found["(shared)/level0"][4] == "gates/(shared)/level0/expert_4"


def test_heatmaps_render(tmp_path):
    fig = gate_heatmap({"a": np.array([0.1, 0.9]), "b": np.array([0.5, 0.25, 0.25])}, step=7)
    fig.savefig(tmp_path / "gates.png")
    fig = affinity_heatmap(np.array([[1.0, -0.4], [-0.4, 1.0]]), ["a", "b"])
    fig.savefig(tmp_path / "affinity.png")
    for name in ("gates.png", "affinity.png"):
        with Image.open(tmp_path / name) as image:
            assert image.size[0] > 100
