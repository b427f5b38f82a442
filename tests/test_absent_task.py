"""A task absent from a step (no labelled sample on any rank) must not drift: its tower stays
bit-identical through weight decay and Adam momentum (pytorch issue 41101), on one process
and on 2 real DDP ranks where the task is present on one rank only."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import spawn_ranks

from manytask.config import Config, DataConfig, ModelConfig, SourceConfig, TaskConfig, TrainerConfig
from manytask.data_pipeline.batch import Batch
from manytask.models import build_model
from manytask.models.losses import task_losses
from manytask.models.spec import FieldSpec, ModelSpec, TaskSpec
from manytask.trainer import distributed as D
from manytask.trainer.engines import TorchEngine

TASKS = ["a", "b", "c"]


def make(model_name: str) -> tuple[Config, torch.nn.Module, dict[str, TaskSpec]]:
    cfg = Config(
        data=DataConfig(sources=[SourceConfig(name="s", train="-", inputs=["x"], labels={t: t for t in TASKS})]),
        tasks={t: TaskConfig(type="regression") for t in TASKS},
        model=ModelConfig(name=model_name, params={}),
        trainer=TrainerConfig(optimizer="adamw", lr=0.05, weight_decay=0.1, grad_clip=0.0),
    )
    specs = {t: TaskSpec("regression", 1) for t in TASKS}
    torch.manual_seed(0)
    model = build_model(cfg.model, ModelSpec(inputs={"x": FieldSpec("float32", (8,))}, tasks=specs, sources=["s"]))
    return cfg, model, specs


def batch(n: int, present: dict[str, bool], seed: int) -> Batch:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    return Batch(
        inputs={"x": x},
        labels={t: x.sum(1) * (i + 1) for i, t in enumerate(TASKS)},
        masks={t: torch.full((n,), present[t]) for t in TASKS},
        source_id=torch.zeros(n, dtype=torch.long),
    )


def one_step(engine: TorchEngine, b: Batch, specs, absent: list[str]) -> None:
    out = engine.model(b.inputs, b.source_id)
    losses = task_losses(out.outputs, b.labels, b.masks, specs)
    engine.backward(sum(losses.values()) + sum(out.aux_losses.values(), torch.zeros(())))
    engine.step(absent)


def snapshot(model, task):
    return [(p.detach()[i] if i is not None else p.detach()).clone() for p, i in model.task_parameters()[task]]


@pytest.mark.parametrize("model_name", ["mmoe", "multi_head", "ple"])
def test_absent_task_tower_is_bit_identical(model_name):
    cfg, model, specs = make(model_name)
    engine = TorchEngine(cfg, model, D.DistInfo(), ddp=False)
    everyone = dict.fromkeys(TASKS, True)
    one_step(engine, batch(32, everyone, 0), specs, absent=[])  # builds Adam momentum for every tower
    before = {t: snapshot(model, t) for t in TASKS}
    one_step(engine, batch(32, {**everyone, "b": False}, 1), specs, absent=["b"])
    after = {t: snapshot(model, t) for t in TASKS}
    assert model.task_parameters()["b"], "the model names task b's own parameters"
    assert all(torch.equal(x, y) for x, y in zip(before["b"], after["b"])), "absent task's tower drifted"
    for t in ("a", "c"):  # the trained towers did move
        assert not all(torch.equal(x, y) for x, y in zip(before[t], after[t]))


def _ddp_worker(rank: int, port: int, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    info = D.init_distributed("gloo")
    cfg, model, specs = make("mmoe")
    engine = TorchEngine(cfg, model, info, ddp=True)
    one_step(engine, batch(16, dict.fromkeys(TASKS, True), rank), specs, absent=[])
    before = {t: snapshot(model, t) for t in TASKS}
    # Task "c" is labelled on rank 0 only, task "b" on no rank: no hang, "b" frozen, "c" trained.
    present = {"a": True, "b": False, "c": rank == 0}
    one_step(engine, batch(16, present, 10 + rank), specs, absent=["b"])
    after = {t: snapshot(model, t) for t in TASKS}
    out[rank] = {
        "b_frozen": all(torch.equal(x, y) for x, y in zip(before["b"], after["b"])),
        "c_moved": not all(torch.equal(x, y) for x, y in zip(before["c"], after["c"])),
        "params": [p.detach().clone() for p in model.parameters()],
    }
    D.shutdown()


def test_ddp_task_absent_on_one_rank_no_hang_and_frozen_when_absent_everywhere():
    out = spawn_ranks(_ddp_worker)
    assert out[0]["b_frozen"] and out[1]["b_frozen"]
    assert out[0]["c_moved"] and out[1]["c_moved"]
    assert all(torch.equal(x, y) for x, y in zip(out[0]["params"], out[1]["params"])), "ranks agree"
