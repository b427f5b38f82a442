"""`gradvac`: Gradient Vaccine (Wang, Tsvetkov, Firat & Cao, "Gradient Vaccine: Investigating and
Improving Multi-task Optimization in Massively Multilingual Models", ICLR 2021,
arXiv:2010.05874, Sec. 3).

Like PCGrad, but towards a target similarity instead of orthogonality: each pair keeps an
EMA target φ̂_ij ← (1 − β) φ̂_ij + β φ_ij of its observed cosine φ_ij, and when
φ_ij < φ̂_ij, g_i is moved along g_j until their cosine is φ̂_ij:

    g_i ← g_i + g_j · ||g_i|| (φ̂_ij √(1 − φ_ij²) − φ_ij √(1 − φ̂_ij²)) / (||g_j|| √(1 − φ̂_ij²)).

Targets start at 0 (so the first step is PCGrad); the other tasks are visited in a random
order drawn from the step. The shared step is Σ_i g_i.
Path: coefficients — each adjusted g_i is kept as coefficients over the original gradients,
so cosines and norms are Gram-matrix products; one backward of Σ_t c_t L_t, exact over ranks
(unlike `pcgrad`, the towers then get c_t times their gradient). One similarity target per
task pair over all shared parameters (the paper also has per-layer variants).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch

from manytask.schema import ConfigError
from manytask.trainer.weightings.task_gradients import CoefficientWeighting


@dataclass
class GradVacParams:
    beta: float = 0.5  # EMA rate of the similarity targets

    def validate(self, file: str | None) -> None:
        if not 0 < self.beta <= 1:
            raise ConfigError(f"'weighting.params.beta' of gradvac in {file}: expected in (0, 1], got {self.beta}")


def gradvac_coefficients(
    gram: torch.Tensor, targets: list[list[float]], beta: float, order_seed: int
) -> tuple[torch.Tensor, list[list[float]]]:
    """(c [K], updated targets [K][K]) for a Gram matrix M [K, K] and the pairs' targets."""
    m = gram.double()
    K = m.shape[0]
    new = [row[:] for row in targets]
    coeff = torch.eye(K, dtype=torch.float64)
    rng = random.Random(order_seed)
    for i in range(K):
        others = [j for j in range(K) if j != i and m[j, j] > 0]
        rng.shuffle(others)
        for j in others:
            gi_norm = math.sqrt(max(float(coeff[i] @ m @ coeff[i]), 0.0))
            gj_norm = math.sqrt(float(m[j, j]))
            if gi_norm == 0:
                continue
            phi = float(coeff[i] @ m[:, j]) / (gi_norm * gj_norm)
            phi = max(-1.0, min(1.0, phi))
            target = new[i][j]
            if phi < target:
                w = gi_norm * (target * math.sqrt(1 - phi**2) - phi * math.sqrt(1 - target**2))
                w /= gj_norm * math.sqrt(1 - target**2)
                coeff[i, j] += w
            new[i][j] = (1 - beta) * target + beta * phi
    return coeff.sum(0), new


class GradVacWeighting(CoefficientWeighting):
    """State: `targets` [T][T], the EMA similarity target of every ordered task pair."""

    Params = GradVacParams
    state_fields = ("targets",)

    def __init__(self, tasks, params: GradVacParams | None = None) -> None:
        super().__init__(tasks, params)
        T = len(self.task_names)
        self.targets = [[0.0] * T for _ in range(T)]

    def coefficients(self, gram: torch.Tensor, losses: list[float], idx: list[int], step: int) -> list[float]:
        sub = [[self.targets[a][b] for b in idx] for a in idx]
        coeff, sub = gradvac_coefficients(gram, sub, self.params.beta, order_seed=step)
        for x, a in enumerate(idx):
            for y, b in enumerate(idx):
                self.targets[a][b] = sub[x][y]
        return coeff.tolist()
