"""Model catalogue: `model.name` in a recipe -> a builder `build(params, spec) -> nn.Module`.

Every model is an `nn.Module` with
- `forward(inputs: {field: [B, ...]}, source_id: [B]) -> ModelOutput`: ALL task outputs
  `[B, out_dim]` from one routed forward pass;
- `shared_parameters() -> list[Parameter]`: parameters every task uses;
- `last_shared_parameters() -> list[Parameter]`: the last shared layer (GradNorm);
- `task_parameters() -> {task: [(param, None | i)]}`: parameters only that task uses, whole
  (`None`) or as slice `i` along dim 0 of a stacked tensor.
Adding an architecture is one file with a `build` function plus one line below.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from manytask.config import ModelConfig
from manytask.models import (
    conditioned,
    mmoe,
    multi_head,
    ple,
    single_task,
    soft_sharing,
    timeseries,
)
from manytask.models.spec import FieldSpec, ModelOutput, ModelSpec, TaskSpec
from manytask.schema import ConfigError, closest

Builder = Callable[[dict, ModelSpec], nn.Module]

MODELS: dict[str, Builder] = {
    "multi_head": multi_head.build,
    "soft_sharing": soft_sharing.build,
    "mmoe": mmoe.build,
    "omoe": mmoe.build_omoe,
    "ple": ple.build,
    "conditioned": conditioned.build,
    "timeseries": timeseries.build,
    "single_task": single_task.build,
}


def build_model(cfg: ModelConfig, spec: ModelSpec) -> nn.Module:
    """The model named by `cfg.name`, with `cfg.params` validated by that model's params
    dataclass (an unknown key names the closest valid one)."""
    if cfg.name not in MODELS:
        near = closest(cfg.name, MODELS)
        fix = f"; did you mean '{near}'?" if near else ""
        raise ConfigError(f"'model.name': unknown model '{cfg.name}'{fix} (models: {', '.join(MODELS)})")
    if not spec.tasks:
        raise ConfigError("build_model: the ModelSpec has no tasks")
    return MODELS[cfg.name](dict(cfg.params), spec)


__all__ = ["MODELS", "FieldSpec", "ModelOutput", "ModelSpec", "TaskSpec", "build_model"]
