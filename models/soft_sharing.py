"""Soft parameter sharing (Duong et al., 2015): one network per task, kept close by an L2 penalty.

Each task has its own body MLP and tower; the bodies are stacked (`[T, in, out]` per layer)
and run as one batched op. `aux_losses["soft_sharing"]` = weight x the mean over task pairs of
the squared L2 distance between corresponding body parameters (summed over layers): exactly 0
when all bodies are equal. Only the input encoder (embeddings, RNN, dense MLP) is shared.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from manytask.models.encoders import EncoderParams, InputEncoder
from manytask.models.layers import Activation, StackedMLP
from manytask.models.spec import ModelOutput, ModelSpec
from manytask.models.towers import Towers
from manytask.schema import ConfigError, load_dataclass


@dataclass
class SoftSharingParams:
    encoder: EncoderParams = field(default_factory=EncoderParams)
    hidden: list[int] = field(default_factory=lambda: [64])  # each task's body widths
    tower_hidden: list[int] = field(default_factory=list)
    penalty_weight: float = 1e-2  # weight of aux_losses["soft_sharing"]
    activation: Activation = "relu"

    def validate(self, file: str | None) -> None:
        if not self.hidden:
            raise ConfigError(f"'model.params.hidden'{f' in {file}' if file else ''}: need at least one width")
        if self.penalty_weight < 0:
            raise ConfigError(f"'model.params.penalty_weight'{f' in {file}' if file else ''}: must be >= 0")


def pairwise_distance_penalty(stacked: list[torch.Tensor]) -> torch.Tensor:
    """Mean over member pairs (i < j) of sum_k ||P_k[i] - P_k[j]||^2 for stacked tensors
    P_k `[n, ...]`; exactly 0 when all members are equal.

    Uses sum_{i<j} ||x_i - x_j||^2 = n * sum_i ||x_i - c||^2 - ||sum_i (x_i - c)||^2 with
    c = member 0: O(n) instead of O(n^2), and differences of equal members are exact zeros.
    """
    n = stacked[0].shape[0]
    if n < 2:
        return stacked[0].sum() * 0.0
    total = stacked[0].new_zeros(())
    for p in stacked:
        d = (p - p[:1].detach()).flatten(1)  # [n, numel]
        total = total + n * d.pow(2).sum() - d.sum(0).pow(2).sum()
    return total / (n * (n - 1) / 2)


class SoftSharing(nn.Module):
    """forward(inputs, source_id) -> outputs {task: `[B, out_dim]`}, shared = encoder output
    `[B, F]`, aux_losses["soft_sharing"] (scalar)."""

    def __init__(self, spec: ModelSpec, p: SoftSharingParams):
        super().__init__()
        self.penalty_weight = p.penalty_weight
        self.encoder = InputEncoder(spec.inputs, p.encoder)
        self.bodies = StackedMLP(len(spec.tasks), self.encoder.out_dim, p.hidden, p.activation)
        self.towers = Towers(self.bodies.out_dim, p.tower_hidden, spec.tasks, p.activation)
        self.task_names = list(spec.tasks)

    def penalty(self) -> torch.Tensor:
        """Unweighted soft-sharing penalty over the task bodies (scalar)."""
        return pairwise_distance_penalty(list(self.bodies.parameters()))

    def forward(self, inputs: dict[str, torch.Tensor], source_id: torch.Tensor) -> ModelOutput:
        h = self.encoder(inputs)  # [B, F]
        outputs = self.towers(self.bodies(h))  # bodies: [T, B, D]
        return ModelOutput(
            outputs, aux_losses={"soft_sharing": self.penalty_weight * self.penalty()}, shared=h
        )

    def shared_parameters(self) -> list[nn.Parameter]:
        """Only the encoder is shared ([] for an encoder without parameters)."""
        return list(self.encoder.parameters())

    def last_shared_parameters(self) -> list[nn.Parameter]:
        return self.encoder.output_parameters()

    def task_parameters(self) -> dict[str, list[tuple[nn.Parameter, int | None]]]:
        """task -> its body and tower slices. Note: the penalty couples bodies, so an absent
        task's body still gets a gradient through aux_losses["soft_sharing"]."""
        towers = self.towers.task_parameters()
        return {t: self.bodies.member_parameters(i) + towers[t] for i, t in enumerate(self.task_names)}


def build(params: dict, spec: ModelSpec) -> SoftSharing:
    return SoftSharing(spec, load_dataclass(SoftSharingParams, params, prefix="model.params"))
