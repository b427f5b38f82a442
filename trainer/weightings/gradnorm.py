"""`gradnorm`: GradNorm (Chen, Badrinarayanan, Lee & Rabinovich, ICML 2018).

Weights w_i (sum T) are tuned so that the gradient norm of each weighted task loss on the
last shared layer, G_i = ||∇_W w_i L_i|| = w_i ||∇_W L_i||, approaches
    target_i = mean_j(G_j) · r_i^alpha,   r_i = (L_i / L_i(0)) / mean_j(L_j / L_j(0)),
so tasks that train slower (higher relative loss) get larger gradients.

Path: per-task gradients of the last shared layer (`ctx.last_shared_layer`) through
`task_gradients.py`, i.e. exact over ranks; ||∇_W L_i|| is the square root of the Gram
matrix's diagonal, and the losses come out of the same collective. The weights themselves are
not an optimizer parameter: they take their own SGD step on L_grad = Σ_i |G_i - target_i|
(target held constant, so dL_grad/dw_i = sign(G_i - target_i) · ||∇_W L_i||), with `lr`,
are kept above `min_weight`, and the present tasks are rescaled to keep their sum, so
Σ_i w_i = T throughout. The loss of this step uses the weights before the update.
Everything is computed from all-reduced numbers, so every rank holds the same weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from manytask.config import TaskConfig
from manytask.schema import ConfigError
from manytask.trainer.weightings.base import (
    Reduced,
    Weighting,
    WeightingContext,
    device_of,
    exact_sum,
    rank_shares,
)
from manytask.trainer.weightings.task_gradients import task_gradients


@dataclass
class GradNormParams:
    alpha: float = 1.5  # strength of the pull towards equal training rates (0 = equal norms)
    lr: float = 0.025  # step size of the weights' own update
    min_weight: float = 1e-3  # weights are clipped here before renormalising

    def validate(self, file: str | None) -> None:
        if self.lr <= 0 or self.min_weight <= 0 or self.alpha < 0:
            raise ConfigError(
                f"'weighting.params' of gradnorm in {file}: lr and min_weight must be positive "
                f"and alpha non-negative, got lr={self.lr}, min_weight={self.min_weight}, alpha={self.alpha}"
            )


class GradNormWeighting(Weighting):
    """State: `weights` (T floats, sum T) and `initial` losses L_i(0) (None until first seen)."""

    Params = GradNormParams
    gradients = "last_layer"
    state_fields = ("weights", "initial")

    def __init__(self, tasks: dict[str, TaskConfig], params: GradNormParams | None = None) -> None:
        super().__init__(tasks, params)
        self.weights: list[float] = [1.0] * len(tasks)
        self.initial: list[float | None] = [None] * len(tasks)

    def combine(
        self, losses: dict[str, torch.Tensor], ctx: WeightingContext
    ) -> tuple[torch.Tensor, dict[str, float]]:
        if not ctx.last_shared_layer:
            raise ValueError("gradnorm needs ctx.last_shared_layer (the last shared layer's parameters)")
        device = device_of(losses, ctx, self)
        tg = task_gradients(self.task_names, losses, ctx.last_shared_layer, ctx, device)
        norms = tg.gram.diagonal().clamp_min(0).sqrt().tolist()
        reduced = Reduced(
            present=tg.present, loss=tg.losses, mean_count=tg.counts,
            extra={"grad_norm": [norms[i] if p else None for i, p in enumerate(tg.present)]},
        )
        used = {t: self.weights[i] if reduced.present[i] else 0.0 for i, t in enumerate(self.task_names)}
        total = exact_sum(self.task_names, losses, used, rank_shares(self.task_names, losses, ctx, tg.counts), device)
        if reduced.finite:
            self._update(reduced)
        return total, used

    def _update(self, reduced: Reduced) -> None:
        idx = [i for i, p in enumerate(reduced.present) if p]
        for i in idx:
            if self.initial[i] is None:
                self.initial[i] = reduced.loss[i]
        if len(idx) < 2:
            return  # one task: nothing to balance
        p = self.params
        gnorm = {i: reduced.extra["grad_norm"][i] for i in idx}
        g = {i: self.weights[i] * gnorm[i] for i in idx}
        g_mean = sum(g.values()) / len(idx)
        rate = {i: reduced.loss[i] / self.initial[i] if self.initial[i] > 0 else 1.0 for i in idx}
        rate_mean = sum(rate.values()) / len(idx)
        old_sum = sum(self.weights[i] for i in idx)
        new = {}
        for i in idx:
            r = rate[i] / rate_mean if rate_mean > 0 else 1.0
            target = g_mean * r**p.alpha
            step = math.copysign(gnorm[i], g[i] - target) if g[i] != target else 0.0
            new[i] = max(self.weights[i] - p.lr * step, p.min_weight)
        scale = old_sum / sum(new.values())
        for i in idx:
            self.weights[i] = new[i] * scale
