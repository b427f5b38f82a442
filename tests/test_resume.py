"""A user's story on a shared cluster: the job is preempted (SIGTERM) or killed (SIGKILL) or a
rank dies, it is started again, and the interrupted run is the same run as an uninterrupted
one — same per-step losses bit for bit, same final parameters, every step logged once."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from conftest import DEEPSPEED, REFERENCE_STEPS, ROOT, small_recipe, torchrun

from manytask.trainer.checkpoint import LATEST, read_model_state
from manytask.trainer.wandb_offline import find_offline_runs, read_history

STEPS = REFERENCE_STEPS


def losses(run_dir: Path) -> dict[int, dict[str, float]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "train/loss" in r]
    assert len(steps) == len(set(steps)), f"a step was logged twice: {sorted(steps)}"
    return {r["step"]: {k: v for k, v in r.items() if k.startswith("train/")} for r in rows if "train/loss" in r}


def final_params(run_dir: Path) -> dict[str, torch.Tensor]:
    latest = (run_dir / "ckpt" / LATEST).read_text().strip()
    return read_model_state(run_dir / "ckpt" / latest)[1]


def start(recipe: Path, *overrides: str, nproc: int = 2, extra: tuple[str, ...] = ()) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *extra,
           "-m", "manytask.launch.cli", "train", str(recipe), *overrides]
    return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def logged_steps(run_dir: Path) -> list[int]:
    """Steps in metrics.jsonl so far (a line being written right now is ignored)."""
    path = run_dir / "metrics.jsonl"
    steps = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            steps.append(json.loads(line)["step"])
        except ValueError:
            pass
    return steps


def wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        done = logged_steps(run_dir)
        if done and max(done) >= step:
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended early:\n{proc.stdout.read()[-4000:]}")
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached")


def assert_same_run(run: Path, ref: Path) -> None:
    got, want = losses(run), losses(ref)
    assert sorted(got) == list(range(1, STEPS + 1)), "every step logged exactly once"
    differ = {step: (got[step], want[step]) for step in want if got[step] != want[step]}
    assert not differ, f"steps differ from the uninterrupted run: {differ}"
    a, b = final_params(run), final_params(ref)
    assert all(torch.equal(a[k], b[k]) for k in b), "final parameters differ"


def preempt(recipe: Path, run: Path, at_step: int) -> int:
    """Start the recipe on 2 ranks, SIGTERM every process of the job (as SLURM does) once
    `at_step` is logged; returns the step the job stopped at."""
    proc = start(recipe)
    wait_for_step(run, at_step, proc)
    os.killpg(proc.pid, signal.SIGTERM)
    # The signal is delivered now; the step being computed may already be past its agreement
    # point, so the job stops after at most the next one. `seen` is a lower bound of the step
    # the ranks were at: rank 0 may have finished a step whose metrics line is not on disk yet.
    seen = max(logged_steps(run))
    out, _ = proc.communicate(timeout=120)
    assert "preemption signal: stopping at step" in out, out[-3000:]
    assert "ChildFailedError" not in out, "every rank exited 0"
    stopped = int(out.split("preemption signal: stopping at step ")[1].split()[0])
    assert at_step <= stopped <= seen + 3, f"stopped at {stopped}, signal sent after step {seen} (logged)"
    assert (run / "ckpt" / LATEST).read_text().strip() == f"step_{stopped:08d}", "saved where it stopped"
    return stopped


def test_sigterm_stops_all_ranks_saves_exits_0_and_resumes_bitwise(tmp_path, demo_shards, ddp_reference):
    recipe = small_recipe(tmp_path, demo_shards, "preempted", logging={"wandb": True})
    run = tmp_path / "preempted" / "run"
    preempt(recipe, run, 25)
    torchrun(recipe)  # resume: auto
    assert_same_run(run, ddp_reference)
    # W&B: the resumed run continues the same run id; offline that is a second folder, and
    # together the folders hold every step exactly once.
    folders = find_offline_runs(run / "wandb")
    assert len(folders) == 2 and len({f.name.rsplit("-", 1)[1] for f in folders}) == 1
    logged = [row["step"] for row in read_history(run / "wandb") if "train/loss" in row]
    assert sorted(logged) == list(range(1, STEPS + 1))


def test_sigkill_after_checkpoint_resumes_bitwise(tmp_path, demo_shards, ddp_reference):
    recipe = small_recipe(tmp_path, demo_shards, "killed")
    run = tmp_path / "killed" / "run"
    proc = start(recipe)
    wait_for_step(run, 48, proc)  # checkpoints at 20 and 40; steps 41.. are lost with the kill
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert (run / "ckpt" / LATEST).read_text().strip() == "step_00000040"
    torchrun(recipe)
    assert_same_run(run, ddp_reference)


def test_deepspeed_sigterm_resume_is_bitwise(tmp_path, demo_shards, deepspeed_reference):
    recipe = small_recipe(tmp_path, demo_shards, "ds_preempted", **DEEPSPEED)
    run = tmp_path / "ds_preempted" / "run"
    preempt(recipe, run, 25)
    torchrun(recipe)
    assert_same_run(run, deepspeed_reference)


def test_rank_killed_under_launch_max_restarts_completes(tmp_path, demo_shards):
    recipe = small_recipe(tmp_path, demo_shards, "crash")
    run = tmp_path / "crash" / "run"
    proc = start(recipe, extra=("--max-restarts=2",))
    wait_for_step(run, 25, proc)
    ranks = subprocess.run(["pgrep", "-f", "-P", str(proc.pid), "manytask.launch.cli"], capture_output=True, text=True)
    os.kill(int(ranks.stdout.split()[-1]), signal.SIGKILL)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-4000:]
    assert "resumed from" in out, out[-5000:]
    assert sorted(losses(run)) == list(range(1, STEPS + 1)), "every step logged exactly once"


def test_resume_with_a_different_world_size_finishes(tmp_path, ddp_reference):
    """The 2-rank reference run continued on 1 rank: no crash, every step once (README says
    which samples of the current epoch are replayed)."""
    run = tmp_path / "run"
    shutil.copytree(ddp_reference, run)
    shutil.rmtree(run / "wandb")
    recipe = tmp_path / "recipe.yaml"
    shutil.copy(ddp_reference.parent / "recipe.yaml", recipe)
    proc = torchrun(recipe, f"run.dir={run}", f"trainer.max_steps={STEPS + 10}", "logging.wandb=false", nproc=1)
    assert "resumed from" in proc.stdout
    assert sorted(losses(run)) == list(range(1, STEPS + 11))
