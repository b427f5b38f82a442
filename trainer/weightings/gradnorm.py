"""`gradnorm`: GradNorm (Chen, Badrinarayanan, Lee & Rabinovich, ICML 2018).

Weights w_i (sum T) are tuned so that the gradient norm of each weighted task loss on the
last shared layer, G_i = ||∇_W w_i L_i|| = w_i ||∇_W L_i||, approaches
    target_i = mean_j(G_j) · r_i^alpha,   r_i = (L_i / L_i(0)) / mean_j(L_j / L_j(0)),
so tasks that train slower (higher relative loss) get larger gradients.

Per step: one `autograd.grad` per task wrt `ctx.shared_params` (retain_graph, so the trainer's
single backward still works), then the gradient norms and losses are averaged over the ranks
holding each task (`ctx.all_reduce_mean`: a mean of per-rank norms, which stands in for the
norm of the global gradient without reducing whole gradients). The weights themselves are
not an optimizer parameter: they take their own SGD step on L_grad = Σ_i |G_i - target_i|
(target held constant, so dL_grad/dw_i = sign(G_i - target_i) · ||∇_W L_i||), with `lr`,
are kept above `min_weight`, and the present tasks are rescaled to keep their sum, so
Σ_i w_i = T throughout. The loss of this step uses the weights before the update.
Everything is computed from all-reduced numbers, so every rank holds the same weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from manytask.config import TaskConfig
from manytask.schema import ConfigError
from manytask.trainer.weightings.base import (
    Reduced,
    Weighting,
    WeightingContext,
    device_of,
    reduce_losses,
    weighted_sum,
)


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

    def __init__(self, tasks: dict[str, TaskConfig], params: GradNormParams | None = None) -> None:
        super().__init__(tasks, params)
        self.weights: list[float] = [1.0] * len(tasks)
        self.initial: list[float | None] = [None] * len(tasks)

    def combine(
        self, losses: dict[str, torch.Tensor], ctx: WeightingContext
    ) -> tuple[torch.Tensor, dict[str, float]]:
        if not ctx.shared_params:
            raise ValueError("gradnorm needs ctx.shared_params (the last shared layer's parameters)")
        device = device_of(losses, ctx, self)
        norms: dict[str, torch.Tensor] = {}
        for task, loss in losses.items():
            if not loss.requires_grad:
                norms[task] = torch.zeros((), device=device)
                continue
            grads = torch.autograd.grad(loss, ctx.shared_params, retain_graph=True, allow_unused=True)
            sq = [g.detach().pow(2).sum() for g in grads if g is not None]
            norms[task] = torch.stack(sq).sum().sqrt() if sq else torch.zeros((), device=device)
        red = reduce_losses(self.task_names, losses, ctx, device, extra={"grad_norm": norms})
        used = {t: self.weights[i] if red.present[i] else 0.0 for i, t in enumerate(self.task_names)}
        total = weighted_sum(losses, used, device)
        if red.finite:
            self._update(red)
        return total, used

    def _update(self, red: Reduced) -> None:
        idx = [i for i, p in enumerate(red.present) if p]
        for i in idx:
            if self.initial[i] is None:
                self.initial[i] = red.loss[i]
        if len(idx) < 2:
            return  # one task: nothing to balance
        p = self.params
        gnorm = {i: red.extra["grad_norm"][i] for i in idx}
        g = {i: self.weights[i] * gnorm[i] for i in idx}
        g_mean = sum(g.values()) / len(idx)
        rate = {i: red.loss[i] / self.initial[i] if self.initial[i] > 0 else 1.0 for i in idx}
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

    def get_extra_state(self) -> dict[str, Any]:
        return {"tasks": list(self.task_names), "weights": list(self.weights), "initial": list(self.initial)}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        if list(state["tasks"]) != self.task_names:
            raise ValueError(f"gradnorm state was saved for tasks {state['tasks']}, this run has {self.task_names}")
        self.weights = [float(w) for w in state["weights"]]
        self.initial = [None if v is None else float(v) for v in state["initial"]]
