"""What a resumed run may change in its recipe, and what it may not.

A run resumed from a checkpoint compares the recipe it was started with against the one the
checkpoint was written with (`common.pt`'s "config"). Keys in `APPLIED_ON_RESUME` may differ:
they are applied from the resumed step on and announced. Any other difference would make the
checkpoint's state mean something else (another model, weighting, data order, batch, ...), so
the resume is refused — before any file is written — listing every such key with its old and
new value.
"""

from __future__ import annotations

import fnmatch
import json
from pathlib import Path
from typing import Any

from manytask.config import Config
from manytask.schema import ConfigError
from manytask.trainer.checkpoint import COMPLETE, checkpoints

# fnmatch patterns over dotted keys; sources and tasks are named by their names.
APPLIED_ON_RESUME = (
    "run.name", "run.dir", "run.resume", "run.lock_lease",
    "trainer.max_steps",  # extend (or shorten) a run
    "trainer.lr", "trainer.warmup_steps", "trainer.min_lr_ratio",  # LR schedule, from the resumed step on
    "trainer.eval_every", "trainer.log_every", "trainer.on_nonfinite", "trainer.max_nonfinite",
    "checkpoint.*", "logging.*", "monitor.*",
    "data.num_workers", "data.val_batch_size", "data.val_max_batches", "data.skip_corrupt",
    "data.sources.*.val", "tasks.*.metrics",
    "engine.backend",
    "engine.fsdp.*",  # how FSDP cuts the model into units: its checkpoints are resharded on load
)
SCHEDULE_KEYS = {"trainer.lr", "trainer.warmup_steps", "trainer.min_lr_ratio", "trainer.max_steps"}


class ResumeRefused(ConfigError):
    """The recipe differs from the checkpoint's in keys a resume cannot change."""


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted keys of a resolved recipe; list items that have a `name` (sources) by name."""
    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, list) and tree and all(isinstance(x, dict) and "name" in x for x in tree):
        items = ((x["name"], x) for x in tree)
    else:
        return {prefix: tree}
    flat: dict[str, Any] = {}
    for key, value in items:
        flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def recipe_changes(saved: dict[str, Any], now: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """{dotted key: (checkpoint's value, recipe's value)} for every key set in both that differs.
    (A key only one side knows comes from another manytask version: not a change.)"""
    old, new = flatten(saved), flatten(now)
    changed = {k: (old[k], new[k]) for k in old.keys() & new.keys() if old[k] != new[k]}
    # A source or task added or removed: its keys exist on one side only.
    for key in old.keys() ^ new.keys():
        if key.startswith(("data.sources.", "tasks.")):
            changed[key] = (old.get(key, "<absent>"), new.get(key, "<absent>"))
    return dict(sorted(changed.items()))


def applicable(key: str) -> bool:
    return any(fnmatch.fnmatchcase(key, pattern) for pattern in APPLIED_ON_RESUME)


def check_resume_changes(saved: dict[str, Any], now: dict[str, Any], checkpoint: str) -> dict[str, tuple[Any, Any]]:
    """The changes to apply (all applicable); ResumeRefused listing the others if any."""
    changes = recipe_changes(saved, now)
    refused = {k: v for k, v in changes.items() if not applicable(k)}
    if refused:
        lines = "\n".join(f"  {k}: {old!r} -> {new!r}" for k, (old, new) in refused.items())
        raise ResumeRefused(
            f"refusing to resume from {checkpoint}: the recipe differs from the checkpoint's in keys a "
            f"resume cannot change (checkpoint -> recipe):\n{lines}\n"
            f"Set them back, or start a new run (another run.dir, or run.resume=never). Keys that may "
            f"change on resume: {', '.join(APPLIED_ON_RESUME)}"
        )
    return changes


def check_before_launch(cfg: Config) -> None:
    """ResumeRefused now, before any process starts, if the checkpoint the job would resume
    from (the newest with a COMPLETE marker, or `run.resume`'s) was written with a recipe this
    one may not change. Reads only the marker; the job itself verifies and checks again."""
    if cfg.run.resume == "never":
        return
    paths = checkpoints(Path(cfg.run.dir) / "ckpt") if cfg.run.resume == "auto" else [Path(cfg.run.resume)]
    for path in paths:
        try:
            saved = json.loads((path / COMPLETE).read_text()).get("config")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(saved, dict):
            check_resume_changes(saved, cfg.to_dict(), str(path))
        return
