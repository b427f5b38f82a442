"""A user's story: launch a small recipe on 2 real processes, watch every task learn, find the
per-task losses and gate utilization in metrics.jsonl and in the W&B run file."""

from __future__ import annotations

import json

import pytest
from conftest import DEEPSPEED, small_recipe, torchrun

from manytask.trainer.wandb_offline import read_history

TASKS = ["regress_a", "regress_b", "click"]


def read_jsonl(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_every_task_learned(rows):
    first = next(r for r in rows if r["step"] == 0)
    last = [r for r in rows if "val/click/loss" in r][-1]
    assert last["step"] > 0
    for task in TASKS:
        assert last[f"val/{task}/loss"] < first[f"val/{task}/loss"] * 0.98, (task, first, last)


def test_ddp_two_ranks_learns_and_logs_gates_to_wandb(ddp_reference):
    run = ddp_reference
    rows = read_jsonl(run)
    assert_every_task_learned(rows)
    steps = [r["step"] for r in rows]
    assert steps == sorted(set(steps)), "every logged step appears once"
    assert (run / "train.log").read_text().count("finished 60 steps") == 1  # rank 0 only

    history = read_history(run / "wandb")
    keys = set().union(*history)
    for task in TASKS:
        assert f"train/{task}/loss" in keys and f"val/{task}/loss" in keys
        assert f"gates/{task}/entropy" in keys
        assert {f"gates/{task}/expert_{e}" for e in range(3)} <= keys
    # Gate means are averaged over both ranks and are a distribution over experts.
    row = next(r for r in history if "gates/click/expert_0" in r)
    assert sum(row[f"gates/click/expert_{e}"] for e in range(3)) == pytest.approx(1.0, abs=1e-4)
    assert "gates/heatmap" in keys
    assert {"weights/click", "sampler/synthetic/prob", "perf/samples_per_s"} <= keys


def test_ddp_run_raises_no_warnings(ddp_reference):
    """A clean run prints no UserWarning: e.g. DDP's "Grad strides do not match bucket view
    strides" when a model's gradient is laid out unlike its parameter (then DDP copies it)."""
    stderr = (ddp_reference.parent / "stderr.txt").read_text()
    assert "Warning" not in stderr, stderr[-3000:]


def test_deepspeed_zero2_two_ranks_learns(deepspeed_reference):
    assert_every_task_learned(read_jsonl(deepspeed_reference))


def test_deepspeed_zero3_two_ranks_learns_and_starts_like_zero2(tmp_path, demo_shards, deepspeed_reference):
    """ZeRO-3 partitions the parameters themselves: the models' own autograd Functions
    (stacked_dot, mixed_linear) must see them gathered in the forward and the backward. The
    first step (same seed, same batches, same weights) must then match ZeRO-2's."""
    zero3 = {**DEEPSPEED, "engine": {"name": "deepspeed", "deepspeed": {"zero_optimization": {"stage": 3}}}}
    torchrun(small_recipe(tmp_path, demo_shards, "zero3", **zero3))
    rows = read_jsonl(tmp_path / "zero3" / "run")
    assert_every_task_learned(rows)
    first3 = next(r for r in rows if "train/loss" in r)
    first2 = next(r for r in read_jsonl(deepspeed_reference) if "train/loss" in r)
    assert first3["step"] == first2["step"]
    for task in TASKS:
        key = f"train/{task}/loss"
        assert first3[key] == pytest.approx(first2[key], rel=1e-5), key


def test_deepspeed_zero3_fused_mixture_towers_train_like_zero2_and_resume(tmp_path, demo_shards):
    """Wide experts put the towers on the fused mixture path (`mixed_linear`, which reads the
    tower weights inside its own autograd Function): under ZeRO-3, whose parameters are
    partitioned outside forward/backward, the first steps' losses follow ZeRO-2's. Its
    partitioned checkpoint then resumes."""
    from manytask.models.mixed_linear import CHUNK_ELEMENTS

    width, batch = 6144, 64
    assert len(TASKS) * batch * width > CHUNK_ELEMENTS  # the fused path, not the plain mixture
    model = {"name": "mmoe", "params": {"num_experts": 3, "expert_hidden": [width], "tower_hidden": [8]}}
    losses = {}
    for stage in (2, 3):
        recipe = small_recipe(tmp_path, demo_shards, f"zero{stage}", model=model,
                              engine={"name": "deepspeed", "deepspeed": {"zero_optimization": {"stage": stage}}},
                              data={"num_workers": 0, "batch_size": batch}, trainer={"max_steps": 4})
        torchrun(recipe)
        rows = [r for r in read_jsonl(tmp_path / f"zero{stage}" / "run") if "train/loss" in r]
        losses[stage] = [[r[f"train/{t}/loss"] for t in TASKS] for r in rows]
    assert len(losses[3]) == len(losses[2]) == 4
    for step, (l2, l3) in enumerate(zip(losses[2], losses[3]), start=1):
        assert l3 == pytest.approx(l2, rel=1e-4), f"step {step}"
    assert losses[3][-1] != pytest.approx(losses[3][0], rel=1e-3)  # the weights did move

    # The ZeRO-3 shards load back (weights-only) and the run goes on from step 4.
    proc = torchrun(tmp_path / "zero3" / "recipe.yaml", "trainer.max_steps=6")
    assert "at step 4" in proc.stdout
    rows = [r for r in read_jsonl(tmp_path / "zero3" / "run") if "train/loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("weighting,accum", [("gradnorm", 1), ("mgda", 2), ("dwa", 1), ("worst_case", 2), ("pcgrad", 2)])
def test_each_weighting_runs_under_two_rank_ddp(tmp_path, demo_shards, weighting, accum):
    """Every weighting's own collectives interleave with the DDP step's (whose agreement rides
    on the gradient all-reduce), with and without gradient accumulation: no hang, finite
    losses and a logged weight for every task at every step."""
    recipe = small_recipe(tmp_path, demo_shards, weighting, weighting={"name": weighting},
                          trainer={"max_steps": 12, "grad_accum": accum}, data={"num_workers": 0})
    torchrun(recipe, timeout=300)
    rows = [r for r in read_jsonl(tmp_path / weighting / "run") if "train/loss" in r]
    assert [r["step"] for r in rows] == list(range(1, 13))
    for r in rows:
        assert r["train/loss"] == r["train/loss"] and abs(r["train/loss"]) < 1e6  # finite
        assert all(f"weights/{t}" in r for t in TASKS)
