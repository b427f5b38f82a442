"""Checkpoints verify every byte: a checkpoint whose file was damaged after it was written is
never loaded (the newest one that verifies is, with a warning naming the bad file), NaN or
inf parameters are never saved, and keep_last never deletes the checkpoint a run fell back to."""

from __future__ import annotations

import json

import pytest
import torch
from test_checkpoint import checkpointer, save

from manytask.trainer.checkpoint import (
    COMMON,
    COMPLETE,
    LATEST,
    CheckpointError,
    file_digest,
    latest_verified,
    read_model_state,
    verify_checkpoint,
)


def damage(path, offset: int | None = None) -> None:
    """Overwrite 256 bytes in the middle of `path` (size unchanged: only a checksum sees it)."""
    data = bytearray(path.read_bytes())
    at = len(data) // 2 if offset is None else offset
    data[at : at + 256] = bytes(255 - b for b in data[at : at + 256])
    path.write_bytes(bytes(data))


def test_complete_records_each_files_checksum_as_written(tmp_path):
    ck = checkpointer(tmp_path)
    path = save(ck, 10)
    files = json.loads((path / COMPLETE).read_text())["files"]
    assert sorted(files) == [COMMON, "rank_00000.pt"]
    for name, digest in files.items():
        assert file_digest(path / name) == digest
    assert verify_checkpoint(path) is None


@pytest.mark.parametrize("bad_file", [COMMON, "rank_00000.pt"])
def test_damaged_newest_checkpoint_falls_back_naming_the_file(tmp_path, bad_file):
    ck = checkpointer(tmp_path)
    save(ck, 10)
    newest = save(ck, 20)
    damage(newest / bad_file)
    with pytest.warns(UserWarning, match=f"skipping checkpoint .*step_00000020: corrupt {bad_file}.*checksum"):
        assert ck.resolve("auto").name == "step_00000010"
    with pytest.raises(CheckpointError, match=f"step_00000020: corrupt {bad_file}"):
        ck.resolve(str(newest))
    with pytest.warns(UserWarning, match=bad_file):
        assert latest_verified(tmp_path).name == "step_00000010"


def test_truncated_or_missing_file_is_named(tmp_path):
    ck = checkpointer(tmp_path)
    path = save(ck, 10)
    (path / "rank_00000.pt").write_bytes((path / "rank_00000.pt").read_bytes()[:50])
    assert "corrupt rank_00000.pt (size 50 bytes" in verify_checkpoint(path)
    (path / "rank_00000.pt").unlink()
    assert verify_checkpoint(path) == "missing file rank_00000.pt"


def test_nonfinite_parameters_are_never_saved(tmp_path):
    ck = checkpointer(tmp_path)
    save(ck, 10)
    ck.parts["engine"].obj.state = {"model": {"w": torch.ones(3), "tower.bias": torch.tensor([0.0, float("nan")])}}
    with pytest.raises(CheckpointError, match=r"step 20: 'engine\.model\.tower\.bias' holds NaN or inf"):
        ck.save(20)
    assert not (tmp_path / "step_00000020").exists() and not list(tmp_path.glob(".tmp-*"))
    assert (tmp_path / LATEST).read_text().strip() == "step_00000010"
    ck.parts["engine"].obj.state = {"optimizer": {"state": {0: {"exp_avg": torch.tensor([float("inf")])}}}}
    with pytest.raises(CheckpointError, match=r"'engine\.optimizer\.state\.0\.exp_avg'"):
        ck.save(20)


def test_keep_last_never_deletes_the_checkpoint_a_run_fell_back_to(tmp_path):
    ck = checkpointer(tmp_path, keep_last=1)
    save(ck, 10)
    ck.keep_last = 2
    save(ck, 20)
    damage(tmp_path / "step_00000020" / COMMON)
    with pytest.warns(UserWarning):
        assert ck.resolve("auto").name == "step_00000010"
    ck.keep_last = 1
    save(ck, 15)  # the resumed run's first checkpoint: the damaged, newer step 20 must not count
    with pytest.warns(UserWarning, match="step_00000020"):
        assert ck.resolve("auto").name == "step_00000015"
    save(ck, 20)  # the run reaches step 20 again: the damaged directory is replaced
    assert ck.resolve("auto").name == "step_00000020"
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_00000020"]


def test_read_model_state_returns_config_and_weights_or_names_the_problem(tmp_path):
    ck = checkpointer(tmp_path)
    ck.header["config"] = {"model": {"name": "mmoe"}}
    path = save(ck, 10)
    config, state = read_model_state(path)
    assert config == {"model": {"name": "mmoe"}} and torch.equal(state["w"], torch.full((2, 3), 10.0))
    assert read_model_state(tmp_path)[1]["w"][0, 0] == 10.0  # a ckpt/ root: its newest verified
    damage(path / COMMON)
    with pytest.raises(CheckpointError, match=f"{path}: corrupt common.pt"):
        read_model_state(path)


def test_training_job_refuses_to_checkpoint_nan_weights(tmp_path, demo_shards):
    """The trainer's own registry: a parameter turned NaN stops the run at its next
    checkpoint with the parameter's name; the previous checkpoint stays the latest."""
    from conftest import write_recipe

    from manytask.config import load_config
    from manytask.trainer.loop import build_job, save

    recipe = write_recipe(tmp_path, demo_shards, logging={"wandb": False, "progress": False})
    job = build_job(load_config(recipe, ["data.num_workers=0"]))
    try:
        save(job)
        name, param = next(iter(job.engine.module.named_parameters()))
        param.data[0] = float("nan")
        job.step = 10
        with pytest.raises(CheckpointError, match=f"step 10: 'engine.model.{name}' holds NaN or inf values \\(rank 0\\)"):
            save(job)
        assert (tmp_path / "run" / "ckpt" / LATEST).read_text().strip() == "step_00000000"
        assert not (tmp_path / "run" / "ckpt" / "step_00000010").exists()
    finally:
        job.close()
