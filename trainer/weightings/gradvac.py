"""`gradvac`: Gradient Vaccine (Wang, Tsvetkov, Firat & Cao, "Gradient Vaccine: Investigating and
Improving Multi-task Optimization in Massively Multilingual Models", ICLR 2021,
arXiv:2010.05874, the Gradient Vaccine update and its EMA targets; equation and section numbers
not verified: neither the paper's text nor the authors' code was reachable here, and the
formula below agrees with LibMTL's and TorchJD's implementations).

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

from dataclasses import dataclass

import numpy as np
import torch

from manytask.schema import ConfigError
from manytask.trainer.weightings.pcgrad import visit_orders
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
    """(c [K], updated targets [K][K]) for a Gram matrix M [K, K] and the pairs' targets.

    Row i of `coeff` is the adjusted g_i over the original g's, so its norm is
    sqrt(coeff[i] M coeff[i]) and its dot with g_j is coeff[i]·M[:, j]. As in `pcgrad`, the
    adjustments of one task are sequential but the tasks are independent: round k adjusts every
    task towards the k-th task of its own order (`visit_orders`) at once.
    """
    m = gram.detach().double().cpu().numpy()
    K = m.shape[0]
    new = np.array(targets, dtype=np.float64).reshape(K, K)
    order, real = visit_orders(np.diag(m), order_seed)
    columns = m.T.copy()  # columns[j] = M[:, j]
    norm = np.sqrt(np.clip(np.diag(m), 0.0, None))  # ||g_j||
    coeff = np.eye(K)
    rows = np.arange(K)
    for k in range(order.shape[1]):
        j = order[:, k]
        gi_norm = np.sqrt(np.clip(np.einsum("ij,ij->i", coeff @ m, coeff), 0.0, None))
        moved = real[:, k] & (gi_norm > 0)  # a zero g_i has no direction: left alone
        with np.errstate(divide="ignore", invalid="ignore"):
            phi = np.clip(np.einsum("ij,ij->i", coeff, columns[j]) / (gi_norm * norm[j]), -1.0, 1.0)
            target = new[rows, j]
            # Cosine 1 is reached only in the limit (an infinite step along g_j): such a target is skipped.
            below = moved & (phi < target) & (target < 1.0)
            root = np.sqrt(1 - target**2)
            w = gi_norm * (target * np.sqrt(1 - phi**2) - phi * root) / (norm[j] * root)
        coeff[rows[below], j[below]] += w[below]
        new[rows[moved], j[moved]] = (1 - beta) * target[moved] + beta * phi[moved]
    return torch.from_numpy(coeff.sum(0)), new.tolist()


class GradVacWeighting(CoefficientWeighting):
    """State: `targets` [T][T], the EMA similarity target of every ordered task pair."""

    Params = GradVacParams
    state_fields = ("targets",)

    def __init__(self, tasks, params: GradVacParams | None = None) -> None:
        super().__init__(tasks, params)
        T = len(self.task_names)
        self.targets = [[0.0] * T for _ in range(T)]

    def coefficients(self, gram: torch.Tensor, losses: list[float], idx: list[int], step: int) -> list[float]:
        targets = np.array(self.targets, dtype=np.float64)
        pairs = np.ix_(idx, idx)
        coeff, sub = gradvac_coefficients(gram, targets[pairs].tolist(), self.params.beta, order_seed=step)
        targets[pairs] = sub
        self.targets = targets.tolist()
        return coeff.tolist()
