"""Softmax gates over experts, all gates in one matmul, and the statistics they report.

Layout: G gates over E experts give weights `[G, B, E]` (gate g = task g for MMoE/PLE, or a
single gate for OMoE). Gate g's parameters are slice g of `weight [G, E, in]` / `bias [G, E]`
so the trainer can treat a task's gate like the rest of its tower.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# Gate key of a gate shared by all tasks (OMoE's one gate, PLE's shared gates). The brackets
# cannot occur in a task name (manytask.config.TASK_NAME), so it never shadows a task's gate.
SHARED_GATE = "(shared)"


class SoftmaxGates(nn.Module):
    """G softmax gates over E experts.

    forward: `[B, in]` (every gate reads the same input: one `F.linear` for all gates) or
    `[G, B, in]` (gate g reads its own input: one `baddbmm`) -> weights `[G, B, E]`, each row
    summing to 1. `temperature` divides the logits; `dropout` (training only) drops whole
    expert weights per sample and renormalises the rest (a row that would lose every expert
    keeps its undropped weights).
    """

    def __init__(
        self, num_gates: int, in_dim: int, num_experts: int, temperature: float = 1.0, dropout: float = 0.0
    ):
        super().__init__()
        self.num_gates, self.num_experts = num_gates, num_experts
        self.temperature, self.dropout = temperature, dropout
        # [G, E, in] so that view(G * E, in) is free: all gates are one nn.Linear-shaped matmul.
        self.weight = nn.Parameter(torch.empty(num_gates, num_experts, in_dim))
        self.bias = nn.Parameter(torch.empty(num_gates, num_experts))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Weights uniform in ±1/sqrt(in) (as nn.Linear's), biases 0: every expert equally likely.
        (FSDP re-runs it to fill its shards: trainer/fsdp_engine.py.)"""
        bound = 1.0 / math.sqrt(self.weight.shape[-1]) if self.weight.shape[-1] > 0 else 0.0
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        G, E = self.num_gates, self.num_experts
        if x.dim() == 2:
            logits = F.linear(x, self.weight.view(G * E, -1), self.bias.view(G * E))
            # softmax on the contiguous [B, G, E]; the [G, B, E] view is what `mix` wants
            return self._normalise(logits.view(x.shape[0], G, E)).transpose(0, 1)
        logits = torch.baddbmm(self.bias.unsqueeze(1), x, self.weight.transpose(1, 2))
        return self._normalise(logits)

    def _normalise(self, logits: torch.Tensor) -> torch.Tensor:
        """Softmax over the last (expert) dim, with temperature and gate dropout."""
        w = torch.softmax(logits / self.temperature if self.temperature != 1.0 else logits, dim=-1)
        if self.training and self.dropout > 0:
            keep = torch.rand_like(w) >= self.dropout
            kept = w * keep
            total = kept.sum(-1, keepdim=True)
            w = torch.where(total > 0, kept / total.clamp_min(1e-12), w)
        return w

    def gate_parameters(self, g: int) -> list[tuple[nn.Parameter, int]]:
        """Gate g's parameters as (stacked tensor, slice index along dim 0)."""
        return [(self.weight, g), (self.bias, g)]


def mix(weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """Weighted sum of expert outputs per gate, as one batched matmul.

    weights `[G, B, E]`, experts `[E, B, D]` (shared by all gates) or `[G, E, B, D]`
    (per gate) -> `[G, B, D]`. Unlike `(w[..., None] * e).sum()`, nothing of size
    `[G, B, E, D]` is materialised.
    """
    if experts.dim() == 3:
        # bmm over the batch: [B, G, E] @ [B, E, D] -> [B, G, D]
        out = torch.bmm(weights.transpose(0, 1), experts.transpose(0, 1))
        return out.transpose(0, 1)
    # per gate: [G*B, 1, E] @ [G*B, E, D]
    G, E, B, D = experts.shape
    out = torch.bmm(weights.reshape(G * B, 1, E), experts.permute(0, 2, 1, 3).reshape(G * B, E, D))
    return out.view(G, B, D)


@torch.no_grad()
def gate_statistics(weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weights `[G, B, E]` -> (batch-mean weight per expert `[G, E]`, mean per-sample entropy
    `[G]`), both detached."""
    w = weights.detach().float()
    means = w.mean(dim=1)
    entropy = -(w * w.clamp_min(1e-12).log()).sum(-1).mean(dim=1)
    return means, entropy


def load_balance_loss(weights: torch.Tensor) -> torch.Tensor:
    """Squared coefficient of variation of each gate's batch-mean expert weights (Shazeer et
    al. 2017's importance loss), averaged over gates: 0 for perfectly balanced experts,
    E - 1 when one expert takes everything. weights `[G, B, E]` -> scalar."""
    E = weights.shape[-1]
    means = weights.mean(dim=1)  # [G, E], each row sums to 1: mean 1/E
    return (E * means.pow(2).sum(-1) - 1.0).mean()


def gate_outputs(
    keys: list[str], weights: torch.Tensor
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Per-key gate statistics for ModelOutput: keys name the G gates of weights `[G, B, E]`."""
    means, entropy = gate_statistics(weights)
    return {k: means[i] for i, k in enumerate(keys)}, {k: entropy[i] for i, k in enumerate(keys)}
