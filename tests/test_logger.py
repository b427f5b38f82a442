"""A run logs to metrics.jsonl and an offline W&B run, crashes, resumes, and is read back.

W&B runs offline only; its base URL points at a closed local port so any attempt to reach
the network would fail at once instead of leaving the machine. Two `wandb.init` calls in all
(about 1-2 s each), shared by the tests through a module fixture.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import pytest

from manytask.config import Config
from manytask.trainer import wandb_offline
from manytask.trainer.logger import MetricsLogger, read_metrics, resolve_wandb_mode
from manytask.trainer.plots import gate_heatmap

SECRET = "sk-do-not-log-4711"
BIG_NOTE = "n" * 70_000  # spans three 32 KiB blocks: first, middle and last chunks

WANDB_ENV = {
    "WANDB_MODE": "offline",
    "WANDB_SILENT": "true",
    "WANDB_CONSOLE": "off",
    "WANDB_DISABLE_CODE": "true",
    "WANDB_DISABLE_GIT": "true",
    "WANDB__DISABLE_STATS": "true",
    "WANDB__DISABLE_META": "true",
    "WANDB_BASE_URL": "http://127.0.0.1:9",
    "NETRC": "/nonexistent/netrc",
}


def set_wandb_env(mp: pytest.MonkeyPatch, root: Path) -> None:
    for name, value in WANDB_ENV.items():
        mp.setenv(name, value)
    for name in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR",
                 "WANDB_ARTIFACT_DIR"):
        mp.setenv(name, str(root / name.lower()))  # nothing lands in the home directory
    mp.delenv("WANDB_API_KEY", raising=False)


def make_config(wandb: bool = True) -> Config:
    cfg = Config()
    cfg.run.name = "logger-test"
    cfg.logging.wandb = wandb
    cfg.logging.tags = ["test"]
    cfg.model.params = {"hidden": 8, "api_key": SECRET, "note": BIG_NOTE}
    cfg.engine.deepspeed = {"monitor": {"wandb": {"token": SECRET}}, "steps": [{"secret": SECRET}]}
    return cfg


def scalars(step: int) -> dict[str, float]:
    return {
        "train/taskA/loss": 1.0 / step,
        "train/taskB/loss": 2.0 / step,
        "gates/taskA/expert_0": 0.25,
        "gates/taskA/expert_1": 0.75,
    }


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory):
    """Steps 1-4 logged, checkpoint at 4, a crash; then resume logs steps 5-8."""
    run_dir = tmp_path_factory.mktemp("run")
    with pytest.MonkeyPatch.context() as mp:
        set_wandb_env(mp, run_dir.parent)
        first = MetricsLogger(run_dir, make_config(), is_rank0=True)
        started = time.time()
        for step in range(1, 5):
            first.log(step, scalars(step))
        # W&B drops rows for steps older than its current one: images go with the current step.
        image = first.log_image(4, "gates/heatmap", gate_heatmap({"taskA": np.array([0.25, 0.75])}, 4))
        first.log_table("final/metrics", ["task", "auc"], [["taskA", 0.9]])
        first.summary({"best/auc": 0.9})
        first.finish()
        run_id, first_dir = first.run_id, first.wandb_dir

        # W&B names folders by start second; a real restart takes far longer than this.
        time.sleep(max(0.0, math.floor(started) + 1.05 - time.time()))
        second = MetricsLogger(run_dir, make_config(), is_rank0=True, resume_step=4, run_id=run_id)
        for step in range(5, 9):
            second.log(step, scalars(step))
        second.finish()
    return {"run_dir": run_dir, "run_id": run_id, "first": first_dir, "second": second.wandb_dir,
            "image": image}


def test_offline_run_reads_back(resumed_run):
    rows = wandb_offline.read_history(resumed_run["first"] / f"run-{resumed_run['run_id']}.wandb")
    scalar_rows = [r for r in rows if "train/taskA/loss" in r]
    assert [r["step"] for r in scalar_rows] == [1, 2, 3, 4]
    for row in scalar_rows:
        assert row["train/taskA/loss"] == pytest.approx(1.0 / row["step"])
        assert row["gates/taskA/expert_1"] == pytest.approx(0.75)
        assert row["_step"] == row["step"]  # logged with an explicit step
    image_row = next(r for r in rows if "gates/heatmap" in r)
    assert image_row["step"] == 4 and image_row["gates/heatmap"]["_type"] == "image-file"
    assert any(r.get("final/metrics", {}).get("_type") == "table-file" for r in rows)

    image = resumed_run["image"]
    assert image.parent == resumed_run["run_dir"] / "plots" and image.stat().st_size > 1000
    table = json.loads((resumed_run["run_dir"] / "tables" / "final_metrics.json").read_text())
    assert table["rows"] == [["taskA", 0.9]]
    assert json.loads((resumed_run["run_dir"] / "summary.json").read_text()) == {"best/auc": 0.9}


def test_resume_continues_same_run_without_duplicates(resumed_run):
    files = wandb_offline.find_offline_runs(resumed_run["run_dir"], resumed_run["run_id"])
    assert [f.parent for f in files] == [resumed_run["first"], resumed_run["second"]]
    steps = [r["step"] for r in wandb_offline.read_history(resumed_run["run_dir"])
             if "train/taskA/loss" in r]
    assert steps == list(range(1, 9))

    rows = read_metrics(resumed_run["run_dir"])
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert rows[-1]["train/taskB/loss"] == pytest.approx(2.0 / 8)


def test_secrets_never_reach_wandb(resumed_run):
    config = wandb_offline.read_config(resumed_run["second"])
    assert config["model"]["params"]["api_key"] == "***"
    assert config["model"]["params"]["hidden"] == 8
    assert config["model"]["params"]["note"] == BIG_NOTE  # reassembled across blocks
    assert config["engine"]["deepspeed"]["monitor"]["wandb"]["token"] == "***"
    assert config["run"]["name"] == "logger-test"
    for path in (resumed_run["run_dir"] / "wandb").rglob("*"):
        if path.is_file() and not path.is_symlink():
            assert SECRET.encode() not in path.read_bytes(), path


def test_reader_rejects_corruption_and_tolerates_a_cut_tail(resumed_run, tmp_path):
    source = resumed_run["first"] / f"run-{resumed_run['run_id']}.wandb"
    data = source.read_bytes()
    assert data[:7] == b":W&B\xe1\xbe\x00"  # magic, 0xBEE1 little-endian, version 0
    full = list(wandb_offline.iter_payloads(data))

    assert len(list(wandb_offline.iter_payloads(data[:-3]))) == len(full) - 1  # killed writer
    flipped = bytearray(data)
    flipped[20] ^= 0xFF
    with pytest.raises(wandb_offline.CorruptRunFile, match="checksum"):
        list(wandb_offline.iter_payloads(bytes(flipped)))
    with pytest.raises(wandb_offline.CorruptRunFile, match="not a W&B"):
        list(wandb_offline.iter_payloads(b"PK\x03\x04" + data[4:]))


def test_resume_drops_steps_logged_after_the_checkpoint(tmp_path):
    cfg = make_config(wandb=False)
    first = MetricsLogger(tmp_path, cfg, is_rank0=True)
    for step in range(1, 8):
        first.log(step, {"train/loss": float(step)})
    first.log(7, {"val/taskA/auc": 0.5})  # a second line for the same step
    first.finish()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 8, "train/lo')  # cut short by the kill

    second = MetricsLogger(tmp_path, cfg, is_rank0=True, resume_step=5)
    second.log(6, {"train/loss": 60.0, "train/taskA/loss": float("nan")})
    second.finish()
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2, 3, 4, 5, 6]
    assert lines[-1] == {"step": 6, "train/loss": 60.0, "train/taskA/loss": None}
    assert not (tmp_path / "wandb").exists()


def test_other_ranks_write_nothing(tmp_path, monkeypatch):
    set_wandb_env(monkeypatch, tmp_path / "env")
    run_dir = tmp_path / "run"
    logger = MetricsLogger(run_dir, make_config(), is_rank0=False, run_id="abc")
    logger.log(1, {"train/loss": 1.0})
    logger.log_image(1, "gates/heatmap", gate_heatmap({"a": np.ones(2) / 2}, 1))
    logger.log_table("t", ["a"], [[1]])
    logger.summary({"x": 1})
    logger.finish()
    assert not run_dir.exists() and logger.wandb_dir is None and logger.run_id == "abc"


def test_wandb_mode_resolution(tmp_path, monkeypatch):
    set_wandb_env(monkeypatch, tmp_path)
    assert resolve_wandb_mode("auto") == "offline"
    monkeypatch.delenv("WANDB_MODE")
    assert resolve_wandb_mode("auto") == "offline"  # no key anywhere
    netrc = tmp_path / "netrc"
    netrc.write_text("machine 127.0.0.1 login user password abc\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    assert resolve_wandb_mode("auto") == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert resolve_wandb_mode("auto") == "disabled"
    assert resolve_wandb_mode("offline") == "offline"
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setenv("NETRC", "/nonexistent/netrc")
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    assert resolve_wandb_mode("auto") == "online"

    cfg = make_config()
    cfg.logging.mode = "disabled"
    logger = MetricsLogger(tmp_path / "run", cfg, is_rank0=True)
    logger.log(1, {"train/loss": 1.0})
    logger.finish()
    assert logger.wandb_dir is None and not (tmp_path / "run" / "wandb").exists()
