"""Train on many, then add one with few labels: `run.init_from` + `trainer.freeze`.

A 2-task MMoE (regress_a, regress_b) is trained; a new run adds the `click` task, labelled on
5% of the samples, with the shared part and the old towers frozen. The old tasks' predictions
must stay bit-for-bit the same and the new task must beat its trivial baseline.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import write_recipe

import manytask
from manytask.config import load_config
from manytask.schema import ConfigError

SILENT = {"logging": {"wandb": False, "progress": False, "heatmap_every": 0}}
OLD_TASKS = {"regress_a": {"type": "regression"}, "regress_b": {"type": "regression"}}
ALL_TASKS = {**OLD_TASKS, "click": {"type": "binary"}}
STEPS = {"max_steps": 200, "eval_every": 200}


def _source(data: Path, labels: dict[str, str]) -> dict:
    return {"sources": [{"name": "synthetic", "train": str(data / "train"), "val": str(data / "val"),
                         "inputs": ["x"], "labels": labels}]}


def few_click_labels(out: Path, fraction: float = 0.05) -> Path:
    """The demo data (same samples as conftest's demo_shards) with `click` kept on `fraction`
    of the training samples (-1 = no label elsewhere) and on every validation sample."""
    from manytask.data_pipeline.shard_writer import write_shards
    from manytask.data_pipeline.synthetic import mmoe_pair

    arrays = mmoe_pair(10_000, correlation=0.5, seed=0)
    train = {k: v[:8000].copy() for k, v in arrays.items()}
    val = {k: v[8000:] for k, v in arrays.items()}
    hide = np.random.default_rng(1).random(8000) >= fraction
    train["click"][hide] = -1
    write_shards(out / "train", train, 2000, 256, prefix="train", vocab={"click": 2})
    write_shards(out / "val", val, 2000, 256, prefix="val", vocab={"click": 2})
    return out


@pytest.fixture(scope="module")
def base_and_finetuned(tmp_path_factory, demo_shards):
    from manytask.trainer.loop import train

    tmp = tmp_path_factory.mktemp("finetune")
    base = tmp / "base"
    base.mkdir()
    train(load_config(write_recipe(base, demo_shards, tasks=OLD_TASKS, trainer=STEPS,
                                   data=_source(demo_shards, {"regress_a": "y_a", "regress_b": "y_b"}), **SILENT)))
    few = few_click_labels(tmp / "few")
    tuned = tmp / "tuned"
    tuned.mkdir()
    recipe = write_recipe(
        tuned, few, tasks=ALL_TASKS, data=_source(few, {"regress_a": "y_a", "regress_b": "y_b", "click": "click"}),
        run={"init_from": str(base / "run")},
        trainer={**STEPS, "freeze": ["shared", "towers.regress_a", "towers.regress_b"]}, **SILENT,
    )
    return base / "run", tuned / "run", train(load_config(recipe))


def test_added_task_learns_while_old_tasks_stay_bit_identical(base_and_finetuned, demo_shards):
    from manytask.data_pipeline.manifest import load_manifest
    from manytask.trainer.inference import shard_batches

    base, tuned, val = base_and_finetuned
    _, arrays = next(shard_batches(load_manifest(demo_shards / "val"), ["x"], 2000))
    before = manytask.load(base).predict({"x": arrays["x"]})
    after = manytask.load(tuned).predict({"x": arrays["x"]})
    for task in OLD_TASKS:
        np.testing.assert_array_equal(after[task], before[task])
    assert val["val/click/auc"] > 0.75  # trivial baseline: 0.5
    log = (tuned / "train.log").read_text()
    assert "init_from" in log and "dropped 0" in log
    assert "towers.groups.0.layers.0.weight[click]" in log.split("new:")[1].split("\n")[0]
    assert "experts.layers.0.weight" in log.split("loaded:")[1].split("\n")[0]
    assert "trainer.freeze" in log


def test_freeze_names_a_bad_pattern(tmp_path, demo_shards):
    from manytask.models import build_model
    from manytask.trainer.finetune import freeze
    from manytask.trainer.specs import build_model_spec

    cfg = load_config(write_recipe(tmp_path, demo_shards, **SILENT))
    model = build_model(cfg.model, build_model_spec(cfg)[1])
    with pytest.raises(ConfigError, match=r"'towers.clik' names no task of the model \(tasks: "):
        freeze(model, ["towers.clik"])
    with pytest.raises(ConfigError, match=r"'decoder.\*' matches no parameter"):
        freeze(model, ["decoder.*"])
    frozen = freeze(model, ["experts.layers.0.*", "towers.click"])
    assert not any(p.requires_grad for n, p in model.named_parameters() if n.startswith("experts.layers.0."))
    assert frozen.sliced and all("[click]" in s for s in frozen.sliced)
