"""The loop in one process: non-finite losses are skipped and counted or stop the run with a
clear message; several sources are mixed or sampled one per step; accumulation is exact."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_recipe

from manytask.config import load_config
from manytask.data_pipeline.shard_writer import write_shards
from manytask.data_pipeline.synthetic import mmoe_pair
from manytask.trainer.loop import NonFiniteLossError, train

QUIET = ["logging.wandb=false", "logging.progress=false", "logging.heatmap_every=0"]


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def poisoned(tmp_path_factory) -> Path:
    """Demo-like data where a few training inputs are NaN (a corrupt feature pipeline)."""
    out = tmp_path_factory.mktemp("poisoned")
    arrays = mmoe_pair(6000, correlation=0.5)
    val = {k: v[5000:] for k, v in arrays.items()}
    train_arrays = {k: v[:5000].copy() for k, v in arrays.items()}
    train_arrays["x"][[7, 2500]] = np.nan
    write_shards(out / "train", train_arrays, 2500, 500, prefix="train", vocab={"click": 2})
    write_shards(out / "val", val, 1000, 500, prefix="val", vocab={"click": 2})
    return out


def test_nonfinite_steps_are_skipped_and_counted(tmp_path, poisoned):
    cfg = load_config(write_recipe(tmp_path, poisoned), [*QUIET, "trainer.max_steps=60", "trainer.log_every=1",
                                                          "trainer.on_nonfinite=skip",
                                                          "data.on_nonfinite_input=allow"])
    val = train(cfg)
    logged = rows(tmp_path / "run")
    skipped = max(r.get("train/nonfinite_steps", 0) for r in logged)
    assert skipped >= 2, "each epoch's batches holding a NaN input were skipped"
    assert all(np.isfinite(v) for v in val.values()), "the model stayed finite"
    first = logged[0]
    assert val["val/click/loss"] < first["val/click/loss"]
    log = (tmp_path / "run" / "train.log").read_text()
    assert "non-finite loss, step skipped" in log
    assert re.search(r"non-finite loss, step skipped \(tasks click=nan, regress_a=nan, regress_b=nan; \d+ so far\)", log), log


def test_nonfinite_stop_names_the_step_and_tasks(tmp_path, poisoned):
    cfg = load_config(write_recipe(tmp_path, poisoned), [*QUIET, "trainer.max_steps=60", "trainer.on_nonfinite=stop",
                                                          "data.on_nonfinite_input=allow"])
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at step \d+ \(per-task losses .*regress_a"):
        train(cfg)


@pytest.fixture(scope="module")
def two_sources(tmp_path_factory) -> Path:
    """Two datasets with different inputs, each labelling its own task (multi-dataset)."""
    out = tmp_path_factory.mktemp("two_sources")
    a = mmoe_pair(4000, dim=20, seed=1)
    b = mmoe_pair(2000, dim=12, seed=2)
    for name, arrays, field in (("a", a, "xa"), ("b", b, "xb")):
        data = {field: arrays["x"], "y": arrays["y_a"]}
        n = len(arrays["x"]) * 4 // 5
        write_shards(out / name / "train", {k: v[:n] for k, v in data.items()}, n // 2, 400, prefix="t")
        write_shards(out / name / "val", {k: v[n:] for k, v in data.items()}, 1000, 400, prefix="v")
    return out


def two_source_recipe(tmp_path: Path, data: Path, mode: str) -> Path:
    sources = [
        {"name": "a", "train": str(data / "a" / "train"), "val": str(data / "a" / "val"), "inputs": ["xa"],
         "labels": {"task_a": "y"}},
        {"name": "b", "train": str(data / "b" / "train"), "val": str(data / "b" / "val"), "inputs": ["xb"],
         "labels": {"task_b": "y"}},
    ]
    return write_recipe(
        tmp_path, data, data={"sources": sources}, tasks={"task_a": {"type": "regression"}, "task_b": {"type": "regression"}},
        model={"name": "multi_head", "params": {}}, sampler={"strategy": "proportional", "mode": mode},
        weighting={"name": "equal"},
    )


@pytest.mark.parametrize("mode", ["single", "mixed"])
def test_two_sources_sampled_in_proportion_and_both_tasks_learn(tmp_path, two_sources, mode):
    cfg = load_config(two_source_recipe(tmp_path, two_sources, mode), [*QUIET, "trainer.max_steps=80", "trainer.log_every=80"])
    val = train(cfg)
    logged = rows(tmp_path / "run")
    last = [r for r in logged if "sampler/a/samples" in r][-1]
    share = last["sampler/a/samples"] / (last["sampler/a/samples"] + last["sampler/b/samples"])
    assert share == pytest.approx(3200 / 4800, abs=0.12 if mode == "single" else 0.01)
    assert last["samples/task_a"] == last["sampler/a/samples"], "task_a is labelled only by source a"
    first = logged[0]
    for task in ("task_a", "task_b"):
        assert val[f"val/{task}/loss"] < 0.8 * first[f"val/{task}/loss"]


def test_gradient_accumulation_matches_one_big_batch(tmp_path, demo_shards):
    """2 micro-batches of 64 accumulate to the same update as one batch of 128 (up to float
    summation order), so accumulation neither double-counts nor drops a micro-batch."""
    from manytask.trainer.loop import build_job, train_step

    def first_step_params(batch_size: int, accum: int, name: str):
        (tmp_path / name).mkdir()
        cfg = load_config(write_recipe(tmp_path / name, demo_shards),
                          [*QUIET, f"data.batch_size={batch_size}", f"trainer.grad_accum={accum}",
                           "weighting.name=equal", "trainer.grad_clip=0", "data.shuffle_buffer=128",
                           "model.params.num_experts=2"])
        job = build_job(cfg)
        torch.manual_seed(0)
        train_step(job, 0)
        params = [p.detach().clone() for p in job.engine.module.parameters()]
        job.data.close()
        job.logger.finish()
        return params

    big = first_step_params(128, 1, "big")
    accumulated = first_step_params(64, 2, "acc")
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(big, accumulated))


@pytest.mark.parametrize("optimizer", ["adam", "adamw", "sgd"])
def test_optimizer_is_fused_where_it_can_be_and_updates_like_foreach(tmp_path, demo_shards, optimizer):
    """The trainer's optimizer takes torch's fused kernel for CPU/CUDA float parameters (one
    pass per parameter); its update equals the foreach implementation's to rounding."""
    from manytask.trainer.engines import make_optimizer, optimizer_impl

    cfg = load_config(write_recipe(tmp_path, demo_shards), [*QUIET, f"trainer.optimizer={optimizer}",
                                                            "trainer.weight_decay=0.01"])
    torch.manual_seed(0)
    start = [torch.randn(33, 17), torch.randn(5)]
    grads = [[torch.randn_like(p) for p in start] for _ in range(3)]
    params = {impl: [torch.nn.Parameter(p.clone()) for p in start] for impl in ("fused", "foreach")}
    opts = {impl: make_optimizer(cfg, ps, fused=impl == "fused") for impl, ps in params.items()}
    assert opts["fused"].defaults["fused"] and not opts["foreach"].defaults.get("fused")
    for step_grads in grads:
        for impl, opt in opts.items():
            for p, g in zip(params[impl], step_grads):
                p.grad = g.clone()
            opt.step()
    for fused, foreach, initial in zip(params["fused"], params["foreach"], start):
        assert not torch.equal(fused, initial)  # the steps moved it
        torch.testing.assert_close(fused, foreach, rtol=1e-6, atol=1e-7)
    # a parameter the fused kernels do not take (not floating point) falls back to foreach
    ints = torch.nn.Parameter(torch.zeros(3, dtype=torch.long), requires_grad=False)
    assert optimizer_impl([*params["fused"], ints]) == {"foreach": True}
