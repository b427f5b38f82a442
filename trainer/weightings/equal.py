"""`equal`: every present task's loss with weight 1 (the plain sum of task losses)."""

from __future__ import annotations

import torch

from manytask.trainer.weightings.base import (
    Weighting,
    WeightingContext,
    device_of,
    present_here,
    weighted_sum,
)


class EqualWeighting(Weighting):
    """total = Σ_i L_i over present tasks; weights are 1.0 (0.0 for absent tasks). No state."""

    def combine(
        self, losses: dict[str, torch.Tensor], ctx: WeightingContext
    ) -> tuple[torch.Tensor, dict[str, float]]:
        weights = {t: 1.0 if present_here(t, losses) else 0.0 for t in self.task_names}
        return weighted_sum(losses, weights, device_of(losses, ctx, self)), weights
