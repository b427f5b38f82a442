"""Hard parameter sharing: encoder -> shared bottom MLP -> one tower per task."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from manytask.models.encoders import EncoderParams, InputEncoder
from manytask.models.layers import Activation, last_linear, mlp
from manytask.models.spec import ModelOutput, ModelSpec
from manytask.models.towers import Towers
from manytask.schema import load_dataclass


@dataclass
class MultiHeadParams:
    encoder: EncoderParams = field(default_factory=EncoderParams)
    hidden: list[int] = field(default_factory=lambda: [64])  # shared bottom widths
    tower_hidden: list[int] = field(default_factory=lambda: [32])
    dropout: float = 0.0
    activation: Activation = "relu"


class MultiHead(nn.Module):
    """forward(inputs, source_id) -> outputs {task: `[B, out_dim]`}, shared = bottom output
    `[B, hidden[-1]]`. The towers read the same representation, so their first layers run as
    one `baddbmm` over a stride-0 expanded input."""

    def __init__(self, spec: ModelSpec, p: MultiHeadParams):
        super().__init__()
        self.encoder = InputEncoder(spec.inputs, p.encoder)
        self.bottom = mlp(self.encoder.out_dim, p.hidden, p.activation, dropout=p.dropout)
        width = p.hidden[-1] if p.hidden else self.encoder.out_dim
        self.towers = Towers(width, p.tower_hidden, spec.tasks, p.activation, p.dropout)

    def forward(self, inputs: dict[str, torch.Tensor], source_id: torch.Tensor) -> ModelOutput:
        shared = self.bottom(self.encoder(inputs))  # [B, D]
        return ModelOutput(self.towers(shared), shared=shared)

    def shared_parameters(self) -> list[nn.Parameter]:
        return [*self.encoder.parameters(), *self.bottom.parameters()]

    def last_shared_parameters(self) -> list[nn.Parameter]:
        """The bottom's last linear layer (the encoder's when the bottom is empty)."""
        return last_linear(self.bottom) or self.encoder.output_parameters()

    def task_parameters(self) -> dict[str, list[tuple[nn.Parameter, int | None]]]:
        return self.towers.task_parameters()


def build(params: dict, spec: ModelSpec) -> MultiHead:
    return MultiHead(spec, load_dataclass(MultiHeadParams, params, prefix="model.params"))
