"""`manytask.load(RUN_DIR or checkpoint)`: a trained model ready to predict from Python.

    import manytask
    m = manytask.load("runs/demo")              # newest complete checkpoint of the run
    out = m.predict({"x": x})                   # x: float32 [n, 16] -> {task: [n] or [n, k]}
    m.tasks                                     # {"regress_a": TaskSpec(type="regression", ...), ...}
    m.model                                     # the nn.Module, in eval mode
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from manytask.config import Config
from manytask.models.spec import ModelSpec, TaskSpec

PREPROCESSING = "preprocessing"


@dataclass
class LoadedModel:
    """A trained model: `model` (eval mode, CPU), `tasks` (task -> TaskSpec), `spec` (inputs),
    `config` (the run's resolved recipe), `preprocessing` (the run's stored Preprocessor for raw
    columns, or None), `checkpoint` (what was loaded) and `step`."""

    model: nn.Module
    tasks: dict[str, TaskSpec]
    spec: ModelSpec
    config: Config
    preprocessing: Any
    run_dir: Path
    checkpoint: Path
    step: int

    def predict(self, batch: Any, source: str | int | None = None, gates: bool = False) -> dict[str, np.ndarray]:
        """Predictions for every task of `batch`.

        batch: dict of numpy arrays, pandas DataFrame or pyarrow Table holding the model's input
        fields (`self.spec.inputs`), or raw columns the run's preprocessing turns into them.
        source: which training source the rows come from (name or index; only task-conditioned
        models use it). Returns task -> array: probability `[n]` (binary), probabilities
        `[n, labels]` (multilabel) / `[n, classes]` (multiclass), values `[n]` or `[n, k]`
        (regression, forecast); with `gates=True` also `gate/<key>` -> `[n, experts]`.
        """
        from manytask.trainer.inference import (
            as_arrays,
            model_inputs_from,
            predict_tensors,
            source_index,
        )

        inputs = model_inputs_from(self.spec, as_arrays(batch), self.preprocessing)
        rows = next(iter(inputs.values())).shape[0]
        source_id = torch.full((rows,), source_index(self.spec, source), dtype=torch.long)
        preds, gate_w = predict_tensors(self.model, self.spec, inputs, source_id, gates)
        out = {t: p.numpy() for t, p in preds.items()}
        out.update({f"gate/{k}": w.numpy() for k, w in gate_w.items()})
        return out


def load_preprocessing(run_dir: Path, spec: ModelSpec) -> Any:
    """The run's stored preprocessing (`<run.dir>/preprocessing/<source>/`), or None.

    A model trained on one source uses that source's; several sources' preprocessings would
    need a `source` to choose, which `predict` leaves to the caller's raw data (the first).
    """
    root = Path(run_dir) / PREPROCESSING
    dirs = [root / s for s in spec.sources if (root / s / "manifest.json").is_file()]
    if not dirs:
        return None
    from manytask.data_pipeline.preprocess import Preprocessor  # the data issue's contract

    return Preprocessor.from_manifest(dirs[0])


def load(path: str | Path, run_dir: str | Path | None = None) -> LoadedModel:
    """A run directory (its newest complete checkpoint) or a checkpoint directory -> LoadedModel.

    run_dir: the run a checkpoint directory belongs to (default: the folder holding its ckpt/).
    Raises CheckpointError naming the path when there is no complete checkpoint.
    """
    from manytask.trainer.model_io import load_trained

    trained = load_trained(path, run_dir)
    return LoadedModel(
        model=trained.model, tasks=dict(trained.spec.tasks), spec=trained.spec, config=trained.cfg,
        preprocessing=load_preprocessing(trained.run_dir, trained.spec), run_dir=trained.run_dir,
        checkpoint=trained.checkpoint, step=trained.step,
    )
