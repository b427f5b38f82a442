"""MMoE (Ma et al., KDD 2018) and its one-gate baseline OMoE.

encoder `[B, F]` -> E experts, stacked `[E, in, out]` per layer and run as one `baddbmm`
-> `[E, B, D]`; G softmax gates (one per task for MMoE, one shared for OMoE) computed in one
matmul -> `[G, B, E]`; mixture per gate as one bmm -> `[G, B, D]`; towers (stacked per output
width) -> {task: `[B, out_dim]`}. No Python loop over experts or tasks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from manytask.models.encoders import EncoderParams, InputEncoder
from manytask.models.gates import SHARED_GATE, SoftmaxGates, gate_outputs, load_balance_loss, mix
from manytask.models.layers import (
    ACTIVATIONS,
    Activation,
    ExpertLayout,
    StackedMLP,
    last_linear,
    per_member,
)
from manytask.models.spec import ModelOutput, ModelSpec
from manytask.models.towers import Towers
from manytask.schema import ConfigError, load_dataclass


@dataclass
class MMoEParams:
    encoder: EncoderParams = field(default_factory=EncoderParams)
    num_experts: int = 4
    expert_hidden: list[int] = field(default_factory=lambda: [64])  # widths; last = expert output
    tower_hidden: list[int] = field(default_factory=lambda: [32])
    gate_input: Literal["features", "embedding"] = "features"  # encoder output, or a projection
    gate_embedding_dim: int = 16  # width of the learned projection when gate_input=embedding
    gate_temperature: float = 1.0  # softmax(logits / temperature)
    gate_dropout: float = 0.0  # drop expert weights per sample in training, renormalise
    load_balance_weight: float = 0.0  # weight of aux_losses["load_balance"]; 0 = off
    activation: Activation = "relu"
    # stacked: one [E, in, out] tensor per layer, one batched matmul (fastest unsharded);
    # per_member: one module per expert, so ZeRO-2/3 reduce (ZeRO-3: gather) one expert at a time;
    # auto: per_member under ZeRO-2/3, stacked otherwise (same initial values and saved state)
    expert_layout: ExpertLayout = "auto"

    def validate(self, file: str | None) -> None:
        where = f" in {file}" if file else ""
        if self.num_experts < 1:
            raise ConfigError(f"'model.params.num_experts'{where}: must be >= 1")
        if not self.expert_hidden or min(self.expert_hidden) < 1:
            raise ConfigError(f"'model.params.expert_hidden'{where}: need at least one positive width")
        if self.gate_temperature <= 0:
            raise ConfigError(f"'model.params.gate_temperature'{where}: must be > 0")
        if not 0 <= self.gate_dropout < 1:
            raise ConfigError(f"'model.params.gate_dropout'{where}: must be in [0, 1)")


class MMoE(nn.Module):
    """Multi-gate mixture of experts; `shared_gate=True` gives OMoE (one gate for all tasks).

    forward(inputs, source_id) -> ModelOutput with outputs {task: `[B, out_dim]`},
    shared = expert outputs `[B, E, D]`, gate stats per task (OMoE: of its one gate, under
    `(shared)`), aux_losses["load_balance"] when enabled.
    """

    def __init__(self, spec: ModelSpec, p: MMoEParams, shared_gate: bool = False):
        super().__init__()
        self.task_names = list(spec.tasks)
        self.shared_gate = shared_gate
        self.load_balance_weight = p.load_balance_weight
        self.encoder = InputEncoder(spec.inputs, p.encoder)
        self.experts = StackedMLP(
            p.num_experts, self.encoder.out_dim, p.expert_hidden, p.activation, per_member=per_member(p.expert_layout)
        )
        if p.gate_input == "embedding":
            self.gate_embedding: nn.Module | None = nn.Sequential(
                nn.Linear(self.encoder.out_dim, p.gate_embedding_dim), ACTIVATIONS[p.activation]()
            )
            gate_in = p.gate_embedding_dim
        else:
            self.gate_embedding = None
            gate_in = self.encoder.out_dim
        num_gates = 1 if shared_gate else len(self.task_names)
        self.gates = SoftmaxGates(num_gates, gate_in, p.num_experts, p.gate_temperature, p.gate_dropout)
        self.towers = Towers(self.experts.out_dim, p.tower_hidden, spec.tasks, p.activation)
        self.gate_keys = list(self.gate_experts())  # in gate order

    def forward(self, inputs: dict[str, torch.Tensor], source_id: torch.Tensor) -> ModelOutput:
        h = self.encoder(inputs)  # [B, F]
        experts = self.experts(h)  # [E, B, D]
        # [B, E, D] for MGDA-UB, upstream of every use below so each task's gradient reaches it
        shared = experts.transpose(0, 1)
        experts = shared.transpose(0, 1)
        w = self.gates(self.gate_embedding(h) if self.gate_embedding is not None else h)  # [G, B, E]
        if self.shared_gate:
            outputs = self.towers(mix(w, experts)[0])  # one mixture [B, D] for every tower
        else:
            outputs = self.towers.forward_mixed(w, experts)  # tower t on gate t's mixture
        means, entropy = gate_outputs(self.gate_keys, w)
        aux = {}
        if self.load_balance_weight > 0:
            aux["load_balance"] = self.load_balance_weight * load_balance_loss(w)
        return ModelOutput(
            outputs, aux_losses=aux, gate_means=means, gate_entropy=entropy,
            shared=shared,
        )

    def gate_experts(self) -> dict[str, list[str]]:
        """Gate key -> names of the experts it weighs, in gate order (every gate sees all E)."""
        experts = [f"expert_{e}" for e in range(self.experts.n)]
        return {k: experts for k in ([SHARED_GATE] if self.shared_gate else self.task_names)}

    def shared_parameters(self) -> list[nn.Parameter]:
        """Encoder, experts, gate projection (and, for OMoE, the one gate)."""
        params = [*self.encoder.parameters(), *self.experts.parameters()]
        if self.gate_embedding is not None:
            params += list(self.gate_embedding.parameters())
        if self.shared_gate:
            params += list(self.gates.parameters())
        return params

    def last_shared_parameters(self) -> list[nn.Parameter]:
        """The experts' last stacked layer (weight `[E, in, D]`, bias `[E, D]`)."""
        return last_linear(self.experts)

    def task_parameters(self) -> dict[str, list[tuple[nn.Parameter, int | None]]]:
        """task -> its tower slices, plus its gate slice for MMoE."""
        params = self.towers.task_parameters()
        if not self.shared_gate:
            for g, task in enumerate(self.task_names):
                params[task] = params[task] + self.gates.gate_parameters(g)
        return params


def build(params: dict, spec: ModelSpec) -> MMoE:
    return MMoE(spec, load_dataclass(MMoEParams, params, prefix="model.params"))


def build_omoe(params: dict, spec: ModelSpec) -> MMoE:
    return MMoE(spec, load_dataclass(MMoEParams, params, prefix="model.params"), shared_gate=True)
