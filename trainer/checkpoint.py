"""Atomic, bounded checkpoints of every stateful part, replicated and per rank.

Layout under `<run.dir>/ckpt/`:

    step_00000300/
        common.pt       rank 0: model, optimizer, LR schedule, sampler, weighting, step, config
        rank_00000.pt   every rank: its stream positions and RNG states
        deepspeed/      DeepSpeed's own ZeRO-sharded model/optimizer files (DeepSpeed engine)
        COMPLETE        written last, JSON {step, world_size, files}
    latest              name of the newest complete checkpoint, replaced atomically

A checkpoint is written into `.tmp-step_…` and renamed into place only after every rank has
written its files and COMPLETE is there; `latest` is updated after the rename. A crash or kill
at any moment therefore leaves either the previous checkpoint or the new one, never a broken
`latest`. Everything is loaded with `torch.load(weights_only=True)`, DeepSpeed's files too
(`ds_checkpoint`).
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from manytask.trainer import distributed as D

COMMON, COMPLETE, LATEST = "common.pt", "COMPLETE", "latest"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or does not fit the recipe; the message says why."""


def rank_file(rank: int) -> str:
    return f"rank_{rank:05d}.pt"


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


@dataclass
class Loaded:
    """A checkpoint read back: the replicated state, this rank's state and where it came from."""

    path: Path
    common: dict[str, Any]
    rank_state: dict[str, Any]
    same_world: bool


class Checkpointer:
    def __init__(self, root: Path, info: D.DistInfo, keep_last: int = 3):
        self.root, self.info, self.keep_last = Path(root), info, max(1, keep_last)

    # ---------------------------------------------------------------- save
    def save(self, step: int, common: dict[str, Any], rank_state: dict[str, Any], engine=None) -> Path | None:
        """Write a checkpoint for `step` on every rank (collective); returns its path or None.

        `common` is the replicated state (written by rank 0), `rank_state` this rank's own.
        For the DeepSpeed engine, `engine.save` writes its ZeRO shards inside the checkpoint.
        An OSError on any rank (disk full, permissions) aborts this save on all ranks with a
        warning naming the error; the previous checkpoint stays the latest.
        """
        final = self.root / step_dir_name(step)
        tmp = self.root / f".tmp-{step_dir_name(step)}"
        error: str | None = None
        try:
            if self.info.is_rank0:
                self.root.mkdir(parents=True, exist_ok=True)
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
            D.barrier()
            if engine is not None and getattr(engine, "kind", "") == "deepspeed":
                engine.save(str(tmp / "deepspeed"), client_state={"step": step})
            if self.info.is_rank0:
                torch.save(common, tmp / COMMON)
            torch.save(rank_state, tmp / rank_file(self.info.rank))
        except OSError as err:
            error = f"rank {self.info.rank}: {err}"
        errors = [e for e in D.all_gather_object(error) if e]
        if errors:
            if self.info.is_rank0:
                shutil.rmtree(tmp, ignore_errors=True)
            warnings.warn(
                f"checkpoint at step {step} NOT saved ({'; '.join(errors)}); "
                f"the previous checkpoint in {self.root} is still the latest",
                stacklevel=2,
            )
            return None
        if self.info.is_rank0:
            files = sorted(p.name for p in tmp.iterdir())
            marker = {"step": step, "world_size": self.info.world_size, "files": files}
            _atomic_write_text(tmp / COMPLETE, json.dumps(marker))
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(self.root)
            _atomic_write_text(self.root / LATEST, final.name + "\n")
            self._prune()
        D.barrier()
        return final

    def _prune(self) -> None:
        done = sorted(p for p in self.root.glob("step_*") if (p / COMPLETE).exists())
        for old in done[: -self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in self.root.glob(".tmp-step_*"):
            shutil.rmtree(stale, ignore_errors=True)

    # ---------------------------------------------------------------- find / load
    def candidates(self) -> list[Path]:
        """Checkpoint directories, newest first.

        A complete directory newer than `latest` means the job died between the rename and
        the pointer update: it is valid (COMPLETE is written before the rename), so the newest
        valid directory wins and `latest` is a convenience for people and tools.
        """
        if not self.root.is_dir():
            return []
        return sorted((p for p in self.root.glob("step_*") if p.is_dir()), reverse=True)

    def resolve(self, resume: str) -> Path | None:
        """Which checkpoint to load, decided on rank 0 and agreed by all ranks.

        resume: "never", "auto" (newest valid checkpoint under the run's ckpt/, skipping an
        incomplete or corrupt one with a warning) or a checkpoint directory path.
        """
        choice: str | None = None
        problem: str | None = None
        if self.info.is_rank0 and resume != "never":
            if resume == "auto":
                for path in self.candidates():
                    reason = validate_checkpoint(path)
                    if reason is None:
                        choice = str(path)
                        break
                    warnings.warn(f"skipping checkpoint {path}: {reason}", stacklevel=2)
            else:
                reason = validate_checkpoint(Path(resume))
                if reason:
                    problem = f"cannot resume from {resume}: {reason}"
                else:
                    choice = resume
        choice, problem = D.broadcast_object((choice, problem))
        if problem:
            raise CheckpointError(problem)
        return Path(choice) if choice else None

    def load(self, path: Path) -> Loaded:
        marker = json.loads((path / COMPLETE).read_text())
        same_world = marker["world_size"] == self.info.world_size
        # With a different world size there is no matching per-rank file: every rank starts
        # from rank 0's, and the stream restarts its current epoch under the new split.
        own = path / rank_file(self.info.rank if same_world else 0)
        common = torch.load(path / COMMON, map_location="cpu", weights_only=True)
        rank_state = torch.load(own, map_location="cpu", weights_only=True)
        return Loaded(path, common, rank_state, same_world)


def validate_checkpoint(path: Path) -> str | None:
    """None when `path` is a complete checkpoint, else why not (read on rank 0 only)."""
    if not path.is_dir():
        return "no such directory"
    marker_path = path / COMPLETE
    if not marker_path.exists():
        return "incomplete (no COMPLETE marker: the save was interrupted)"
    try:
        marker = json.loads(marker_path.read_text())
    except (OSError, ValueError) as err:
        return f"unreadable COMPLETE marker ({err})"
    for name in marker.get("files", []):
        if not (path / name).exists():
            return f"missing file {name}"
    try:
        torch.load(path / COMMON, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling error means "corrupt"
        return f"corrupt {COMMON} ({type(err).__name__}: {err})"
    return None


def check_compatible(common: dict[str, Any], tasks: list[str], model_state: dict[str, torch.Tensor], path: Path) -> None:
    """Refuse a checkpoint whose tasks or parameter shapes differ from the recipe's model."""
    saved_tasks = list(common.get("tasks", []))
    if saved_tasks != tasks:
        raise CheckpointError(
            f"checkpoint {path} was trained with tasks {saved_tasks}, the recipe has {tasks}; "
            f"use a new run.dir or resume: never"
        )
    saved = common["engine"]["model"] if "engine" in common and "model" in common["engine"] else None
    if saved is None:
        return
    missing = sorted(set(model_state) - set(saved))
    extra = sorted(set(saved) - set(model_state))
    if missing or extra:
        raise CheckpointError(
            f"checkpoint {path} does not match the recipe's model: "
            f"missing {missing[:5]}, unexpected {extra[:5]}"
        )
    for name, tensor in model_state.items():
        if tuple(saved[name].shape) != tuple(tensor.shape):
            raise CheckpointError(
                f"checkpoint {path}: parameter '{name}' has shape {tuple(saved[name].shape)}, "
                f"the recipe's model has {tuple(tensor.shape)}"
            )
