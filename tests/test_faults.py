"""Faults injected on purpose into real 2-rank runs: the promised outcome, each time.

A damaged newest checkpoint (256 bytes overwritten inside `common.pt`, or inside one rank's
file) is never loaded: the relaunch falls back to the previous checkpoint, says which file
was bad, and finishes with exactly the uninterrupted run's model.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import torchrun
from test_checkpoint_verified import damage
from test_resume import assert_same_run

from manytask.trainer.checkpoint import COMMON, LATEST


def copy_of(reference: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A private copy of the finished reference run (checkpoints 40 and 60) and its recipe."""
    run = tmp_path / "run"
    shutil.copytree(reference, run, ignore=shutil.ignore_patterns("wandb"))
    recipe = tmp_path / "recipe.yaml"
    shutil.copy(reference.parent / "recipe.yaml", recipe)
    return run, recipe


@pytest.mark.parametrize("bad_file", [COMMON, "rank_00001.pt"])
def test_damaged_newest_checkpoint_resumes_from_the_previous_one(tmp_path, ddp_reference, bad_file):
    run, recipe = copy_of(ddp_reference, tmp_path)
    newest = run / "ckpt" / "step_00000060"
    assert (run / "ckpt" / LATEST).read_text().strip() == newest.name
    damage(newest / bad_file)
    proc = torchrun(recipe, f"run.dir={run}", "logging.wandb=false")
    out = proc.stdout + proc.stderr
    assert f"skipping checkpoint {newest}: corrupt {bad_file}" in out, out[-3000:]
    assert f"warning: skipping checkpoint {newest}: corrupt {bad_file}" in (run / "train.log").read_text()
    assert f"resumed from {run / 'ckpt' / 'step_00000040'} at step 40" in out
    assert_same_run(run, ddp_reference)  # steps 41..60 again, bit for bit


# --------------------------------------------------------------------------- the run lock
def test_run_lock_refuses_a_live_owner_and_takes_over_stale_ones(tmp_path):
    import os
    import subprocess
    import sys
    import time

    from manytask.trainer.run_lock import LOCK_FILE, RunLock, RunLocked, read_owner

    first = RunLock(tmp_path, lease=60)
    me = first.acquire()
    with pytest.raises(RunLocked, match=f"in use by another job \\(pid {os.getpid()} on host {me.host}"):
        RunLock(tmp_path, lease=60).acquire()
    first.refresh()
    assert read_owner(tmp_path / LOCK_FILE).refreshed >= me.started
    first.release()
    assert not (tmp_path / LOCK_FILE).exists()

    # A lock left by a process that is gone (this host): taken over with a warning.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    gone = RunLock(tmp_path, lease=60)
    gone.acquire()
    gone._stop.set()
    text = (tmp_path / LOCK_FILE).read_text().replace(f'"pid": {os.getpid()}', f'"pid": {int(dead.stdout)}')
    (tmp_path / LOCK_FILE).write_text(text)
    taker = RunLock(tmp_path, lease=60)
    with pytest.warns(UserWarning, match=f"taking over stale run lock .*process {int(dead.stdout)} on this host is gone"):
        taker.acquire()
    taker._stop.set()

    # A live owner (another host, say) that stopped refreshing for longer than the lease.
    text = (tmp_path / LOCK_FILE).read_text()
    owner = read_owner(tmp_path / LOCK_FILE)
    (tmp_path / LOCK_FILE).write_text(text.replace(f'"refreshed": {owner.refreshed}', f'"refreshed": {time.time() - 120}'))
    taker = RunLock(tmp_path, lease=60)
    with pytest.warns(UserWarning, match="last refreshed 1[12]\\d s ago \\(lease 60 s\\)"):
        taker.acquire()
    taker.release()
    assert not (tmp_path / LOCK_FILE).exists()


def test_damaged_deepspeed_file_falls_back_and_resumes_exactly(tmp_path, deepspeed_reference):
    """DeepSpeed's own ZeRO files are checksummed too: one rank's optimizer shard damaged."""
    run, recipe = copy_of(deepspeed_reference, tmp_path)
    newest = run / "ckpt" / "step_00000060"
    shard = sorted((newest / "engine").rglob("*rank_1*optim_states.pt")) or sorted((newest / "engine").rglob("*.pt"))
    damage(shard[0])
    proc = torchrun(recipe, f"run.dir={run}", "logging.wandb=false")
    out = proc.stdout + proc.stderr
    assert f"skipping checkpoint {newest}: corrupt {shard[0].relative_to(newest)}" in out, out[-3000:]
    assert "resumed from" in out and "step_00000040 at step 40" in out
    assert_same_run(run, deepspeed_reference)
