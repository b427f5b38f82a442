"""Signals and concurrent jobs, with real processes: `manytask launch` stopped by SIGTERM or
SIGINT checkpoints every rank and exits 0 / 130; killed with SIGKILL it leaves no worker
behind; a second job on a busy run directory refuses naming the owner; Ctrl-C of a lone
`manytask train` checkpoints; a finished run started again says so and exits 0."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import ROOT, small_recipe, torchrun
from test_faults import copy_of
from test_resume import assert_same_run, logged_steps, wait_for_step

from manytask.launch.cli import main
from manytask.trainer.checkpoint import LATEST
from manytask.trainer.run_lock import LOCK_FILE, read_owner


def launch(recipe: Path, *args: str) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "manytask.launch.cli", *args, str(recipe)]
    return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def stopped_at(out: str) -> int:
    assert "preemption signal: stopping at step" in out, out[-3000:]
    return int(out.split("preemption signal: stopping at step ")[1].split()[0])


def processes_running(recipe: Path) -> list[str]:
    found = subprocess.run(["pgrep", "-af", str(recipe)], capture_output=True, text=True).stdout
    return [line for line in found.splitlines() if "pgrep" not in line]


def test_sigterm_to_launcher_checkpoints_exits_0_and_resumes_exactly(tmp_path, demo_shards, ddp_reference):
    recipe = small_recipe(tmp_path, demo_shards, "job")
    run = tmp_path / "job" / "run"
    proc = launch(recipe, "launch", "--nproc", "2")
    wait_for_step(run, 10, proc)
    os.kill(proc.pid, signal.SIGTERM)  # the launcher only, as a scheduler would
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, out[-4000:]
    assert "Traceback" not in out and "ChildFailedError" not in out
    step = stopped_at(out)
    assert step < 60 and (run / "ckpt" / LATEST).read_text().strip() == f"step_{step:08d}"
    assert not (run / LOCK_FILE).exists(), "the lock is released at the end"
    torchrun(recipe)
    assert_same_run(run, ddp_reference)


def test_sigterm_to_every_process_of_the_job_exits_0(tmp_path, demo_shards):
    """What SLURM does at the end of a job's time: SIGTERM to the launcher, torchrun and every
    rank at once. torchrun does not tear the ranks down; they checkpoint and all exit 0."""
    recipe = small_recipe(tmp_path, demo_shards, "job", trainer={"max_steps": 5000})
    run = tmp_path / "job" / "run"
    proc = launch(recipe, "launch", "--nproc", "2")
    wait_for_step(run, 5, proc)
    pids = [int(line.split()[0]) for line in processes_running(recipe)]
    assert len(pids) >= 4  # launcher, torchrun, 2 ranks (and their DataLoader workers)
    for pid in pids:
        os.kill(pid, signal.SIGTERM)
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, out[-4000:]
    assert "Traceback" not in out and "ChildFailedError" not in out
    step = stopped_at(out)
    assert (run / "ckpt" / LATEST).read_text().strip() == f"step_{step:08d}"


def test_second_job_refuses_naming_the_owner_and_sigint_exits_130_after_checkpoint(tmp_path, demo_shards, capsys):
    recipe = small_recipe(tmp_path, demo_shards, "job", trainer={"max_steps": 5000})
    run = tmp_path / "job" / "run"
    first = launch(recipe, "launch", "--nproc", "2")
    wait_for_step(run, 5, first)
    owner = read_owner(run / LOCK_FILE)
    assert owner is not None

    second = launch(recipe, "launch", "--nproc", "2")  # refused before starting any process
    out, _ = second.communicate(timeout=120)
    assert second.returncode == 2, out
    assert f"in use by another job (pid {owner.pid} on host {owner.host}" in out
    assert main(["train", str(recipe)]) == 2  # the job itself checks too (e.g. started by plain torchrun)
    assert f"pid {owner.pid} on host {owner.host}" in capsys.readouterr().err
    assert first.poll() is None, "the first job is untouched"

    os.kill(first.pid, signal.SIGINT)
    out, _ = first.communicate(timeout=180)
    assert first.returncode == 130, out[-4000:]
    step = stopped_at(out)
    assert (run / "ckpt" / LATEST).read_text().strip() == f"step_{step:08d}"
    assert not (run / LOCK_FILE).exists()


def test_sigkill_of_launcher_leaves_no_worker(tmp_path, demo_shards):
    recipe = small_recipe(tmp_path, demo_shards, "job", trainer={"max_steps": 400})
    run = tmp_path / "job" / "run"
    proc = launch(recipe, "launch", "--nproc", "2")
    wait_for_step(run, 5, proc)
    assert len(processes_running(recipe)) >= 3  # launcher, torchrun, ranks
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    deadline = time.time() + 90
    while processes_running(recipe) and time.time() < deadline:
        time.sleep(0.5)
    assert not processes_running(recipe), processes_running(recipe)
    assert max(logged_steps(run)) < 400, "the workers stopped instead of training on to the end"
    latest = (run / "ckpt" / LATEST).read_text().strip()
    assert int(latest.split("_")[1]) >= 5, "the ranks checkpointed as they stopped"


def test_ctrl_c_of_a_single_process_checkpoints(tmp_path, demo_shards):
    recipe = small_recipe(tmp_path, demo_shards, "job", trainer={"max_steps": 400})  # 2 DataLoader workers
    run = tmp_path / "job" / "run"
    proc = launch(recipe, "train")
    wait_for_step(run, 8, proc)
    os.killpg(proc.pid, signal.SIGINT)  # as a terminal does: the whole process group, workers too
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out[-3000:]
    step = stopped_at(out)
    assert step >= 8 and (run / "ckpt" / LATEST).read_text().strip() == f"step_{step:08d}"


def test_finished_run_started_again_says_so_and_exits_0(tmp_path, ddp_reference, capsys):
    run, recipe = copy_of(ddp_reference, tmp_path)
    before = (run / "metrics.jsonl").read_text()
    assert main(["train", str(recipe), f"run.dir={run}", "logging.wandb=true"]) == 0
    assert not (run / "wandb").exists(), "no W&B run opened for nothing"
    out = capsys.readouterr().out
    assert "already finished: it is at step 60, trainer.max_steps is 60" in out
    assert "finished 60 steps. validation:" not in out
    assert (run / "metrics.jsonl").read_text() == before
    history = [json.loads(x) for x in (run / "config_history.jsonl").read_text().splitlines()]
    assert history[-1]["step"] == 60
