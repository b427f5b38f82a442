"""A user's story on a shared cluster: the job is preempted (SIGTERM) or killed (SIGKILL) or a
rank dies, it is started again, and the interrupted run is the same run as an uninterrupted
one — same per-step losses bit for bit, same final parameters, every step logged once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, torchrun, write_recipe

from manytask.trainer.checkpoint import LATEST
from manytask.trainer.wandb_offline import find_offline_runs, read_history

STEPS = 30


def small_recipe(tmp_path: Path, shards: Path, name: str, **sections) -> Path:
    base = dict(
        data={"batch_size": 64, "num_workers": 2, "shuffle_buffer": 512},
        model={"name": "mmoe", "params": {"num_experts": 3, "expert_hidden": [16], "tower_hidden": [8]}},
        trainer={"max_steps": STEPS, "log_every": 1, "eval_every": 1000, "warmup_steps": 3},
        checkpoint={"every": 10, "keep_last": 2},
        logging={"wandb": False, "progress": False, "heatmap_every": 0},
    )
    for key, value in sections.items():
        base.setdefault(key, {}).update(value)
    folder = tmp_path / name
    folder.mkdir()
    return write_recipe(folder, shards, **base)


def losses(run_dir: Path) -> dict[int, dict[str, float]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "train/loss" in r]
    assert len(steps) == len(set(steps)), f"a step was logged twice: {sorted(steps)}"
    return {r["step"]: {k: v for k, v in r.items() if k.startswith("train/")} for r in rows if "train/loss" in r}


def final_params(run_dir: Path) -> dict[str, torch.Tensor]:
    latest = (run_dir / "ckpt" / LATEST).read_text().strip()
    path = run_dir / "ckpt" / latest
    if (path / "deepspeed").exists():
        state = torch.load(path / "deepspeed" / "deepspeed" / "mp_rank_00_model_states.pt", weights_only=False)
        return state["module"]
    return torch.load(path / "common.pt", weights_only=True)["engine"]["model"]


def start(recipe: Path, *overrides: str, nproc: int = 2, extra: tuple[str, ...] = ()) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *extra,
           "-m", "manytask.launch.cli", "train", str(recipe), *overrides]
    return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    path = run_dir / "metrics.jsonl"
    while time.time() < deadline:
        if path.exists():
            done = [json.loads(x)["step"] for x in path.read_text().splitlines() if x.strip()]
            if done and max(done) >= step:
                return
        if proc.poll() is not None:
            raise AssertionError(f"run ended early:\n{proc.stdout.read()[-4000:]}")
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, demo_shards):
    """The uninterrupted run everything below is compared against (DDP, 2 ranks, 2 workers)."""
    tmp = tmp_path_factory.mktemp("reference")
    torchrun(small_recipe(tmp, demo_shards, "ref"))
    return tmp / "ref" / "run"


def assert_same_run(run: Path, ref: Path) -> None:
    got, want = losses(run), losses(ref)
    assert sorted(got) == list(range(1, STEPS + 1)), "every step logged exactly once"
    for step in want:
        assert got[step] == want[step], f"step {step}: {got[step]} != {want[step]}"
    a, b = final_params(run), final_params(ref)
    assert all(torch.equal(a[k], b[k]) for k in b), "final parameters differ"


def test_sigterm_stops_all_ranks_saves_exits_0_and_resumes_bitwise(tmp_path, demo_shards, reference):
    recipe = small_recipe(tmp_path, demo_shards, "preempted", logging={"wandb": True})
    run = tmp_path / "preempted" / "run"
    proc = start(recipe)
    wait_for_step(run, 13, proc)
    os.killpg(proc.pid, signal.SIGTERM)  # like SLURM: every process of the job gets it
    out, _ = proc.communicate(timeout=120)
    assert "preemption signal: stopping at step" in out, out[-3000:]
    stopped = int(out.split("preemption signal: stopping at step ")[1].split()[0])
    assert stopped < STEPS
    assert (run / "ckpt" / LATEST).read_text().strip() == f"step_{stopped:08d}", "saved where it stopped"
    assert "ChildFailedError" not in out, "every rank exited 0"
    torchrun(recipe)  # resume: auto
    assert_same_run(run, reference)
    # W&B: the resumed run continues the same run id; offline that is a second folder, and
    # together the folders hold every step exactly once.
    folders = find_offline_runs(run / "wandb")
    assert len(folders) == 2 and len({f.name.rsplit("-", 1)[1] for f in folders}) == 1
    logged = [row["step"] for row in read_history(run / "wandb") if "train/loss" in row]
    assert sorted(logged) == list(range(1, STEPS + 1))


def test_deepspeed_sigterm_resume_is_bitwise(tmp_path, demo_shards):
    ds = {"engine": {"name": "deepspeed", "deepspeed": {"zero_optimization": {"stage": 2}}},
          "data": {"num_workers": 0}}
    ref_recipe = small_recipe(tmp_path, demo_shards, "ds_ref", **ds)
    torchrun(ref_recipe)
    recipe = small_recipe(tmp_path, demo_shards, "ds_preempted", **ds)
    run = tmp_path / "ds_preempted" / "run"
    proc = start(recipe)
    wait_for_step(run, 13, proc)
    os.killpg(proc.pid, signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert "preemption signal: stopping at step" in out, out[-3000:]
    torchrun(recipe)
    assert_same_run(run, tmp_path / "ds_ref" / "run")


def test_sigkill_after_checkpoint_resumes_bitwise(tmp_path, demo_shards, reference):
    recipe = small_recipe(tmp_path, demo_shards, "killed")
    run = tmp_path / "killed" / "run"
    proc = start(recipe)
    wait_for_step(run, 24, proc)  # checkpoints at 10 and 20; steps 21.. are lost with the kill
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert (run / "ckpt" / LATEST).read_text().strip() == "step_00000020"
    torchrun(recipe)
    assert_same_run(run, reference)


def test_rank_killed_under_launch_max_restarts_completes(tmp_path, demo_shards):
    recipe = small_recipe(tmp_path, demo_shards, "crash")
    run = tmp_path / "crash" / "run"
    proc = start(recipe, extra=("--max-restarts=2",))
    wait_for_step(run, 15, proc)
    ranks = subprocess.run(["pgrep", "-f", "-P", str(proc.pid), "manytask.launch.cli"], capture_output=True, text=True)
    victim = int(ranks.stdout.split()[-1])
    os.kill(victim, signal.SIGKILL)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-4000:]
    assert "resumed from" in out, out[-5000:]
    steps = sorted(losses(run))
    assert steps == list(range(1, STEPS + 1)), "every step logged exactly once"


def test_resume_with_a_different_world_size_finishes(tmp_path, demo_shards):
    recipe = small_recipe(tmp_path, demo_shards, "rescale")
    run = tmp_path / "rescale" / "run"
    torchrun(recipe, "trainer.max_steps=10")
    proc = torchrun(recipe, nproc=1)
    assert "resumed from" in proc.stdout
    assert sorted(losses(run)) == list(range(1, STEPS + 1))
