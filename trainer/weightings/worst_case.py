"""`worst_case`: minimax-style weighting that emphasises the currently worst task.

    w_i = K · softmax_i(ℓ_i / temperature)       over the K present tasks (sum K)
    ℓ_i = EMA of task i's all-reduced loss, divided by its first loss L_i(0) if `normalize`

A soft version of min_θ max_i L_i (cf. group DRO, Sagawa et al. 2020): as the temperature
falls, all the weight goes to the worst task; as it grows, the weights approach `equal`. Normalising
by the initial loss makes losses of different scales (cross-entropy vs MSE) comparable:
"worst" then means "least relative progress". The EMA damps the batch-to-batch noise that
would otherwise make the argmax jump around. An absent task keeps its EMA untouched; a step
with non-finite losses updates nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from manytask.config import TaskConfig
from manytask.schema import ConfigError
from manytask.trainer.weightings.base import (
    Weighting,
    WeightingContext,
    device_of,
    exact_sum,
    rank_shares,
    reduce_losses,
    softmax_weights,
)


@dataclass
class WorstCaseParams:
    temperature: float = 0.5  # smaller concentrates the weight on the worst task
    ema: float = 0.9  # weight of the past in the loss EMA (0 = this step's loss only)
    normalize: bool = True  # divide by each task's first loss

    def validate(self, file: str | None) -> None:
        if self.temperature <= 0 or not 0.0 <= self.ema < 1.0:
            raise ConfigError(
                f"'weighting.params' of worst_case in {file}: need temperature > 0 and 0 <= ema < 1, "
                f"got temperature={self.temperature}, ema={self.ema}"
            )


class WorstCaseWeighting(Weighting):
    """State (plain python): per-task loss EMA and first loss (None until the task is seen)."""

    Params = WorstCaseParams
    state_fields = ("smoothed", "initial")

    def __init__(self, tasks: dict[str, TaskConfig], params: WorstCaseParams | None = None) -> None:
        super().__init__(tasks, params)
        self.smoothed: list[float | None] = [None] * len(tasks)
        self.initial: list[float | None] = [None] * len(tasks)

    def combine(
        self, losses: dict[str, torch.Tensor], ctx: WeightingContext
    ) -> tuple[torch.Tensor, dict[str, float]]:
        device = device_of(losses, ctx, self)
        reduced = reduce_losses(self.task_names, losses, ctx, device)
        beta = self.params.ema
        if reduced.finite:
            for i, present in enumerate(reduced.present):
                if not present:
                    continue
                x = reduced.loss[i]
                if self.initial[i] is None:
                    self.initial[i] = x
                prev = self.smoothed[i]
                self.smoothed[i] = x if prev is None else beta * prev + (1.0 - beta) * x
        scores: list[float | None] = []
        for i, present in enumerate(reduced.present):
            ema, first = self.smoothed[i], self.initial[i]
            if not present or ema is None:
                scores.append(None)
            elif self.params.normalize and first is not None and first > 0:
                scores.append(ema / first)
            else:
                scores.append(ema)
        w = softmax_weights(scores, self.params.temperature)
        weights = {}
        for i, task in enumerate(self.task_names):
            # A present task not yet scored (its first loss was not finite) still enters the
            # total with weight 1, so the trainer sees the bad loss and skips the step.
            weights[task] = w[i] if scores[i] is not None or not reduced.present[i] else 1.0
        return exact_sum(self.task_names, losses, weights, rank_shares(self.task_names, losses, ctx, reduced.mean_count), device), weights
