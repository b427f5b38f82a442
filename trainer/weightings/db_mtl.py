"""`db_mtl`: Dual-Balancing Multi-Task Learning (Lin, Jiang, Ye, Zhang, Chen, Chen, Liu, Tsang &
Kwok, "Dual-Balancing for Multi-Task Learning", arXiv:2308.12029, Neural Networks: loss-scale
balancing by the log transform, gradient-magnitude balancing by the maximum norm).

Loss scale: every task trains on log L_t, so its gradient is ∇L_t / L_t. Gradient magnitude:
a running average of those gradients, ĝ_t ← ∇log L_t + (β / k^σ) (ĝ_t − ∇log L_t) at the k-th
update, and the shared parameters step along

    d = Σ_t (max_s ||ĝ_s|| / ||ĝ_t||) ĝ_t,

every task's gradient rescaled to the largest norm.

Path: surgery. The shared gradients come from `task_gradients.py` (exact over ranks); because
d is built from the running buffer (past gradients, not only this step's), it cannot be a
combination of this step's gradients: `combine` returns Σ_t L_t / L̄_t (towers get the
log-loss gradients, as in the paper) and `before_step` writes d into the shared parameters'
`.grad`. State: the buffer ĝ [T, P] (T × shared parameters floats) and k. DeepSpeed ZeRO 0-2:
d goes into the engine's gradients; not ZeRO-3, where each rank would hold a part of ĝ.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from manytask.schema import ConfigError
from manytask.trainer.weightings.base import (
    Weighting,
    WeightingContext,
    exact_sum,
    rank_shares,
)
from manytask.trainer.weightings.task_gradients import SurgeryBuffer, shared_task_gradients

EPS = 1e-8


@dataclass
class DBMTLParams:
    beta: float = 0.9  # weight of the running buffer
    beta_sigma: float = 0.5  # its decay with the update count: β / k^σ

    def validate(self, file: str | None) -> None:
        if not 0 <= self.beta < 1 or self.beta_sigma < 0:
            raise ConfigError(f"'weighting.params' of db_mtl in {file}: beta must be in [0, 1) and beta_sigma >= 0, got beta={self.beta}, beta_sigma={self.beta_sigma}")


def balanced_direction(buffer: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """Σ_t (max_s ||ĝ_s|| / ||ĝ_t||) ĝ_t over `rows` of the buffer [T, P] -> [P]."""
    g = buffer[rows].double()
    norms = g.norm(dim=1)
    scale = norms.max() / (norms + EPS)
    return (scale @ g).to(buffer.dtype)


class DBMTLWeighting(Weighting):
    Params = DBMTLParams
    gradients = "shared"
    surgery = True
    # not ZeRO-3: its running gradient buffer [T, P] is state every rank must hold whole
    deepspeed_stages = (0, 1, 2)
    state_fields = ("buffer", "updates")

    def __init__(self, tasks, params: DBMTLParams | None = None) -> None:
        super().__init__(tasks, params)
        self.buffer: torch.Tensor | None = None  # ĝ [T, P], created at the first step
        self.updates = 0
        self.surgery = SurgeryBuffer()

    def combine(
        self, losses: dict[str, torch.Tensor], ctx: WeightingContext
    ) -> tuple[torch.Tensor, dict[str, float]]:
        params, device, tg = shared_task_gradients(self, losses, ctx)
        rows = [i for i, p in enumerate(tg.present) if p]
        finite = all(tg.losses[i] is not None and torch.isfinite(torch.tensor(tg.losses[i])) for i in rows)
        finite = finite and bool(torch.isfinite(tg.grads).all())
        weights = {t: 0.0 for t in self.task_names}
        for i in rows:
            weights[self.task_names[i]] = 1.0 / (tg.losses[i] + EPS) if finite else 1.0
        if rows and finite:
            log_grads = tg.grads / torch.tensor([(v or 1.0) + EPS for v in tg.losses], device=tg.grads.device)[:, None]
            if self.buffer is None:
                self.buffer = torch.zeros_like(log_grads)
            self.updates += 1
            decay = self.params.beta / self.updates**self.params.beta_sigma
            self.buffer[rows] = log_grads[rows] + decay * (self.buffer[rows] - log_grads[rows])
            self.surgery.add(ctx.step, params, balanced_direction(self.buffer, rows))
        total = exact_sum(self.task_names, losses, weights, rank_shares(self.task_names, losses, ctx, tg.counts), device)
        return total, weights

    def before_step(self) -> None:
        self.surgery.write()
