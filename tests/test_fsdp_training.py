"""A user's story with `engine: fsdp` on 2 real torchrun ranks: it trains like DDP (same
first loss bit for bit: same initial weights; then the same losses up to float rounding of the
reduce-scatter), a SIGTERM-preempted run resumed is bit-identical to an uninterrupted one, and
the sharded checkpoint of 2 ranks resumes on 1 with exactly the saved model and optimizer
state."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import REFERENCE_STEPS, small_recipe, spawn_ranks, torchrun
from test_resume import assert_same_run, final_params, losses, preempt

FSDP = {"engine": {"name": "fsdp", "fsdp": {"min_unit_params": 0}}}  # every layer its own unit
STEPS = REFERENCE_STEPS


@pytest.fixture(scope="module")
def fsdp_reference(tmp_path_factory, demo_shards) -> Path:
    """One uninterrupted 2-rank FSDP run of the DDP reference's recipe: its run directory."""
    tmp = tmp_path_factory.mktemp("fsdp_reference")
    torchrun(small_recipe(tmp, demo_shards, "ref", **FSDP))
    return tmp / "ref" / "run"


def test_fsdp_trains_like_ddp(fsdp_reference, ddp_reference):
    got, want = losses(fsdp_reference), losses(ddp_reference)
    assert sorted(got) == list(range(1, STEPS + 1))
    # Step 1's loss comes from the initial weights alone: FSDP built them on the meta device
    # and filled its shards, DDP built the whole model; they must be the same bits.
    assert got[1]["train/loss"] == want[1]["train/loss"]
    # Afterwards only the order of float additions in the gradient reduction differs.
    for step in want:
        for key, value in want[step].items():
            assert got[step][key] == pytest.approx(value, rel=1e-4, abs=1e-6), (step, key)
    a, b = final_params(fsdp_reference), final_params(ddp_reference)  # fsdp: read whole from DCP
    assert sorted(a) == sorted(b)
    assert max(float((a[k] - b[k]).abs().max()) for k in b) < 1e-4
    # eval / predict / export load the run like any other: the full model, read from the shards
    from manytask.trainer.model_io import load_trained

    loaded = load_trained(fsdp_reference)
    assert loaded.step == STEPS
    assert all(torch.equal(v, a[k]) for k, v in loaded.model.state_dict().items() if k in a)


def test_fsdp_sigterm_resume_is_bitwise(tmp_path, demo_shards, fsdp_reference):
    recipe = small_recipe(tmp_path, demo_shards, "preempted", **FSDP)
    run = tmp_path / "preempted" / "run"
    preempt(recipe, run, 25)
    torchrun(recipe)  # resume: auto
    assert_same_run(run, fsdp_reference)


def _restore_on_one_rank(rank: int, port: int, out: dict) -> None:
    from manytask.config import load_config
    from manytask.trainer.loop import build_job

    torch.set_num_threads(1)
    recipe, step_dir = os.environ["FSDP_TEST_RECIPE"], os.environ["FSDP_TEST_CKPT"]
    overrides = [f"run.dir={os.environ['FSDP_TEST_RUN']}", f"run.resume={step_dir}", "logging.wandb=false"]
    job = build_job(load_config(recipe, overrides))
    try:
        params = {n: p.detach().full_tensor().clone() for n, p in job.engine.module.named_parameters()}
        fqn = {id(p): n for n, p in job.engine.module.named_parameters()}
        optim = {fqn[id(p)]: {k: v.full_tensor().clone() if hasattr(v, "full_tensor") else v.clone()
                              for k, v in state.items()} for p, state in job.engine.optimizer.state.items()}
        out[rank] = {"step": job.step, "lr": job.engine.lr, "params": params, "optim": optim}
    finally:
        job.close()


def test_fsdp_checkpoint_of_2_ranks_resumes_on_1(tmp_path, fsdp_reference):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    run = tmp_path / "run"
    shutil.copytree(fsdp_reference, run)
    recipe = tmp_path / "recipe.yaml"
    shutil.copy(fsdp_reference.parent / "recipe.yaml", recipe)
    step_dir = tmp_path / "step_00000040"  # kept aside: the resumed job prunes it
    shutil.copytree(run / "ckpt" / step_dir.name, step_dir)
    # The job carries on from the last checkpoint on one rank to the end, every step logged once.
    proc = torchrun(recipe, f"run.dir={run}", f"trainer.max_steps={STEPS + 5}", "logging.wandb=false", nproc=1)
    assert f"resumed from {run / 'ckpt' / 'step_00000060'}" in proc.stdout
    assert sorted(losses(run)) == list(range(1, STEPS + 6))
    # What it restored is exactly what 2 ranks saved: model, optimizer state and LR, read whole.
    dcp_to_torch_save(step_dir / "engine" / "fsdp", tmp_path / "saved.pt")
    saved = torch.load(tmp_path / "saved.pt", weights_only=True)["fsdp"]
    os.environ.update(FSDP_TEST_RECIPE=str(recipe), FSDP_TEST_RUN=str(run), FSDP_TEST_CKPT=str(step_dir))
    try:
        got = spawn_ranks(_restore_on_one_rank, nprocs=1)[0]
    finally:
        for key in ("FSDP_TEST_RECIPE", "FSDP_TEST_RUN", "FSDP_TEST_CKPT"):
            del os.environ[key]
    assert got["step"] == 40
    assert got["lr"] == _rows(fsdp_reference)[40]["perf/lr"]
    assert sorted(got["params"]) == sorted(saved["model"])
    assert all(torch.equal(got["params"][k], saved["model"][k]) for k in saved["model"]), "model resharded exactly"
    assert sorted(got["optim"]) == sorted(saved["optim"]["state"])
    for name, state in saved["optim"]["state"].items():
        for key, value in state.items():
            assert torch.equal(got["optim"][name][key], value), f"optimizer {name}.{key} differs after resharding"


def _rows(run: Path) -> dict[int, dict]:
    import json

    return {r["step"]: r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "perf/lr" in r}
