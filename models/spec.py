"""What a model is built from (ModelSpec) and what its one routed forward returns (ModelOutput)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class FieldSpec:
    """An input field as recorded in the sources' manifests (per-sample shape, no batch dim)."""

    dtype: str  # numpy dtype name: float32, int64, ...
    shape: tuple[int, ...]
    vocab: int = 0  # categorical fields: number of ids (max id + 1) when known, else 0
    pad: int = -1  # multi-valued id fields [k]: the padding id pooling skips (-1 = none)


@dataclass
class TaskSpec:
    type: str  # binary | multiclass | multilabel | regression | forecast
    out_dim: int  # width of the model output for this task: [B, out_dim]


@dataclass
class ModelSpec:
    inputs: dict[str, FieldSpec]  # every input field any source provides
    tasks: dict[str, TaskSpec]  # in recipe order
    sources: list[str] = field(default_factory=list)  # source names; source_id indexes this


@dataclass
class ModelOutput:
    """outputs:      task -> [B, out_dim] raw scores (logits for classification).
    aux_losses:   name -> scalar added to the total loss (soft-sharing penalty, load balance).
    gate_means:   gate key -> [E] batch-mean gate weight per expert (detached); gate key is
                  the task name, `<task>/level<l>` for stacked extraction layers, or
                  `(shared)[/level<l>]` for a gate every task shares (the model's
                  `gate_experts()` names the expert behind each position).
    gate_entropy: gate key -> scalar mean per-sample gate entropy (detached).
    shared:       the shared representation the towers read, for MGDA-UB and task affinity
                  (any shape with leading batch dim), or None.
    """

    outputs: dict[str, torch.Tensor]
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)
    gate_means: dict[str, torch.Tensor] = field(default_factory=dict)
    gate_entropy: dict[str, torch.Tensor] = field(default_factory=dict)
    shared: torch.Tensor | None = None
