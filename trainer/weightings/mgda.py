"""`mgda`: MGDA-UB (Sener & Koltun, "Multi-Task Learning as Multi-Objective Optimization",
NeurIPS 2018; the Frank-Wolfe solver is its Algorithm 2).

Find simplex weights α (α_i >= 0, Σ α_i = 1 over the present tasks) minimising
||Σ_i α_i g_i||², where g_i = ∂L_i/∂Z is task i's gradient wrt the shared representation
Z = ctx.representation ([B, ...]; the "upper bound" of the paper, one `autograd.grad` per task
instead of gradients over all shared parameters). The resulting direction decreases every
task's loss unless the point is Pareto-stationary. total = Σ_i α_i L_i.

Only the Gram matrix M_ij = <g_i, g_j> enters the solver, and it is additive over the batch:
every rank computes its local [T, T] matrix from its gradients scaled by its share h_i of
each task (1/0 held or not, or its labelled count with `ctx.local_counts`), the matrices are
averaged over ranks (`ctx.all_reduce_mean`) and divided by mean(h_i) · mean(h_j), which gives
(up to a common factor) the Gram matrix of the global mean losses over the whole batch. All ranks then run the
same deterministic float64 solver on the same numbers and agree on α.

`normalization` divides g_i before solving, as in the paper's code: "none" (exact MGDA),
"l2" (unit gradients), "loss" (by L_i), "loss+" (by L_i · ||g_i||). The weights are the
solver's α, as in the paper (normalisation shapes the direction, not the loss scale).
Solver: Frank-Wolfe with exact line search (`min_norm_weights`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from manytask.schema import ConfigError
from manytask.trainer.weightings.base import (
    Weighting,
    WeightingContext,
    device_of,
    exact_sum,
    local_count,
    rank_shares,
    reduce_losses,
    task_backward,
)


@dataclass
class MGDAParams:
    normalization: Literal["none", "l2", "loss", "loss+"] = "none"
    max_iter: int = 250  # Frank-Wolfe iterations (T is small; each costs O(T²))
    tol: float = 1e-8  # stop when the duality gap falls below tol · ||current||²

    def validate(self, file: str | None) -> None:
        if self.max_iter <= 0 or self.tol < 0:
            raise ConfigError(
                f"'weighting.params' of mgda in {file}: max_iter must be positive and tol "
                f"non-negative, got max_iter={self.max_iter}, tol={self.tol}"
            )


def min_norm_weights(gram: torch.Tensor, max_iter: int = 250, tol: float = 1e-8) -> torch.Tensor:
    """Simplex weights α [T] minimising αᵀ M α for a Gram matrix M [T, T] (float64, CPU).

    Frank-Wolfe: move from α towards the vertex e_t with the smallest (Mα)_t, with the exact
    step γ = (αᵀMα - (Mα)_t) / (αᵀMα - 2(Mα)_t + M_tt) clipped to [0, 1]. Starts at the
    uniform weights; for two tasks the first step already lands on the optimum.
    """
    m = gram.to(torch.float64)
    n = m.shape[0]
    alpha = torch.full((n,), 1.0 / n, dtype=torch.float64)
    if n == 1:
        return alpha
    for _ in range(max_iter):
        m_alpha = m @ alpha
        cur = float(alpha @ m_alpha)
        t = int(torch.argmin(m_alpha))
        gap = cur - float(m_alpha[t])  # FW duality gap / 2: how much moving to e_t can still help
        if gap <= tol * max(cur, 1e-300):
            break
        denom = cur - 2.0 * float(m_alpha[t]) + float(m[t, t])  # ||x - g_t||², > 0 when gap > 0
        gamma = min(max(gap / denom, 0.0), 1.0) if denom > 0 else 1.0
        alpha = (1.0 - gamma) * alpha
        alpha[t] += gamma
    return alpha


class MGDAWeighting(Weighting):
    """No state: α is solved afresh every step from the all-reduced Gram matrix."""

    Params = MGDAParams
    gradients = "representation"

    def combine(
        self, losses: dict[str, torch.Tensor], ctx: WeightingContext
    ) -> tuple[torch.Tensor, dict[str, float]]:
        if ctx.representation is None:
            raise ValueError("mgda needs ctx.representation (the model's shared representation, requiring grad)")
        device = device_of(losses, ctx, self)
        n = len(self.task_names)
        flat = torch.zeros(n, ctx.representation.numel(), dtype=torch.float64, device=device)
        for i, task in enumerate(self.task_names):
            loss, share = losses.get(task), local_count(task, losses, ctx)
            # under ZeRO-3 every rank makes every pass: each gathers the towers it crosses
            if loss is None or share == 0 and ctx.sharding is None or not loss.requires_grad:
                continue
            (g,) = task_backward(loss, [ctx.representation], ctx)
            if g is not None and share > 0:
                flat[i] = share * g.detach().reshape(-1).to(torch.float64)
        reduced = reduce_losses(self.task_names, losses, ctx, device, extra_tensor=flat @ flat.T)
        idx = [i for i, p in enumerate(reduced.present) if p]
        alpha = self._solve(reduced.tensor, reduced.mean_count, reduced.loss, idx)
        weights = {t: 0.0 for t in self.task_names}
        for k, i in enumerate(idx):
            weights[self.task_names[i]] = alpha[k]
        return exact_sum(self.task_names, losses, weights, rank_shares(self.task_names, losses, ctx, reduced.mean_count), device), weights

    def _solve(
        self, gram: torch.Tensor, share: list[float], loss: list[float | None], idx: list[int]
    ) -> list[float]:
        """α over the present tasks `idx` from the rank-averaged Gram matrix [T, T]."""
        if not idx:
            return []
        h = torch.tensor([share[i] for i in idx], dtype=torch.float64)
        # Each global loss is a weighted mean over ranks: rescale to its gradient.
        m = gram[idx][:, idx] / (h[:, None] * h[None, :])
        mode = self.params.normalization
        norm = m.diagonal().clamp_min(0).sqrt()
        losses = torch.tensor([loss[i] for i in idx], dtype=torch.float64)
        if mode == "l2":
            scale = norm
        elif mode == "loss":
            scale = losses
        elif mode == "loss+":
            scale = losses * norm
        else:
            scale = torch.ones_like(norm)
        scale = scale.clamp_min(1e-12)
        m = m / (scale[:, None] * scale[None, :])
        if not torch.isfinite(m).all():
            # A bad step (the trainer will skip it): keep the total a plain mean so it shows.
            return [1.0 / len(idx)] * len(idx)
        return min_norm_weights(m, self.params.max_iter, self.params.tol).tolist()
