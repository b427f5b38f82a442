"""Train on many, then add one with few labels: `run.init_from` + `trainer.freeze`.

A 2-task MMoE (regress_a, regress_b) is trained; a new run adds the `click` task, labelled on
5% of the samples, with the shared part and the old towers frozen. The old tasks' predictions
must stay bit-for-bit the same and the new task must beat its trivial baseline.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import torchrun, write_recipe

import manytask
from manytask.config import load_config
from manytask.schema import ConfigError

SILENT = {"logging": {"wandb": False, "progress": False, "heatmap_every": 0}}
OLD_TASKS = {"regress_a": {"type": "regression"}, "regress_b": {"type": "regression"}}
ALL_TASKS = {**OLD_TASKS, "click": {"type": "binary"}}
STEPS = {"max_steps": 120, "eval_every": 120}


def _source(data: Path, labels: dict[str, str]) -> dict:
    return {"sources": [{"name": "synthetic", "train": str(data / "train"), "val": str(data / "val"),
                         "inputs": ["x"], "labels": labels}]}


@pytest.fixture(scope="module")
def base_and_finetuned(tmp_path_factory, demo_shards):
    from manytask.data_pipeline.synthetic import prepare_demo_few_click
    from manytask.trainer.loop import train

    tmp = tmp_path_factory.mktemp("finetune")
    base = tmp / "base"
    base.mkdir()
    train(load_config(write_recipe(base, demo_shards, tasks=OLD_TASKS, trainer=STEPS,
                                   data=_source(demo_shards, {"regress_a": "y_a", "regress_b": "y_b"}), **SILENT)))
    few = tmp / "few"  # the demo_shards samples, click labelled on 5% of the training samples
    prepare_demo_few_click(few, n_train=8000, n_val=2000, shards=4, chunk_size=256)
    tuned = tmp / "tuned"
    tuned.mkdir()
    recipe = write_recipe(
        tuned, few, tasks=ALL_TASKS, data=_source(few, {"regress_a": "y_a", "regress_b": "y_b", "click": "click"}),
        run={"init_from": str(base / "run")},
        trainer={**STEPS, "freeze": ["shared", "towers.regress_a", "towers.regress_b"]}, **SILENT,
    )
    return base / "run", tuned / "run", train(load_config(recipe)), few


def test_added_task_learns_while_old_tasks_stay_bit_identical(base_and_finetuned, demo_shards):

    base, tuned, val, _ = base_and_finetuned
    _assert_old_tasks_unchanged(base, tuned, demo_shards)
    assert val["val/click/auc"] > 0.75  # trivial baseline: 0.5
    log = (tuned / "train.log").read_text()
    assert "init_from" in log and "dropped 0" in log
    assert "towers.groups.0.layers.0.weight[click]" in log.split("new:")[1].split("\n")[0]
    assert "experts.layers.0.weight" in log.split("loaded:")[1].split("\n")[0]
    assert "trainer.freeze" in log


def _assert_old_tasks_unchanged(base: Path, tuned: Path, demo_shards: Path) -> None:
    from manytask.data_pipeline.manifest import load_manifest
    from manytask.trainer.inference import shard_batches

    _, arrays = next(shard_batches(load_manifest(demo_shards / "val"), ["x"], 2000))
    before = manytask.load(base).predict({"x": arrays["x"]})
    after = manytask.load(tuned).predict({"x": arrays["x"]})
    for task in OLD_TASKS:
        np.testing.assert_array_equal(after[task], before[task])


@pytest.mark.slow
def test_ddp_two_ranks_keep_frozen_slices_and_tensors(base_and_finetuned, demo_shards, tmp_path):
    """DDP: frozen tensors are outside its buckets, frozen slices get zero gradients on every
    rank; the old tasks stay bit-identical after a 2-rank fine-tune too."""
    base, _, _, few = base_and_finetuned
    recipe = write_recipe(
        tmp_path, few, tasks=ALL_TASKS, data=_source(few, {"regress_a": "y_a", "regress_b": "y_b", "click": "click"}),
        run={"init_from": str(base)}, trainer={"max_steps": 60, "eval_every": 60,
                                               "freeze": ["shared", "towers.regress_a", "towers.regress_b"]},
        **SILENT,
    )
    torchrun(recipe)
    _assert_old_tasks_unchanged(base, tmp_path / "run", demo_shards)
    last = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["val/click/auc"] > 0.6  # the new task learned (trivial: 0.5)


@pytest.mark.slow
def test_deepspeed_freezes_whole_tensors_and_refuses_slices(base_and_finetuned, tmp_path):
    """ZeRO-2 on 2 ranks: frozen experts stay bit-identical (outside DeepSpeed's partitions);
    a task's slice of a stacked tower cannot be frozen there, and the error says so up front."""
    import torch

    from manytask.models import build_model
    from manytask.trainer.finetune import prepare_finetune
    from manytask.trainer.model_io import read_model_spec

    base, _, _, few = base_and_finetuned
    deepspeed = {"name": "deepspeed", "deepspeed": {"zero_optimization": {"stage": 2}}}
    labels = {"regress_a": "y_a", "regress_b": "y_b", "click": "click"}
    recipe = write_recipe(tmp_path, few, tasks=ALL_TASKS, data=_source(few, labels), engine=deepspeed,
                          run={"init_from": str(base)}, trainer={"max_steps": 20, "eval_every": 20, "freeze": ["experts"]},
                          **SILENT)
    torchrun(recipe)
    before = manytask.load(base).model.state_dict()
    after = manytask.load(tmp_path / "run").model.state_dict()
    for key in [k for k in before if k.startswith("experts.")]:
        assert torch.equal(after[key], before[key]), key
    assert not torch.equal(after["towers.groups.0.layers.0.weight"][:2], before["towers.groups.0.layers.0.weight"])
    cfg = load_config(recipe, ["trainer.freeze=[towers.regress_a]"])
    model = build_model(cfg.model, read_model_spec(tmp_path / "run", cfg))
    with pytest.raises(ConfigError, match=r"'trainer.freeze': \['towers.groups.0.layers.0.weight\[regress_a\]'.*DeepSpeed"):
        prepare_finetune(cfg, model, say=lambda _: None)


def test_freeze_names_a_bad_pattern(tmp_path, demo_shards):
    from manytask.models import build_model
    from manytask.trainer.finetune import freeze, prepare_finetune
    from manytask.trainer.specs import build_model_spec

    cfg = load_config(write_recipe(tmp_path, demo_shards, **SILENT))
    model = build_model(cfg.model, build_model_spec(cfg)[1])
    with pytest.raises(ConfigError, match=r"'towers.clik' names no task of the model \(tasks: "):
        freeze(model, ["towers.clik"])
    with pytest.raises(ConfigError, match=r"'decoder.\*' matches no parameter"):
        freeze(model, ["decoder.*"])
    for fixes in (["weighting.name=gradnorm"], ["weighting.name=pcgrad"], ["monitor.affinity_every=10"]):
        frozen_cfg = load_config(write_recipe(tmp_path, demo_shards, trainer={"freeze": ["shared"]}, **SILENT), fixes)
        with pytest.raises(ConfigError, match="keeps fixed"):
            prepare_finetune(frozen_cfg, build_model(cfg.model, build_model_spec(cfg)[1]), say=lambda _: None)
    frozen = freeze(model, ["experts.layers.0.*", "towers.click"])
    assert not any(p.requires_grad for n, p in model.named_parameters() if n.startswith("experts.layers.0."))
    assert frozen.sliced and all("[click]" in s for s in frozen.sliced)
