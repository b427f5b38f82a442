"""`static`: fixed weights from the recipe (`tasks.<task>.loss_weight`, or `params.weights`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from manytask.config import TaskConfig
from manytask.schema import ConfigError
from manytask.trainer.weightings.base import (
    Weighting,
    WeightingContext,
    check_task_keys,
    device_of,
    present_here,
    weighted_sum,
)


@dataclass
class StaticParams:
    weights: dict[str, float] = field(default_factory=dict)  # task -> weight; overrides loss_weight


class StaticWeighting(Weighting):
    """total = Σ_i w_i L_i with w_i = params.weights[task], else tasks.<task>.loss_weight.

    Weights are reported as configured (0.0 for absent tasks); they need not sum to anything.
    """

    Params = StaticParams

    def __init__(self, tasks: dict[str, TaskConfig], params: StaticParams | None = None) -> None:
        super().__init__(tasks, params)
        check_task_keys(self.params.weights, self.task_names, "weighting.params.weights")
        self.fixed = {t: self.params.weights.get(t, cfg.loss_weight) for t, cfg in tasks.items()}
        for t, w in self.fixed.items():
            if not math.isfinite(w) or w < 0:
                raise ConfigError(f"weight of task '{t}': expected a finite non-negative float, got {w}")

    def combine(
        self, losses: dict[str, torch.Tensor], ctx: WeightingContext
    ) -> tuple[torch.Tensor, dict[str, float]]:
        weights = {t: self.fixed[t] if present_here(t, losses) else 0.0 for t in self.task_names}
        return weighted_sum(losses, weights, device_of(losses, ctx, self)), weights
