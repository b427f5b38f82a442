"""Every weighting DeepSpeed accepts is exact under ZeRO-2 and ZeRO-3: the fixed global batch
of `test_weightings_catalogue` (one task absent from one rank's half) split over 2 real gloo
ranks running DeepSpeed trains to the same parameters as one process on the whole batch.

Under ZeRO-3 every parameter is partitioned across the ranks: the Gram-matrix methods,
GradNorm and MGDA take their per-task backward passes over one forward
(`sharded_gradients.ZeroSharding`), each rank keeps only its partition of every task's
gradient, and the Gram matrix is the sum of the partitions' partial products.
"""

from __future__ import annotations

import gc
import os

import pytest
import torch
import torch.distributed as dist
from conftest import ROOT, all_reduce_mean, spawn_ranks
from test_weightings_catalogue import (
    BATCH,
    NO_COLLECTIVE,
    STEPS,
    TASKS,
    Toy,
    context,
    global_batch,
    train,
)

from manytask.config import WeightingConfig
from manytask.models.spec import ModelOutput
from manytask.trainer.weightings import WEIGHTINGS, build_weighting
from manytask.trainer.weightings.sharded_gradients import ZeroSharding

pytestmark = pytest.mark.slow

WORLD = 2
# Every weighting at ZeRO-2 and at every stage its registry entry accepts from 3 down; the
# surgery methods, which write the engine's gradients themselves, at stages 0 and 1 too.
RUNS = [f"{stage}/{m}" for m, cls in WEIGHTINGS.items() for stage in (0, 1, 2, 3)
        if stage in cls.deepspeed_stages and (stage >= 2 or cls.surgery)]


class ToyModel(Toy):
    """The same toy, returning the trainer's `ModelOutput` (its masked losses as `outputs`, Z
    as `shared`), so DeepSpeed's engine sees the output type it sees in training."""

    def forward(self, x, y, masks) -> ModelOutput:
        z, losses = super().forward(x, y, masks)
        return ModelOutput(outputs=losses, shared=z)


def train_zero(method: str, stage: int, rank: int, all_reduce_mean) -> torch.Tensor:
    """`catalogue.train` (STEPS steps of plain SGD, lr 0.1) with DeepSpeed ZeRO-`stage` as the
    engine: forward, combine, `engine.backward`, `engine.step`; every parameter, gathered."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    # Buckets sized for the toy: DeepSpeed's default (5e8 elements) allocates a 2 GB buffer.
    buckets = {k: 1 << 12 for k in ("reduce_bucket_size", "allgather_bucket_size", "stage3_prefetch_bucket_size",
                                     "stage3_max_live_parameters", "stage3_max_reuse_distance")}
    config = {
        "train_micro_batch_size_per_gpu": BATCH // WORLD, "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0, "zero_optimization": {"stage": stage, **(buckets if stage else {})},
        "zero_allow_untested_optimizer": True, "steps_per_print": 10**9, "wall_clock_breakdown": False,
    }
    with deepspeed.zero.Init(config_dict_or_path=config, enabled=stage == 3, mem_efficient_linear=False):
        model = ToyModel()
    weighting = build_weighting(WeightingConfig(method), TASKS)
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), config=config)
    sharding = ZeroSharding(engine.module) if stage == 3 else None
    own = list(weighting.parameters())  # learnable loss weights live outside the engine
    for step in range(STEPS):
        x, y, masks = global_batch(step, balanced=method in NO_COLLECTIVE)
        half = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
        out = engine(x[half], y[half], masks[half])
        losses = out.outputs
        ctx = context(engine.module, out.shared, masks[half], all_reduce_mean, step)
        ctx.sharding = sharding
        total, _ = weighting.combine(losses, ctx)
        for p in own:
            p.grad = None
        engine.backward(total)
        weighting.before_step()  # gradient surgery (pcgrad, db_mtl), as the trainer does
        engine.step()
        with torch.no_grad():
            for p in own:
                if p.grad is not None:
                    p -= 0.1 * all_reduce_mean(p.grad)
    # ZeRO's fp32 master (gathered under ZeRO-3); stage 0 keeps plain parameters
    params = [(safe_get_full_fp32_param(p) if stage else p).detach().reshape(-1) for p in engine.module.parameters()]
    engine.destroy()
    return torch.cat([*params, *(p.detach().reshape(-1) for p in own)])


def _rank_train(rank: int, port: int, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank))
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".venv" / "torch_extensions"))
    torch.set_num_threads(1)
    import deepspeed

    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    deepspeed.init_distributed(dist_backend="gloo")
    # ZeRO-3's initialize runs gc.collect(): leave the imported modules' objects out of it
    gc.freeze()

    try:
        for run in RUNS:
            stage, method = run.split("/")
            result = train_zero(method, int(stage), rank, all_reduce_mean)
            if rank == 0:
                out[run] = result.tolist()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def zero_params() -> dict:
    return spawn_ranks(_rank_train, nprocs=WORLD)


@pytest.mark.parametrize("run", RUNS)
def test_zero_trains_like_one_process_on_the_whole_batch(run: str, zero_params) -> None:
    """Relative tolerance 1e-5 on every parameter after 4 steps, as for DDP (float32; the runs
    differ only in the order of the sums)."""
    torch.set_num_threads(1)
    method = run.split("/")[1]
    one = train(method, 0, 1, lambda t: t)
    zero = torch.tensor(zero_params[run], dtype=one.dtype)
    assert not torch.equal(one, train_untrained(method)), "the parameters moved"
    torch.testing.assert_close(zero, one, rtol=1e-5, atol=1e-6)


def train_untrained(method: str) -> torch.Tensor:
    """The parameters before any step, laid out like `train`'s result."""
    model, weighting = Toy(), build_weighting(WeightingConfig(method), TASKS)
    return torch.cat([p.detach().reshape(-1) for p in [*model.parameters(), *weighting.parameters()]])


@pytest.mark.parametrize("weighting", ["nash_mtl"])
def test_trainer_runs_a_gram_method_under_zero3_like_zero2(tmp_path, demo_shards, weighting):
    """The trainer's own path (DeepSpeedEngine.sharding into the weighting's context), with
    gradient accumulation: under ZeRO-3 the first steps' losses and Nash-MTL's weights follow
    ZeRO-2's, whose per-task gradients are whole on every rank."""
    from conftest import small_recipe, torchrun

    from manytask.trainer.logger import read_metrics

    rows = {}
    for stage in (2, 3):
        recipe = small_recipe(tmp_path, demo_shards, f"zero{stage}", weighting={"name": weighting},
                              engine={"name": "deepspeed", "deepspeed": {"zero_optimization": {"stage": stage}}},
                              data={"num_workers": 0}, trainer={"max_steps": 4, "grad_accum": 2})
        torchrun(recipe, timeout=300)
        rows[stage] = [r for r in read_metrics(tmp_path / f"zero{stage}" / "run") if "train/loss" in r]
    assert [r["step"] for r in rows[3]] == [r["step"] for r in rows[2]] == [1, 2, 3, 4]
    keys = [k for k in rows[2][0] if k.startswith(("train/", "weights/"))]
    assert any(k.startswith("weights/") for k in keys)
    for r2, r3 in zip(rows[2], rows[3]):
        for k in keys:
            assert r3[k] == pytest.approx(r2[k], rel=1e-4, abs=1e-6), (r2["step"], k)
    assert rows[3][-1]["train/loss"] != pytest.approx(rows[3][0]["train/loss"], rel=1e-3)  # it trained
