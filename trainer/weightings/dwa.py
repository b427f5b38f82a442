"""`dwa`: Dynamic Weight Average (Liu, Johns & Davison, "End-to-End Multi-Task Learning with
Attention", CVPR 2019).

    w_i(t) = K · exp(r_i / T) / Σ_j exp(r_j / T),   r_i = L̄_i(k-1) / L̄_i(k-2)

over the K present tasks (weights sum to K), where L̄_i(k) is task i's average loss over
window k. The paper averages over epochs; a streamed run has no epochs, so a window is
`window` optimizer steps (window k = step // window). A task whose loss falls more slowly
(r_i near or above 1) gets more weight. Until a task has two complete windows, r_i = 1.
Losses are averaged over ranks (`ctx.all_reduce_mean`) before they enter the windows, so all
ranks keep the same history and weights. A step whose losses are not finite is not recorded.
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
class DWAParams:
    temperature: float = 2.0  # T: larger is closer to equal weights (the paper uses 2)
    window: int = 100  # optimizer steps per averaging window (the paper's "epoch")

    def validate(self, file: str | None) -> None:
        if self.temperature <= 0 or self.window <= 0:
            raise ConfigError(
                f"'weighting.params' of dwa in {file}: temperature and window must be positive, "
                f"got temperature={self.temperature}, window={self.window}"
            )


class DWAWeighting(Weighting):
    """State (plain python): current window index, its running sums/counts, last two averages."""

    Params = DWAParams
    state_fields = ("window_index", "sums", "counts", "prev", "prev2")

    def __init__(self, tasks: dict[str, TaskConfig], params: DWAParams | None = None) -> None:
        super().__init__(tasks, params)
        n = len(tasks)
        self.window_index: int | None = None
        self.sums = [0.0] * n
        self.counts = [0] * n
        self.prev: list[float | None] = [None] * n  # average of the last closed window
        self.prev2: list[float | None] = [None] * n  # ... and of the one before

    def _close_window(self) -> None:
        for i, c in enumerate(self.counts):
            if c > 0:  # a task unseen in this window keeps its history
                self.prev2[i], self.prev[i] = self.prev[i], self.sums[i] / c
        self.sums = [0.0] * len(self.sums)
        self.counts = [0] * len(self.counts)

    def combine(
        self, losses: dict[str, torch.Tensor], ctx: WeightingContext
    ) -> tuple[torch.Tensor, dict[str, float]]:
        device = device_of(losses, ctx, self)
        reduced = reduce_losses(self.task_names, losses, ctx, device)
        window = ctx.step // self.params.window
        if self.window_index is None:
            self.window_index = window
        elif window != self.window_index:
            self._close_window()
            self.window_index = window
        scores: list[float | None] = []
        for i, present in enumerate(reduced.present):
            a, b = self.prev[i], self.prev2[i]
            ratio = a / b if a is not None and b is not None and b > 0 else 1.0
            scores.append(ratio if present else None)
        w = softmax_weights(scores, self.params.temperature)
        weights = dict(zip(self.task_names, w))
        if reduced.finite:
            for i, present in enumerate(reduced.present):
                if present:
                    self.sums[i] += reduced.loss[i]
                    self.counts[i] += 1
        return exact_sum(self.task_names, losses, weights, rank_shares(self.task_names, losses, ctx, reduced.mean_count), device), weights
