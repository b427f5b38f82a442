"""The single-task baseline: the same encoder, an MLP and one head, for exactly one task.

Every recipe can compare with its single-task baselines: `single_task_spec(spec, task)` cuts
a recipe's ModelSpec down to one task, and `build(params, that_spec)` builds the baseline.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import nn

from manytask.models.encoders import EncoderParams, InputEncoder
from manytask.models.layers import Activation, last_linear, mlp
from manytask.models.spec import ModelOutput, ModelSpec
from manytask.schema import ConfigError, load_dataclass


@dataclass
class SingleTaskParams:
    encoder: EncoderParams = field(default_factory=EncoderParams)
    hidden: list[int] = field(default_factory=lambda: [64, 32])
    dropout: float = 0.0
    activation: Activation = "relu"


def single_task_spec(spec: ModelSpec, task: str) -> ModelSpec:
    """`spec` with only `task` left (inputs and sources unchanged)."""
    if task not in spec.tasks:
        raise ConfigError(f"single_task: unknown task '{task}' (tasks: {', '.join(spec.tasks)})")
    return replace(spec, tasks={task: spec.tasks[task]})


class SingleTask(nn.Module):
    """forward(inputs, source_id) -> outputs {task: `[B, out_dim]`}, shared = trunk output."""

    def __init__(self, spec: ModelSpec, p: SingleTaskParams):
        super().__init__()
        if len(spec.tasks) != 1:
            raise ConfigError(
                f"model 'single_task' takes exactly one task, got {len(spec.tasks)} "
                f"({', '.join(spec.tasks)}); use single_task_spec(spec, task)"
            )
        (self.task,) = spec.tasks
        self.encoder = InputEncoder(spec.inputs, p.encoder)
        self.trunk = mlp(self.encoder.out_dim, p.hidden, p.activation, dropout=p.dropout)
        width = p.hidden[-1] if p.hidden else self.encoder.out_dim
        self.head = nn.Linear(width, spec.tasks[self.task].out_dim)

    def forward(self, inputs: dict[str, torch.Tensor], source_id: torch.Tensor) -> ModelOutput:
        h = self.trunk(self.encoder(inputs))
        return ModelOutput({self.task: self.head(h)}, shared=h)

    def shared_parameters(self) -> list[nn.Parameter]:
        return [*self.encoder.parameters(), *self.trunk.parameters()]

    def last_shared_parameters(self) -> list[nn.Parameter]:
        return last_linear(self.trunk) or self.encoder.output_parameters()

    def task_parameters(self) -> dict[str, list[tuple[nn.Parameter, int | None]]]:
        return {self.task: [(p, None) for p in self.head.parameters()]}


def build(params: dict, spec: ModelSpec) -> SingleTask:
    return SingleTask(spec, load_dataclass(SingleTaskParams, params, prefix="model.params"))
