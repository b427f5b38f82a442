"""A trained model back from disk: which checkpoint, its weights, and the model rebuilt from them.

Everything that uses a finished run (`manytask eval / predict / export`, `manytask.load`,
`run.init_from`) comes through here, so a model is always rebuilt the way the trainer built
it: the run's resolved config -> `ModelSpec` -> `models.build_model`, then the checkpoint's
weights. The `ModelSpec` (input fields, task widths, sources) is read from
`<run.dir>/model_spec.json`, written when training starts, so a loaded model does not need the
shards it was trained on (runs from before that file fall back to reading the manifests).

`latest_verified` and `read_model_state` are the two functions that know the checkpoint
layout (`trainer/checkpoint.py`); callers never open checkpoint files themselves.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from manytask.config import Config, config_from_dict
from manytask.models import build_model
from manytask.models.spec import FieldSpec, ModelSpec, TaskSpec
from manytask.trainer.checkpoint import (  # noqa: F401 - re-exported for inference callers
    COMMON,
    COMPLETE,
    CheckpointError,
    latest_verified,
    read_model_state,
)

MODEL_SPEC = "model_spec.json"


# --------------------------------------------------------------------------- checkpoints
# `latest_verified` (newest checkpoint whose every file checks against its COMPLETE marker) and
# `read_model_state` (config + model weights, weights-only, DeepSpeed ZeRO-0..2 included) are
# the checkpointer's own: the layout is known in one place.


def locate(path: str | Path) -> tuple[Path, Path]:
    """`RUN_DIR` or a checkpoint directory -> (run directory, checkpoint to load).

    Raises CheckpointError naming the path and what was expected when there is no complete
    checkpoint there.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such run directory or checkpoint")
    if (path / COMMON).exists() or (path / COMPLETE).exists() or path.name.startswith("step_"):
        return path.parent.parent, path
    ckpt = latest_verified(path / "ckpt")
    if ckpt is None:
        raise CheckpointError(
            f"{path}: no complete checkpoint (expected {path / 'ckpt'}/step_*/ with a {COMPLETE} "
            f"marker; pass a run directory whose training saved a checkpoint, or a checkpoint directory)"
        )
    return path, ckpt


# --------------------------------------------------------------------------- model spec
def spec_to_json(spec: ModelSpec) -> dict[str, Any]:
    return {
        "inputs": {k: {"dtype": f.dtype, "shape": list(f.shape), "vocab": int(f.vocab)} for k, f in spec.inputs.items()},
        "tasks": {k: {"type": t.type, "out_dim": int(t.out_dim)} for k, t in spec.tasks.items()},
        "sources": list(spec.sources),
    }


def spec_from_json(data: dict[str, Any]) -> ModelSpec:
    return ModelSpec(
        inputs={k: FieldSpec(v["dtype"], tuple(v["shape"]), int(v.get("vocab", 0))) for k, v in data["inputs"].items()},
        tasks={k: TaskSpec(v["type"], int(v["out_dim"])) for k, v in data["tasks"].items()},
        sources=list(data["sources"]),
    )


def write_model_spec(run_dir: Path, spec: ModelSpec, is_rank0: bool = True) -> None:
    """Rank 0 writes `<run.dir>/model_spec.json` (what the model is built from, without shards)."""
    if is_rank0:
        Path(run_dir, MODEL_SPEC).write_text(json.dumps(spec_to_json(spec), indent=1) + "\n")


def read_model_spec(run_dir: Path, cfg: Config) -> ModelSpec:
    """The run's ModelSpec: `model_spec.json`, else rebuilt from the recipe's manifests."""
    file = Path(run_dir) / MODEL_SPEC
    if file.is_file():
        return spec_from_json(json.loads(file.read_text()))
    from manytask.trainer.specs import build_model_spec

    try:
        return build_model_spec(cfg)[1]
    except Exception as err:  # noqa: BLE001 - any manifest problem: say what is missing
        raise CheckpointError(
            f"{run_dir}: no {MODEL_SPEC} (a run from before it was saved) and the training data's "
            f"manifests cannot rebuild the model's inputs: {err}"
        ) from err


# --------------------------------------------------------------------------- the model
@dataclass
class TrainedModel:
    """A model rebuilt from a checkpoint, in eval mode, on CPU."""

    cfg: Config
    spec: ModelSpec
    model: nn.Module
    run_dir: Path
    checkpoint: Path
    step: int

    @property
    def tasks(self) -> dict[str, TaskSpec]:
        return self.spec.tasks


def load_trained(path: str | Path, run_dir: str | Path | None = None) -> TrainedModel:
    """`RUN_DIR` (its newest complete checkpoint) or a checkpoint directory -> TrainedModel.

    run_dir: the run a checkpoint directory belongs to (default: the folder holding its `ckpt/`).
    """
    found_run, ckpt = locate(path)
    run_dir = Path(run_dir) if run_dir is not None else found_run
    config, state = read_model_state(ckpt)
    cfg = config_from_dict(config, file=str(ckpt / COMMON))
    spec = read_model_spec(run_dir, cfg)
    model = build_model(cfg.model, spec)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {ckpt} does not fit the model its config builds: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )
    model.eval()
    step = int(ckpt.name.split("_")[-1]) if ckpt.name.startswith("step_") else -1
    return TrainedModel(cfg, spec, model, run_dir, ckpt, step)
