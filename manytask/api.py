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
    `config` (the run's resolved recipe), `preprocessing` (source name -> the run's stored
    Preprocessor for raw columns; empty when the run stores none), `checkpoint` and `step`."""

    model: nn.Module
    tasks: dict[str, TaskSpec]
    spec: ModelSpec
    config: Config
    preprocessing: dict[str, Any]
    run_dir: Path
    checkpoint: Path
    step: int

    def preprocessor(self, source: str | int | None = None) -> Any:
        """The stored Preprocessor of `source` (name or index; default the first), or None."""
        from manytask.trainer.inference import source_index

        return self.preprocessing.get(self.spec.sources[source_index(self.spec, source)]) if self.spec.sources else None

    def predict(self, batch: Any, source: str | int | None = None, gates: bool = False) -> dict[str, np.ndarray]:
        """Predictions for every task of `batch`.

        batch: dict of numpy arrays, pandas DataFrame or pyarrow Table holding the model's input
        fields that `source` provides (`self.spec.inputs`; fields only other sources have are
        zero-filled, as in training), or raw columns the run's preprocessing turns into them.
        source: which training source the rows come from (name or index; only task-conditioned
        models use it). Returns task -> array: probability `[n]` (binary), probabilities
        `[n, labels]` (multilabel) / `[n, classes]` (multiclass), values `[n]` or `[n, k]`
        (regression, forecast); with `gates=True` also `gate.<key>` -> `[n, experts]` (the same names as `manytask predict`'s columns).
        """
        from manytask.trainer.inference import (
            as_arrays,
            model_inputs_from,
            predict_tensors,
            source_index,
        )

        own = self.config.data.sources[source_index(self.spec, source)].inputs if self.config.data.sources else None
        inputs = model_inputs_from(self.spec, as_arrays(batch), self.preprocessor(source), raw=batch, provided=own)
        rows = next(iter(inputs.values())).shape[0]
        source_id = torch.full((rows,), source_index(self.spec, source), dtype=torch.long)
        preds, gate_w = predict_tensors(self.model, self.spec, inputs, source_id, gates)
        out = {t: p.numpy() for t, p in preds.items()}
        out.update({f"gate.{k}": w.numpy() for k, w in gate_w.items()})
        return out


def load_preprocessing(run_dir: Path, spec: ModelSpec) -> dict[str, Any]:
    """source name -> the run's stored preprocessing (`<run.dir>/preprocessing/<source>/`)."""
    root = Path(run_dir) / PREPROCESSING
    found = {s: root / s for s in spec.sources if (root / s / "manifest.json").is_file()}
    if not found:
        return {}
    from manytask.data_pipeline.preprocess import Preprocessor  # the data issue's contract

    return {s: Preprocessor.from_manifest(d) for s, d in found.items()}


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
