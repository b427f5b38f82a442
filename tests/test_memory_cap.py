"""Issue 19's proof that sharding saves memory: a model whose DDP training does not fit under a
per-process memory cap trains under ZeRO-3 on 2 ranks under the same cap — to the losses of an
uncapped ZeRO-2 run — and checkpoints and resumes there bit-exactly.

The cap is RLIMIT_DATA (`prlimit --data`, what `ulimit -d` sets), set before torchrun starts, so
every process of the job — the launcher and both ranks — runs under it; memory beyond it fails
to allocate as it would on a machine that has no more. Real processes, gloo, CPU.

The model: MMoE with 8 experts [2048, 3072] (50M parameters; 16 bytes each under DDP with AdamW,
~0.8 GiB of model state per rank, 8 under ZeRO-3 on 2 ranks), batch 8, 3 steps.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from conftest import torchrun, write_recipe

from manytask.trainer.checkpoint import LATEST
from manytask.trainer.ds_checkpoint import DEEPSPEED_SAFE_GLOBALS

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_DATA caps are Linux's")

CAP_MIB = 1250  # per process: above ZeRO-3's need on 2 ranks, below DDP's (see the module docstring)
STEPS = 3
# ZeRO-2 and ZeRO-3 sum gradients in a different order (bucketed all-reduce vs per-expert
# reduce-scatter): the same fp32 training, equal to rounding
LOSS_RTOL = 1e-4


def recipe(tmp: Path, shards: Path, name: str, stage: int | None) -> Path:
    engine = {"name": "ddp"} if stage is None else {
        "name": "deepspeed", "deepspeed": {"zero_optimization": {"stage": stage}}}
    folder = tmp / name
    folder.mkdir()
    return write_recipe(
        folder, shards,
        data={"batch_size": 8, "num_workers": 0, "shuffle_buffer": 64, "val_batch_size": 16, "val_max_batches": 1},
        model={"name": "mmoe", "params": {"num_experts": 8, "expert_hidden": [2048, 3072], "tower_hidden": [8]}},
        trainer={"max_steps": STEPS, "lr": 0.001, "warmup_steps": 0, "log_every": 1, "eval_every": 10**6},
        checkpoint={"every": 2, "keep_last": 3},
        logging={"wandb": False, "progress": False, "heatmap_every": 0},
        engine=engine,
    )


def losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def engine_tensors(checkpoint: Path) -> dict[str, torch.Tensor]:
    """Every tensor DeepSpeed wrote for the checkpoint (both ranks' parameter and optimizer
    partitions), flattened to `file/key/...` names."""
    found: dict[str, torch.Tensor] = {}

    def walk(prefix: str, value) -> None:
        if torch.is_tensor(value):
            found[prefix] = value
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}/{k}", v)
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                walk(f"{prefix}/{i}", v)

    for path in sorted((checkpoint / "engine").rglob("*.pt")):
        with torch.serialization.safe_globals(DEEPSPEED_SAFE_GLOBALS):
            walk(path.name, torch.load(path, map_location="cpu", weights_only=True))
    return found


def test_zero3_trains_and_resumes_under_a_cap_ddp_cannot_fit(tmp_path, demo_shards):
    # DDP: every rank holds the whole model, its gradients and both AdamW moments -> out of memory
    ddp = torchrun(recipe(tmp_path, demo_shards, "ddp", None), data_cap_mib=CAP_MIB, check=False, timeout=300)
    assert ddp.returncode != 0, "DDP fitted under the cap: the model is too small to prove anything"
    assert "manytask: out of memory on rank" in ddp.stderr, ddp.stderr[-3000:]
    assert "zero_optimization stage 3" in ddp.stderr  # the message names the fix

    # ZeRO-2 without a cap: the reference losses
    torchrun(recipe(tmp_path, demo_shards, "zero2", 2), timeout=300)
    reference = losses(tmp_path / "zero2" / "run")

    # ZeRO-3 under the cap: the same training
    zero3_recipe = recipe(tmp_path, demo_shards, "zero3", 3)
    torchrun(zero3_recipe, data_cap_mib=CAP_MIB, timeout=300)
    run = tmp_path / "zero3" / "run"
    capped = losses(run)
    assert sorted(capped) == list(range(1, STEPS + 1))
    for step, loss in reference.items():
        assert capped[step] == pytest.approx(loss, rel=LOSS_RTOL), f"step {step}: {capped[step]} vs {loss}"

    # ... checkpointed at step 2 and resumed under the cap: the last steps and the final
    # parameter and optimizer partitions are bit-identical to the uninterrupted capped run
    final = run / "ckpt" / (run / "ckpt" / LATEST).read_text().strip()
    resumed = tmp_path / "resumed"
    shutil.copytree(run, resumed)
    shutil.rmtree(resumed / "ckpt" / final.name)
    (resumed / "ckpt" / LATEST).write_text("step_00000002\n")
    (resumed / "metrics.jsonl").write_text(
        "".join(line + "\n" for line in (run / "metrics.jsonl").read_text().splitlines()
                if json.loads(line).get("step", 0) <= 2))
    torchrun(zero3_recipe, f"run.dir={resumed}", data_cap_mib=CAP_MIB, timeout=300)
    assert losses(resumed) == capped
    want, got = engine_tensors(final), engine_tensors(resumed / "ckpt" / final.name)
    assert want and sorted(got) == sorted(want)
    assert all(torch.equal(got[k], want[k]) for k in want), "resumed partitions differ"


def test_only_out_of_memory_errors_get_the_sharding_advice(monkeypatch):
    from manytask.trainer.memory import out_of_memory_message

    monkeypatch.setenv("RANK", "1")
    cpu = RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 268435456 bytes. "
                       "Error code 12 (Cannot allocate memory)")
    assert out_of_memory_message(cpu).startswith("out of memory on rank 1 (DefaultCPUAllocator: can't allocate")
    assert "zero_optimization stage 3" in out_of_memory_message(cpu)
    assert out_of_memory_message(MemoryError()).startswith("out of memory on rank 1 (MemoryError)")
    assert out_of_memory_message(RuntimeError("mat1 and mat2 shapes cannot be multiplied")) is None
    assert out_of_memory_message(ValueError("out of memory")) is None  # not an allocator's error
