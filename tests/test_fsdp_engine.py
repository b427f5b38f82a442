"""The FSDP2 engine's pieces on 2 real gloo ranks: a model built on the meta device and
materialised shard by shard starts from exactly the weights a full build gives; an absent
task's slices stay bit-identical although their rows live on different ranks; a recipe that
needs per-task gradients of sharded parameters is refused before anything starts."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import spawn_ranks
from test_absent_task import TASKS, batch, make, one_step

from manytask.config import EngineConfig, FSDPConfig, ModelConfig, load_config
from manytask.models import build_model
from manytask.models.spec import FieldSpec, ModelSpec, TaskSpec
from manytask.schema import ConfigError
from manytask.trainer import distributed as D
from manytask.trainer.fsdp_engine import (
    META_INIT_MODELS,
    FSDPEngine,
    init_seed,
    materialize,
    parameters_on_meta,
    shard_units,
)


def join(rank: int, port: int, world: int = 2) -> D.DistInfo:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    return D.init_distributed("gloo")


def full(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def _init_worker(rank: int, port: int, out: dict) -> None:
    from torch.distributed.fsdp import fully_shard

    join(rank, port)
    tasks = {"a": TaskSpec("regression", 1), "b": TaskSpec("binary", 1), "c": TaskSpec("multiclass", 3)}
    result = {}
    for name in sorted(META_INIT_MODELS):
        cfg = ModelConfig(name=name, params={})
        spec = ModelSpec(inputs={"x": FieldSpec("float32", (8,))},
                         tasks={"a": tasks["a"]} if name == "single_task" else tasks, sources=["s"])
        torch.manual_seed(init_seed(7))
        reference = build_model(cfg, spec).state_dict()
        with parameters_on_meta():
            model = build_model(cfg, spec)
        on_meta = all(p.device.type == "meta" for p in model.parameters())
        units = shard_units(model, 0)
        for unit in units:
            fully_shard(unit)
        fully_shard(model)
        materialize(model, torch.device("cpu"), seed=7)
        got = {k: full(v) for k, v in model.state_dict().items()}
        result[name] = (on_meta, len(units), all(torch.equal(got[k], reference[k]) for k in reference),
                        sorted(got) == sorted(reference))
    out[rank] = result
    D.shutdown()


def test_meta_built_model_materialises_shard_by_shard_to_the_full_builds_weights():
    out = spawn_ranks(_init_worker)
    for rank in (0, 1):
        for name, (on_meta, units, equal, same_keys) in out[rank].items():
            assert on_meta, f"{name}: parameters were allocated at build time"
            assert units >= 3, f"{name}: every layer is its own sharding unit"
            assert same_keys and equal, f"rank {rank}: {name}'s initial weights differ from the full build's"


def _absent_worker(rank: int, port: int, out: dict) -> None:
    info = join(rank, port)
    result = {}
    for name in ("mmoe", "multi_head"):
        cfg, model, specs = make(name)
        cfg.engine = EngineConfig(name="fsdp", fsdp=FSDPConfig(min_unit_params=0))
        engine = FSDPEngine(cfg, model, info)

        def snapshot(task, module=engine.module):
            return [(full(p.detach())[i] if i is not None else full(p.detach())).clone()
                    for p, i in module.task_parameters()[task]]

        one_step(engine, batch(16, dict.fromkeys(TASKS, True), rank), specs, absent=[])  # Adam momentum
        before = {t: snapshot(t) for t in TASKS}
        # "c" is labelled on rank 0 only, "b" nowhere: "b" stays put, "c" trains.
        one_step(engine, batch(16, {"a": True, "b": False, "c": rank == 0}, 10 + rank), specs, absent=["b"])
        after = {t: snapshot(t) for t in TASKS}
        result[name] = {
            "b_frozen": all(torch.equal(x, y) for x, y in zip(before["b"], after["b"])),
            "c_moved": not all(torch.equal(x, y) for x, y in zip(before["c"], after["c"])),
            "a_moved": not all(torch.equal(x, y) for x, y in zip(before["a"], after["a"])),
            "sharded": any(p.to_local().numel() < p.numel() for p in engine.params),
        }
    out[rank] = result
    D.shutdown()


def test_absent_task_slices_do_not_drift_under_fsdp():
    out = spawn_ranks(_absent_worker)
    for rank in (0, 1):
        for name, r in out[rank].items():
            assert r["sharded"], f"{name}: nothing was sharded"
            assert r["b_frozen"], f"rank {rank}, {name}: the absent task's parameters drifted"
            assert r["a_moved"] and r["c_moved"], f"rank {rank}, {name}: the present tasks did not train"


@pytest.mark.parametrize(("method", "what"), [("gradnorm", "last shared layer"), ("pcgrad", "shared parameters"),
                                               ("cagrad", "shared parameters")])
def test_weightings_needing_full_gradients_are_refused_with_fsdp(tmp_path, method, what):
    from conftest import write_recipe

    recipe = write_recipe(tmp_path, tmp_path, engine={"name": "fsdp"}, weighting={"name": method})
    with pytest.raises(ConfigError, match=rf"{method} needs per-task gradients of the {what}.*engine fsdp"):
        load_config(recipe)
    load_config(write_recipe(tmp_path, tmp_path, engine={"name": "fsdp"}, weighting={"name": "mgda"}))  # accepted


def test_affinity_and_freeze_are_refused_with_fsdp(tmp_path):
    from conftest import write_recipe

    with pytest.raises(ConfigError, match=r"monitor.affinity_every.*engine fsdp"):
        load_config(write_recipe(tmp_path, tmp_path, engine={"name": "fsdp"}, monitor={"affinity_every": 5}))
    with pytest.raises(ConfigError, match=r"trainer.freeze.*engine fsdp"):
        load_config(write_recipe(tmp_path, tmp_path, engine={"name": "fsdp"}, trainer={"freeze": ["experts"]}))
    with pytest.raises(ConfigError, match=r"engine.fsdp.min_unit_params"):
        load_config(write_recipe(tmp_path, tmp_path, engine={"name": "fsdp", "fsdp": {"min_unit_params": -1}}))
