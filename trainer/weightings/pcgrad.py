"""`pcgrad`: gradient surgery (Yu, Kumar, Gupta, Levine, Hausman & Finn, "Gradient Surgery for
Multi-Task Learning", NeurIPS 2020, Algorithm 1).

On the shared parameters, each task's gradient g_i is projected off every other task's
gradient it conflicts with: if g_i · g_j < 0, g_i ← g_i − (g_i · g_j / ||g_j||²) g_j (Alg. 1,
line 6), visiting the other tasks in a random order; the shared parameters then step along
Σ_i g_i. Every task-specific parameter (towers, task gates) keeps its ordinary gradient.

Path: the shared gradients come from `task_gradients.py` (exact over ranks); the projections
are computed on the Gram matrix alone (each projected g_i is kept as coefficients over the
original gradients, so a dot product is a row of M = G Gᵀ), giving d = Σ_t c_t g_t. Because
the towers keep coefficient 1 (unlike the one-backward methods), `combine` returns the plain
sum of the losses for the trainer's backward and `before_step` writes d into the shared
parameters' `.grad` (over micro-batches: their mean). Memory: T × (shared parameters) floats.
Under DeepSpeed d goes into the engine's gradients (ZeRO-3: each rank's partition of d);
`gradvac` is the one-backward relative.
"""

from __future__ import annotations

import random

import numpy as np
import torch

from manytask.trainer.weightings.base import (
    Weighting,
    WeightingContext,
    exact_sum,
    rank_shares,
)
from manytask.trainer.weightings.task_gradients import SurgeryBuffer, shared_task_gradients


def visit_orders(diag: np.ndarray, order_seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The order in which each task visits the others: ([T, T-1] task indices, [T, T-1] mask
    of real entries). Row i is a shuffle of the tasks j ≠ i with a nonzero gradient (diag =
    the Gram matrix's diagonal ||g_j||²), padded at the end; shuffled by one
    `random.Random(order_seed)`, task after task (the order a per-pair loop would draw)."""
    T = len(diag)
    rng = random.Random(order_seed)
    order = np.zeros((T, max(T - 1, 0)), dtype=np.int64)
    real = np.zeros(order.shape, dtype=bool)
    nonzero = [j for j in range(T) if diag[j] > 0]
    for i in range(T):
        others = [j for j in nonzero if j != i]
        rng.shuffle(others)
        order[i, : len(others)] = others
        real[i, : len(others)] = True
    return order, real


def pcgrad_coefficients(gram: torch.Tensor, order_seed: int) -> torch.Tensor:
    """PCGrad's surgery on a Gram matrix M [T, T] -> c [T] with Σ_i projected g_i = Σ_t c_t g_t.

    A task with a zero gradient (no labels) neither changes nor gets projected. Row i of
    `coeff` is projected g_i over the original g's, so (projected g_i)·g_j = coeff[i]·M[:, j].
    The projections of one task are sequential, but the T tasks are independent: round k
    projects every task off the k-th task of its own order at once (T − 1 rounds of [T, T]
    array operations instead of T(T − 1) scalar steps).
    """
    m = gram.detach().double().cpu().numpy()
    T = m.shape[0]
    order, real = visit_orders(np.diag(m), order_seed)
    columns = m.T.copy()  # columns[j] = M[:, j]
    coeff = np.eye(T)
    rows = np.arange(T)
    for k in range(order.shape[1]):
        j = order[:, k]
        dot = np.einsum("ij,ij->i", coeff, columns[j])  # (projected g_i) · g_j, per row i
        hit = real[:, k] & (dot < 0)
        coeff[rows[hit], j[hit]] -= dot[hit] / m[j[hit], j[hit]]
    return torch.from_numpy(coeff.sum(0))


def project_conflicts(grads: torch.Tensor, order_seed: int) -> torch.Tensor:
    """PCGrad's surgery on per-task gradients `[T, P]` -> the summed projected gradient `[P]`."""
    c = pcgrad_coefficients(grads.double() @ grads.double().T, order_seed)
    return (c @ grads.double()).to(grads.dtype)


class PCGradWeighting(Weighting):
    """No persistent state; holds the projected shared gradient between backward and step."""

    gradients = "shared"
    surgery = True

    def __init__(self, tasks, params=None) -> None:
        super().__init__(tasks, params)
        self.surgery = SurgeryBuffer()

    def combine(
        self, losses: dict[str, torch.Tensor], ctx: WeightingContext
    ) -> tuple[torch.Tensor, dict[str, float]]:
        params, device, tg = shared_task_gradients(self, losses, ctx)
        c = pcgrad_coefficients(tg.gram, order_seed=ctx.step).to(tg.grads.device, tg.grads.dtype)
        self.surgery.add(ctx.step, params, c @ tg.grads)
        weights = {t: 1.0 if tg.present[i] else 0.0 for i, t in enumerate(self.task_names)}
        shares = rank_shares(self.task_names, losses, ctx, tg.counts)  # towers: exact over ranks
        return exact_sum(self.task_names, losses, weights, shares, device), weights

    def before_step(self) -> None:
        """Replace the shared parameters' gradients by the projected sum (mean over micro-batches)."""
        self.surgery.write()
