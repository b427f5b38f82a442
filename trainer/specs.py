"""From recipe + manifests to what the model is built from: input fields and task output widths."""

from __future__ import annotations

from manytask.config import Config
from manytask.data_pipeline.sources import model_inputs, task_out_dims
from manytask.models.spec import ModelSpec, TaskSpec


def build_model_spec(cfg: Config) -> tuple[dict[str, TaskSpec], ModelSpec]:
    """Task specs (recipe order) and the ModelSpec, checked against every source's manifest."""
    dims = task_out_dims(cfg)
    tasks = {name: TaskSpec(type=t.type, out_dim=dims[name]) for name, t in cfg.tasks.items()}
    return tasks, ModelSpec(inputs=model_inputs(cfg), tasks=tasks, sources=[s.name for s in cfg.data.sources])
