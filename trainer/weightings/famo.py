"""`famo`: Fast Adaptive Multitask Optimization (Liu, Feng, Stone & Liu, NeurIPS 2023,
arXiv:2306.03792, Algorithm 1). Checked against the authors' own copy of Algorithm 1
(github.com/Cranial-XIX/FAMO, `misc/famo.png`, shown in its README) and their `famo.py`:
line 5 is the weighting below, line 6 the logit update ξ ← ξ − β(δ + γξ) with
δ = (∂z/∂ξ)ᵀ [log L_t(before) − log L_t(after)], line 1 the floor (L ← L − L* + ε). The paper's
line 6 is a plain gradient step with γ = 0.001 by default; the authors' `famo.py` takes it with
Adam (`weight_decay=gamma`, 0.01 there), as this file does with the paper's γ.

FAMO decreases all task losses at an equal *rate* with O(1) extra cost: task logits ξ [T]
give z = softmax(ξ), and the model trains on Σ_t z_t log(L_t) / c with c = Σ_t z_t / L_t,
i.e. the loss weights

    w_t = (z_t / L_t) / Σ_s (z_s / L_s)        (× K here, so they sum to K like `equal`).

After a step the logits move towards the tasks whose log-loss fell least: with
δ_t = log L_t(before) − log L_t(after), ξ takes an Adam step (lr `lr`, weight decay `gamma`)
along the gradient (∂z/∂ξ)ᵀ δ = z ⊙ (δ − zᵀδ), which is what the official code's `update` does.

Path: losses only. The L_t are the global mean losses from one all-reduce (so every rank
holds the same ξ), and the model's backward uses `rank_shares` (exact over ranks). The loss
change is measured between consecutive steps on their own batches (the official code's
`update` with the next losses); `min_loss` is the floor subtracted before the log (0: the
losses are non-negative). State: ξ, Adam's moments and the previous losses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from manytask.schema import ConfigError
from manytask.trainer.weightings.base import (
    Weighting,
    WeightingContext,
    device_of,
    exact_sum,
    rank_shares,
    reduce_losses,
)

EPS = 1e-8


@dataclass
class FAMOParams:
    lr: float = 0.025  # Adam step size of the logits (the paper's β)
    gamma: float = 0.001  # weight decay of the logits (the paper's γ)
    min_loss: float = 0.0  # lower bound of every loss, subtracted before the log

    def validate(self, file: str | None) -> None:
        if self.lr <= 0 or self.gamma < 0:
            raise ConfigError(f"'weighting.params' of famo in {file}: lr must be positive and gamma >= 0, got lr={self.lr}, gamma={self.gamma}")


def famo_weights(logits: list[float], losses: list[float], min_loss: float) -> list[float]:
    """K · (z_t / L_t) / Σ_s (z_s / L_s), z = softmax(logits), over the K given tasks."""
    z = torch.softmax(torch.tensor(logits, dtype=torch.float64), 0)
    inv = z / (torch.tensor(losses, dtype=torch.float64) - min_loss + EPS)
    return (len(logits) * inv / inv.sum()).tolist()


def logit_gradient(logits: list[float], delta: list[float]) -> list[float]:
    """(∂ softmax(ξ)/∂ξ)ᵀ δ = z ⊙ (δ − zᵀδ)."""
    z = torch.softmax(torch.tensor(logits, dtype=torch.float64), 0)
    d = torch.tensor(delta, dtype=torch.float64)
    return (z * (d - z @ d)).tolist()


class FAMOWeighting(Weighting):
    """State: logits ξ, Adam moments m, v and step count, previous global losses."""

    Params = FAMOParams
    state_fields = ("logits", "m", "v", "updates", "prev")

    def __init__(self, tasks, params: FAMOParams | None = None) -> None:
        super().__init__(tasks, params)
        T = len(self.task_names)
        self.logits, self.m, self.v = [0.0] * T, [0.0] * T, [0.0] * T
        self.updates = 0
        self.prev: list[float | None] = [None] * T

    def combine(
        self, losses: dict[str, torch.Tensor], ctx: WeightingContext
    ) -> tuple[torch.Tensor, dict[str, float]]:
        device = device_of(losses, ctx, self)
        reduced = reduce_losses(self.task_names, losses, ctx, device)
        idx = [i for i, p in enumerate(reduced.present) if p]
        if reduced.finite:
            self._update(reduced.loss)
        weights = {t: 0.0 for t in self.task_names}
        if idx:
            floor = self.params.min_loss
            ok = reduced.finite
            values = famo_weights([self.logits[i] for i in idx], [reduced.loss[i] for i in idx], floor) if ok else [1.0] * len(idx)
            for k, i in enumerate(idx):
                weights[self.task_names[i]] = values[k]
        total = exact_sum(self.task_names, losses, weights, rank_shares(self.task_names, losses, ctx, reduced.mean_count), device)
        return total, weights

    def _update(self, loss: list[float | None]) -> None:
        """One Adam step of the logits from the loss change since the previous step."""
        p, floor = self.params, self.params.min_loss
        both = [i for i, v in enumerate(loss) if v is not None and self.prev[i] is not None]
        if len(both) >= 2:
            delta = [0.0] * len(loss)
            for i in both:
                delta[i] = math.log(self.prev[i] - floor + EPS) - math.log(loss[i] - floor + EPS)
            sub = [self.logits[i] for i in both]
            grad = dict(zip(both, logit_gradient(sub, [delta[i] for i in both])))
            self.updates += 1
            b1, b2 = 0.9, 0.999
            for i in both:
                g = grad[i] + p.gamma * self.logits[i]  # Adam's L2 weight decay, as torch.optim.Adam
                self.m[i] = b1 * self.m[i] + (1 - b1) * g
                self.v[i] = b2 * self.v[i] + (1 - b2) * g * g
                m_hat = self.m[i] / (1 - b1**self.updates)
                v_hat = self.v[i] / (1 - b2**self.updates)
                self.logits[i] -= p.lr * m_hat / (math.sqrt(v_hat) + EPS)
        for i, v in enumerate(loss):
            if v is not None:
                self.prev[i] = v
