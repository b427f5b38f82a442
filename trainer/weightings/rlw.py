"""`rlw`: Random Loss Weighting (Lin, Ye, Xu, Shi & Zhang, "Reasonable Effectiveness of Random
Weighting: A Litmus Test for Multi-Task Learning", TMLR 2022, arXiv:2111.10603, Algorithm 2).

Every step draws λ = softmax(z), z ~ N(0, I_K) over the K present tasks, and trains on
Σ_t K λ_t L_t (scaled by K so that the weights sum to K, like `equal`, and one learning
rate serves both). The paper's point: many "adaptive" methods do no better than this.

Path: losses only, no collective. The draw comes from a generator seeded by (run seed, step),
so every rank draws the same weights without communicating and a resumed run draws what the
uninterrupted one would have. Like `equal`, presence is decided from the local losses
(the trainer always passes every task).
"""

from __future__ import annotations

import torch

from manytask.trainer.weightings.base import (
    Weighting,
    WeightingContext,
    device_of,
    present_here,
    weighted_sum,
)


def rlw_draw(seed: int, step: int, k: int) -> list[float]:
    """K · softmax(z), z ~ N(0, I_k) from a generator seeded by (seed, step)."""
    gen = torch.Generator().manual_seed((seed * 1_000_003 + step) % (2**63))
    z = torch.randn(k, generator=gen, dtype=torch.float64)
    return (k * torch.softmax(z, 0)).tolist()


class RLWWeighting(Weighting):
    """No state: the weights are a function of (seed, step)."""

    def combine(
        self, losses: dict[str, torch.Tensor], ctx: WeightingContext
    ) -> tuple[torch.Tensor, dict[str, float]]:
        here = [t for t in self.task_names if present_here(t, losses)]
        drawn = dict(zip(here, rlw_draw(ctx.seed, ctx.step, len(here)))) if here else {}
        weights = {t: drawn.get(t, 0.0) for t in self.task_names}
        return weighted_sum(losses, weights, device_of(losses, ctx, self)), weights
