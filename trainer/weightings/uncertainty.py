"""`uncertainty`: homoscedastic-uncertainty weighting (Kendall, Gal & Cipolla, CVPR 2018).

Each task i has a learnable log-variance s_i (an `nn.Parameter`):

    convention "simple" (LibMTL's):  total = Σ_i exp(-s_i) L_i + s_i          w_i = exp(-s_i)
    convention "kendall":            total = Σ_i c_i exp(-s_i) L_i + s_i / 2   w_i = c_i exp(-s_i)
                                     c_i = 1/2 for regression/forecast (Gaussian likelihood),
                                     c_i = 1 for classification (scaled softmax)

At the optimum exp(s_i) ∝ L_i, so a noisier (higher-loss) task gets a smaller weight.

The trainer must put `weighting.parameters()` into the optimizer and all-reduce their
gradients like the model's. The s-gradient is built from the all-reduced loss (not this
rank's), so it is already identical on every rank and the s_i (hence the weights) stay in
agreement; the model gradient uses this rank's loss, as usual.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

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
)


@dataclass
class UncertaintyParams:
    init_log_var: float = 0.0  # s_i at step 0 (weight exp(-s_i) = 1)
    convention: Literal["simple", "kendall"] = "simple"


class UncertaintyWeighting(Weighting):
    """Learnable log-variances `log_vars` [T] (recipe task order); see the module docstring."""

    Params = UncertaintyParams

    def __init__(self, tasks: dict[str, TaskConfig], params: UncertaintyParams | None = None) -> None:
        super().__init__(tasks, params)
        p = self.params
        if not math.isfinite(p.init_log_var):
            raise ConfigError(f"'weighting.params.init_log_var': expected a finite float, got {p.init_log_var}")
        self.log_vars = torch.nn.Parameter(torch.full((len(tasks),), float(p.init_log_var)))
        if p.convention == "kendall":
            self.loss_scale = [0.5 if c.type in ("regression", "forecast") else 1.0 for c in tasks.values()]
            self.reg_scale = 0.5
        else:
            self.loss_scale = [1.0] * len(tasks)
            self.reg_scale = 1.0

    def combine(
        self, losses: dict[str, torch.Tensor], ctx: WeightingContext
    ) -> tuple[torch.Tensor, dict[str, float]]:
        device = device_of(losses, ctx, self)
        reduced = reduce_losses(self.task_names, losses, ctx, device)
        s = self.log_vars.to(device)
        w = torch.tensor(self.loss_scale, device=device) * torch.exp(-s)
        values = w.detach().tolist()
        weights = {t: values[i] if reduced.present[i] else 0.0 for i, t in enumerate(self.task_names)}
        total = exact_sum(self.task_names, losses, weights, rank_shares(self.task_names, losses, ctx, reduced.mean_count), device)  # the model's part: w_i held constant
        for i in range(len(self.task_names)):
            if reduced.present[i]:  # an absent task adds no term: its s_i gets a zero gradient
                # (w_i - w_i.detach()) * L̄_i has value 0 and gives d/ds_i from the all-reduced
                # loss L̄_i, the same on every rank.
                total = total + (w[i] - w[i].detach()) * reduced.loss[i] + self.reg_scale * s[i]
        return total, weights
