"""Checkpoints are atomic and safe: a crash mid-save never breaks `latest`, a corrupt checkpoint
is skipped with a warning, a mismatched one is refused by name, a failed save keeps the last."""

from __future__ import annotations

import pytest
import torch

from manytask.trainer.checkpoint import (
    COMMON,
    LATEST,
    Checkpointer,
    CheckpointError,
    check_compatible,
)
from manytask.trainer.distributed import DistInfo


class Box:
    """A stateful part holding a plain dict (what every registered part looks like)."""

    def __init__(self, state: dict):
        self.state = state

    def state_dict(self) -> dict:
        return self.state

    def load_state_dict(self, state: dict) -> None:
        self.state = state


def checkpointer(root, keep_last: int = 3) -> Checkpointer:
    ck = Checkpointer(root, DistInfo(), keep_last=keep_last)
    ck.header = {"tasks": ["a", "b"], "config": {}}
    ck.register("engine", Box({}), must_be_finite=True)
    ck.register("stream", Box({}), per_rank=True)
    return ck


def common(step: int) -> dict:
    return {"step": step, "tasks": ["a", "b"], "engine": {"model": {"w": torch.full((2, 3), float(step))}}}


def save(ck: Checkpointer, step: int):
    ck.parts["engine"].obj.state = {"model": {"w": torch.full((2, 3), float(step))}}
    ck.parts["stream"].obj.state = {"pos": step}
    return ck.save(step)


def test_save_load_round_trip_and_keep_last(tmp_path):
    ck = checkpointer(tmp_path, keep_last=2)
    for step in (10, 20, 30):
        save(ck, step)
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_00000020", "step_00000030"]
    assert (tmp_path / LATEST).read_text().strip() == "step_00000030"
    loaded = ck.load(ck.resolve("auto"))
    assert loaded.common["step"] == 30 and loaded.rank_state["stream"] == {"pos": 30}
    fresh = checkpointer(tmp_path)
    fresh.restore(loaded)
    assert fresh.parts["stream"].obj.state == {"pos": 30}
    assert torch.equal(loaded.common["engine"]["model"]["w"], torch.full((2, 3), 30.0))


def test_interrupted_save_is_invisible(tmp_path):
    ck = checkpointer(tmp_path)
    save(ck, 10)
    # A save killed half-way leaves a temporary directory and, at worst, a step dir without
    # its COMPLETE marker: neither is ever chosen.
    (tmp_path / ".tmp-step_00000020").mkdir()
    (tmp_path / ".tmp-step_00000020" / COMMON).write_bytes(b"partial")
    half = tmp_path / "step_00000030"
    half.mkdir()
    torch.save(common(30), half / COMMON)
    with pytest.warns(UserWarning, match="step_00000030.*incomplete"):
        assert ck.resolve("auto").name == "step_00000010"


def test_corrupt_latest_is_skipped_with_warning(tmp_path):
    ck = checkpointer(tmp_path)
    save(ck, 10)
    save(ck, 20)
    (tmp_path / "step_00000020" / COMMON).write_bytes(b"\x80garbage")
    with pytest.warns(UserWarning, match="skipping checkpoint .*step_00000020: corrupt common.pt"):
        assert ck.resolve("auto").name == "step_00000010"


def test_explicit_bad_path_and_never(tmp_path):
    ck = checkpointer(tmp_path)
    save(ck, 10)
    assert ck.resolve("never") is None
    with pytest.raises(CheckpointError, match="cannot resume from .*nope: no such directory"):
        ck.resolve(str(tmp_path / "nope"))
    assert ck.resolve(str(tmp_path / "step_00000010")).name == "step_00000010"


def test_mismatched_checkpoint_is_refused_naming_what_differs(tmp_path):
    state = {"w": torch.zeros(2, 3)}
    check_compatible(common(1), ["a", "b"], state, tmp_path)  # matches: no error
    with pytest.raises(CheckpointError, match=r"tasks \['a', 'b'\], the recipe has \['a', 'c'\]"):
        check_compatible(common(1), ["a", "c"], state, tmp_path)
    with pytest.raises(CheckpointError, match=r"'w' has shape \(2, 3\), the recipe's model has \(4, 3\)"):
        check_compatible(common(1), ["a", "b"], {"w": torch.zeros(4, 3)}, tmp_path)
    with pytest.raises(CheckpointError, match=r"missing \['v'\]"):
        check_compatible(common(1), ["a", "b"], {"w": torch.zeros(2, 3), "v": torch.zeros(1)}, tmp_path)


def test_failed_save_warns_and_keeps_previous(tmp_path, monkeypatch):
    ck = checkpointer(tmp_path)
    save(ck, 10)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.warns(UserWarning, match="step 20 NOT saved .*No space left on device.*still the latest"):
        assert save(ck, 20) is None
    monkeypatch.undo()
    assert (tmp_path / LATEST).read_text().strip() == "step_00000010"
    assert not list(tmp_path.glob(".tmp-*")) and not (tmp_path / "step_00000020").exists()
    assert ck.load(ck.resolve("auto")).common["step"] == 10


def test_everything_loads_with_weights_only(tmp_path):
    ck = checkpointer(tmp_path)
    save(ck, 5)
    for f in (tmp_path / "step_00000005").glob("*.pt"):
        torch.load(f, weights_only=True)


class _Payload:
    """Unpickling this creates a file: what a tampered checkpoint could do instead."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (type(self.marker).touch, (self.marker,))


def test_deepspeed_files_load_weights_only_and_tampered_ones_are_refused(tmp_path):
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    from manytask.trainer.checkpoint import CheckpointError
    from manytask.trainer.ds_checkpoint import WeightsOnlyCheckpointEngine, use_weights_only_loading

    class Engine:  # what use_weights_only_loading touches of a DeepSpeed engine
        checkpoint_engine = TorchCheckpointEngine()

    engine = Engine()
    use_weights_only_loading(engine)
    loader = engine.checkpoint_engine
    assert isinstance(loader, WeightsOnlyCheckpointEngine)

    # What ZeRO writes into its optimizer files round-trips (legacy format, as DeepSpeed saves).
    good = tmp_path / "optim_states.pt"
    loader.save({"loss_scaler": LossScaler(1.0), "zero_stage": ZeroStageEnum.gradients,
                 "state": {"exp_avg": torch.ones(3)}}, str(good))
    state = loader.load(str(good))
    assert state["zero_stage"] is ZeroStageEnum.gradients and state["loss_scaler"].cur_scale == 1.0
    assert torch.equal(state["state"]["exp_avg"], torch.ones(3))

    marker = tmp_path / "code_ran"
    bad = tmp_path / "tampered_optim_states.pt"
    torch.save({"state": _Payload(marker)}, bad)
    with pytest.raises(CheckpointError, match="tampered_optim_states.pt") as refused:
        loader.load(str(bad))
    assert not marker.exists()
    assert "GLOBAL getattr" in str(refused.value)  # names what it refused (how Path.touch pickles)

    truncated = tmp_path / "truncated_optim_states.pt"
    truncated.write_bytes(good.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="truncated_optim_states.pt.*corrupt or truncated"):
        loader.load(str(truncated))

    class Custom(TorchCheckpointEngine):  # a user's own engine is left alone
        pass

    engine.checkpoint_engine = Custom()
    use_weights_only_loading(engine)
    assert type(engine.checkpoint_engine) is Custom
