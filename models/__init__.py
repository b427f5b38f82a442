"""Model catalogue: `model.name` in a recipe -> a builder `build(params, spec) -> nn.Module`.

Every model is an `nn.Module` with
- `forward(inputs: {field: [B, ...]}, source_id: [B]) -> ModelOutput`: ALL task outputs
  `[B, out_dim]` from one routed forward pass;
- `shared_parameters() -> list[Parameter]`: parameters every task uses;
- `last_shared_parameters() -> list[Parameter]`: the last shared layer (GradNorm);
- `task_parameters() -> {task: [(param, None | i)]}`: parameters only that task uses, whole
  (`None`) or as slice `i` along dim 0 of a stacked tensor.
Adding an architecture is one file with a `build` function and a params dataclass, plus one
line below.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

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
from manytask.schema import ConfigError, load_dataclass, registry_entry

Builder = Callable[[dict, ModelSpec], nn.Module]


@dataclass(frozen=True)
class ModelEntry:
    """One architecture: its builder, the dataclass its `model.params:` block must fit, and
    which of those params are the hidden widths along one task's path (shared part, then
    tower), which `manytask compare` gives its single-task baseline."""

    build: Builder
    params: type
    task_path: tuple[str, ...] = ()


MODELS: dict[str, ModelEntry] = {
    "multi_head": ModelEntry(multi_head.build, multi_head.MultiHeadParams, ("hidden", "tower_hidden")),
    "soft_sharing": ModelEntry(soft_sharing.build, soft_sharing.SoftSharingParams, ("hidden", "tower_hidden")),
    "mmoe": ModelEntry(mmoe.build, mmoe.MMoEParams, ("expert_hidden", "tower_hidden")),
    "omoe": ModelEntry(mmoe.build_omoe, mmoe.MMoEParams, ("expert_hidden", "tower_hidden")),
    "ple": ModelEntry(ple.build, ple.PLEParams, ("expert_hidden", "tower_hidden")),
    "conditioned": ModelEntry(conditioned.build, conditioned.ConditionedParams,
                              ("hidden", "post_hidden", "tower_hidden")),
    "timeseries": ModelEntry(timeseries.build, timeseries.TimeSeriesParams, ("hidden", "tower_hidden")),
    "single_task": ModelEntry(single_task.build, single_task.SingleTaskParams),
}


def model_entry(name: str, file: str | None = None) -> ModelEntry:
    """The registry entry for `model.name`; ConfigError naming the closest model otherwise."""
    return registry_entry(MODELS, name, "model", file)


def model_params(cfg: ModelConfig, file: str | None = None) -> Any:
    """`cfg.params` checked against the model's params dataclass (keys, types, ranges)."""
    return load_dataclass(model_entry(cfg.name, file).params, dict(cfg.params), file=file, prefix="model.params")


def build_model(cfg: ModelConfig, spec: ModelSpec) -> nn.Module:
    """The model named by `cfg.name`, with `cfg.params` validated by that model's params
    dataclass (an unknown key names the closest valid one)."""
    entry = model_entry(cfg.name)
    if not spec.tasks:
        raise ConfigError("build_model: the ModelSpec has no tasks")
    return entry.build(dict(cfg.params), spec)


__all__ = ["MODELS", "FieldSpec", "ModelEntry", "ModelOutput", "ModelSpec", "TaskSpec", "build_model", "model_entry", "model_params"]
