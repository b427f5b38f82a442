"""Each part owns its schedule: the logger (`should_log`, `should_log_gate_heatmap`), the
validator (`should_validate`), the affinity monitor (`should_run`) and the checkpointer
(`should_save`) decide from the step and the recipe alone; a run does what they say."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import write_recipe

from manytask.config import Config, MonitorConfig, load_config
from manytask.trainer.checkpoint import Checkpointer, checkpoints
from manytask.trainer.distributed import DistInfo
from manytask.trainer.logger import MetricsLogger
from manytask.trainer.loop import train
from manytask.trainer.monitor import TaskAffinity
from manytask.trainer.validator import Validator


def steps_where(schedule, upto: int = 12, last: int | None = None) -> list[int]:
    return [s for s in range(1, upto + 1) if schedule(s, s == last)]


def test_each_part_decides_from_the_step_and_the_recipe(tmp_path) -> None:
    ck = Checkpointer(tmp_path, DistInfo(), every=5)
    assert steps_where(ck.should_save, last=11) == [5, 10, 11]
    assert steps_where(Checkpointer(tmp_path, DistInfo()).should_save, last=7) == [7]  # every=0: the end only
    assert steps_where(Validator(4).should_validate, last=11) == [4, 8, 11, 12]
    cfg = Config()
    cfg.trainer.log_every, cfg.logging.heatmap_every = 3, 2
    logger = MetricsLogger(tmp_path, cfg, is_rank0=False)  # the same decision on every rank
    assert steps_where(logger.should_log, last=11) == [3, 6, 9, 11, 12]
    assert steps_where(lambda s, _: logger.should_log_gate_heatmap(s), upto=6) == [2, 4, 6]
    cfg.logging.heatmap_every = 0
    assert not any(MetricsLogger(tmp_path, cfg, is_rank0=False).should_log_gate_heatmap(s) for s in range(1, 9))
    assert steps_where(lambda s, _: TaskAffinity(MonitorConfig(affinity_every=6), ["a", "b"]).should_run(s)) == [6, 12]
    assert not any(TaskAffinity(MonitorConfig(affinity_every=6), ["a"]).should_run(s) for s in range(1, 13))
    assert not any(TaskAffinity(MonitorConfig(affinity_every=0), ["a", "b"]).should_run(s) for s in range(1, 13))


def test_a_run_logs_evaluates_measures_and_saves_when_its_parts_say(tmp_path: Path, demo_shards) -> None:
    recipe = write_recipe(
        tmp_path, demo_shards, trainer={"max_steps": 11, "log_every": 3, "eval_every": 4, "warmup_steps": 2},
        checkpoint={"every": 5, "keep_last": 5}, monitor={"affinity_every": 6},
        logging={"wandb": False, "progress": False, "heatmap_every": 2},
    )
    train(load_config(recipe))
    run = tmp_path / "run"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]

    def logged(prefix: str) -> list[int]:
        return [r["step"] for r in rows if any(k.startswith(prefix) for k in r)]

    assert logged("train/loss") == [3, 6, 9, 11]
    assert logged("val/") == [0, 4, 8, 11]  # before the first step too
    assert logged("affinity/") == [6]
    assert sorted(int(p.name.split("_")[-1]) for p in checkpoints(run / "ckpt")) == [5, 10, 11]
    plots = sorted(p.name for p in (run / "plots").iterdir())
    # the gate heatmap at its steps that are also log steps (it draws the logged gate means)
    assert plots == ["affinity_heatmap_00000006.png", "gates_heatmap_00000006.png"]
