"""PLE (Tang et al., RecSys 2020): task-specific and shared experts in stacked extraction layers.

Level l holds K experts per task and S shared experts. Task t's gate mixes its own K experts
and the S shared ones, reading task t's representation; the shared gate (every level but the
last) mixes all T*K + S experts, reading the shared representation. One level is CGC.
Per level: task experts `[T, K, in, out]` run as one batched matmul, shared experts as another,
all task gates as one bmm; nothing loops over experts or tasks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from manytask.models.encoders import EncoderParams, InputEncoder
from manytask.models.gates import SHARED_GATE, SoftmaxGates, gate_outputs, mix
from manytask.models.layers import ACTIVATIONS, Activation, StackedMLP, last_linear
from manytask.models.spec import ModelOutput, ModelSpec
from manytask.models.towers import Towers
from manytask.schema import ConfigError, load_dataclass


@dataclass
class PLEParams:
    encoder: EncoderParams = field(default_factory=EncoderParams)
    num_levels: int = 1  # extraction layers; 1 = CGC
    task_experts: int = 1  # K experts per task per level
    shared_experts: int = 2  # S shared experts per level
    expert_hidden: list[int] = field(default_factory=lambda: [64])  # each expert's widths
    tower_hidden: list[int] = field(default_factory=lambda: [32])
    gate_temperature: float = 1.0
    activation: Activation = "relu"

    def validate(self, file: str | None) -> None:
        where = f" in {file}" if file else ""
        for name in ("num_levels", "task_experts", "shared_experts"):
            if getattr(self, name) < 1:
                raise ConfigError(f"'model.params.{name}'{where}: must be >= 1")
        if not self.expert_hidden or min(self.expert_hidden) < 1:
            raise ConfigError(f"'model.params.expert_hidden'{where}: need at least one positive width")
        if self.gate_temperature <= 0:
            raise ConfigError(f"'model.params.gate_temperature'{where}: must be > 0")


class GroupedLinear(nn.Module):
    """G groups of K linear layers: weight `[G, K, in, out]`, bias `[G, K, out]`.

    forward, as one batched matmul: `[B, in]` (one input for every expert), `[G, B, in]` (group
    g's K experts read input g) or `[G, K, B, in]` (every expert its own) -> `[G, K, B, out]`.
    """

    def __init__(self, groups: int, k: int, in_dim: int, out_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(groups, k, in_dim, out_dim))
        self.bias = nn.Parameter(torch.empty(groups, k, out_dim))
        bound = 1.0 / math.sqrt(in_dim)
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        G, K, in_dim, out = self.weight.shape
        if x.dim() == 2:  # one baddbmm over the G*K experts, the input expanded (as StackedLinear)
            w = self.weight.view(G * K, in_dim, out)
            y = torch.baddbmm(self.bias.view(G * K, 1, out), x.expand(G * K, *x.shape), w)
            return y.view(G, K, -1, out)
        bias = self.bias.unsqueeze(2)  # [G, K, 1, out]
        if x.dim() == 3:  # [G, B, in] @ [G, in, K*out]: one bmm, the input is not repeated K times
            y = torch.bmm(x, self.weight.permute(0, 2, 1, 3).reshape(G, in_dim, K * out))
            return y.view(G, -1, K, out).permute(0, 2, 1, 3) + bias
        return torch.matmul(x, self.weight) + bias  # [G, K, B, in]: batched over G*K


class ExtractionLevel(nn.Module):
    """One PLE level.

    forward(task_in `[B, in]` (first level) or `[T, B, in]`, shared_in `[B, in]`) ->
    (task reps `[T, B, D]`, shared rep `[B, D]` or None on the last level,
    gate weights: task gates `[T, B, K+S]` then, but on the last level, the shared gate
    `[1, B, T*K+S]`; every expert's output `[T*K+S, B, D]`).
    """

    def __init__(self, T: int, in_dim: int, p: PLEParams, last: bool):
        super().__init__()
        self.T, self.K, self.S = T, p.task_experts, p.shared_experts
        self.task_experts = nn.ModuleList()
        d = in_dim
        for width in p.expert_hidden:
            self.task_experts.append(GroupedLinear(T, self.K, d, width))
            d = width
        self.out_dim = d
        self.act = ACTIVATIONS[p.activation]()
        self.shared_experts = StackedMLP(self.S, in_dim, p.expert_hidden, p.activation)
        self.task_gates = SoftmaxGates(T, in_dim, self.K + self.S, p.gate_temperature)
        self.shared_gate = (
            None if last else SoftmaxGates(1, in_dim, T * self.K + self.S, p.gate_temperature)
        )

    def forward(
        self, task_in: torch.Tensor, shared_in: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None, list[torch.Tensor], torch.Tensor]:
        T, K, S = self.T, self.K, self.S
        h = task_in
        for layer in self.task_experts:
            h = self.act(layer(h))  # [T, K, B, d]
        shared_out = self.shared_experts(shared_in)  # [S, B, D]
        # [B, S, D] for MGDA-UB, upstream of every use below so each task's gradient reaches it
        representation = shared_out.transpose(0, 1)
        shared_out = representation.transpose(0, 1)
        B, D = shared_out.shape[1:]
        experts = torch.cat([h.reshape(T * K, B, D), shared_out], dim=0)  # [T*K+S, B, D]
        w = self.task_gates(task_in)  # [T, B, K+S]
        own = torch.cat([h, shared_out.unsqueeze(0).expand(T, S, B, D)], dim=1)  # [T, K+S, B, D]
        task_out = mix(w, own)  # [T, B, D]
        if self.shared_gate is None:
            return task_out, None, [w], representation
        w_shared = self.shared_gate(shared_in)  # [1, B, T*K+S]
        return task_out, mix(w_shared, experts)[0], [w, w_shared], representation

    def gate_experts(self, task_names: list[str]) -> dict[str, list[str]]:
        """Gate key (without level) -> the experts it weighs, named `<task>.<k>` / `shared.<s>`."""
        shared = [f"shared.{s}" for s in range(self.S)]
        gates = {t: [f"{t}.{k}" for k in range(self.K)] + shared for t in task_names}
        if self.shared_gate is not None:
            gates[SHARED_GATE] = [f"{t}.{k}" for t in task_names for k in range(self.K)] + shared
        return gates

    def task_parameters(self, t: int) -> list[tuple[nn.Parameter, int]]:
        """Task t's experts and gate as (stacked tensor, slice index)."""
        params = [(p, t) for layer in self.task_experts for p in layer.parameters()]
        return params + self.task_gates.gate_parameters(t)


class PLE(nn.Module):
    """forward(inputs, source_id) -> outputs {task: `[B, out_dim]`}, shared = the last level's
    expert outputs `[B, T*K+S, D]`, gate stats under `<task>/level<l>` (l counts from 0) and,
    for every level but the last, the shared gate's under `(shared)/level<l>`."""

    def __init__(self, spec: ModelSpec, p: PLEParams):
        super().__init__()
        self.task_names = list(spec.tasks)
        T = len(self.task_names)
        self.encoder = InputEncoder(spec.inputs, p.encoder)
        d = self.encoder.out_dim
        self.levels = nn.ModuleList()
        for level in range(p.num_levels):
            self.levels.append(ExtractionLevel(T, d, p, last=level == p.num_levels - 1))
            d = self.levels[-1].out_dim
        self.towers = Towers(d, p.tower_hidden, spec.tasks, p.activation)
        # per level: the task gates' keys, then the shared gate's (its weights come in that order)
        self.gate_keys = [
            ([f"{t}/level{lv}" for t in self.task_names], [f"{SHARED_GATE}/level{lv}"])
            for lv in range(p.num_levels)
        ]

    def forward(self, inputs: dict[str, torch.Tensor], source_id: torch.Tensor) -> ModelOutput:
        x = self.encoder(inputs)  # [B, F]
        task_rep, shared_rep = x, x
        means: dict[str, torch.Tensor] = {}
        entropy: dict[str, torch.Tensor] = {}
        for level, module in enumerate(self.levels):
            task_rep, shared_next, weights, representation = module(task_rep, shared_rep)
            for gate_keys, w in zip(self.gate_keys[level], weights):
                m, e = gate_outputs(gate_keys, w)
                means.update(m)
                entropy.update(e)
            if shared_next is not None:
                shared_rep = shared_next
        return ModelOutput(
            self.towers(task_rep),
            gate_means=means,
            gate_entropy=entropy,
            shared=representation,
        )

    def gate_experts(self) -> dict[str, list[str]]:
        """Gate key -> the experts it weighs, in gate order, named `level<l>/<task>.<k>` or
        `level<l>/shared.<s>` (the same expert has the same name in every gate seeing it)."""
        return {
            f"{gate}/level{lv}": [f"level{lv}/{e}" for e in experts]
            for lv, level in enumerate(self.levels)
            for gate, experts in level.gate_experts(self.task_names).items()
        }

    def shared_parameters(self) -> list[nn.Parameter]:
        """Encoder, shared experts and shared gates of every level."""
        params = list(self.encoder.parameters())
        for level in self.levels:
            params += list(level.shared_experts.parameters())
            if level.shared_gate is not None:
                params += list(level.shared_gate.parameters())
        return params

    def last_shared_parameters(self) -> list[nn.Parameter]:
        """The last level's shared experts' last stacked layer."""
        return last_linear(self.levels[-1].shared_experts)

    def task_parameters(self) -> dict[str, list[tuple[nn.Parameter, int | None]]]:
        """task -> its experts and gates on every level, and its tower."""
        towers = self.towers.task_parameters()
        return {
            t: [p for level in self.levels for p in level.task_parameters(i)] + towers[t]
            for i, t in enumerate(self.task_names)
        }


def build(params: dict, spec: ModelSpec) -> PLE:
    return PLE(spec, load_dataclass(PLEParams, params, prefix="model.params"))
