"""`imtl_g`, `imtl_l` and `imtl` (the hybrid): Impartial Multi-Task Learning (Liu, Li, Kuang, Xue, Chen, Yang, Liao &
Zhang, "Towards Impartial Multi-task Learning", ICLR 2021, openreview.net/forum?id=IMPnRXEWpvr:
IMTL-G its gradient balance, IMTL-L its loss balance, Eq. (6) with a = e, b = 1, IMTL its
hybrid balance). The equation numbers of IMTL-G's closed form and of the hybrid are not
verified (the paper's text was not reachable here); the closed form below is the one LibMTL's
`weighting/IMTL.py` and the `IMTLG` of Nash-MTL's `methods/weight_methods.py` (read in the copy
that Cranial-XIX/FAMO carries) implement, and the hybrid is LibMTL's (IMTL-G on the gradients of e^{s_t} L_t − s_t).

IMTL-G (gradient balance): find the combination d = Σ_t α_t g_t, Σ_t α_t = 1, whose
projections onto every unit task gradient u_t = g_t / ||g_t|| are equal (dᵀu_1 = dᵀu_t). With
D = [g_1 − g_t]ᵀ_{t≥2} and U = [u_1 − u_t]ᵀ_{t≥2}, the closed form is
α_{2:T} = g_1 Uᵀ (D Uᵀ)⁻¹, α_1 = 1 − Σ_{t≥2} α_t. Every entry of g_1 Uᵀ and D Uᵀ is a
Gram-matrix entry divided by a norm, so α follows from M = G Gᵀ alone.
Path: coefficients (`CoefficientWeighting`: one backward of Σ_t c_t L_t, exact over ranks),
with c = K·α so that the weights sum to K like `equal`.

IMTL-L (loss balance, Eq. (6)): a learnable s_t per task, training on Σ_t (e^{s_t} L_t − s_t); at the
optimum e^{s_t} L_t = 1, so every scaled loss is 1. Path: losses only, like `uncertainty`: the
s_t are parameters of the weighting (the trainer's optimizer steps them) and their gradient is
built from the all-reduced loss, so every rank keeps the same s.

IMTL (the hybrid balance the paper recommends, as LibMTL's `IMTL` implements it): IMTL-L's
scales make the scaled losses L̃_t = e^{s_t} L_t − s_t, and IMTL-G's closed form is applied to
their gradients g̃_t = e^{s_t} g_t. Their Gram matrix is E M E with E = diag(e^{s}), so α still
follows from M alone; the shared direction Σ_t α_t g̃_t is the combination c_t = K·α_t·e^{s_t}
of the raw gradients. Path: coefficients (one backward of Σ_t c_t L_t, exact over ranks), plus
IMTL-L's term for the s_t (∂/∂s_t = e^{s_t} L_t − 1 from the all-reduced loss). As with
`imtl_g`, towers get c_t times their own gradient (the paper gives them ∇L̃_t; the factor
K·α_t is the price of a single backward, and Adam's per-parameter scaling absorbs most of it).
"""

from __future__ import annotations

import torch

from manytask.trainer.weightings.base import (
    Weighting,
    WeightingContext,
    device_of,
    exact_sum,
    rank_shares,
    reduce_losses,
)
from manytask.trainer.weightings.task_gradients import CoefficientWeighting


def imtl_g_alpha(gram: torch.Tensor) -> torch.Tensor:
    """α [K] (sum 1) from a Gram matrix M [K, K]: equal projections of Σ α_t g_t onto every u_t.

    A task with a zero gradient gets unit norm 1 (it then adds nothing to D or U's rows
    beyond its own); a singular D Uᵀ (e.g. identical gradients) is inverted in the
    least-squares sense.
    """
    m = gram.double()
    K = m.shape[0]
    if K == 1:
        return torch.ones(1, dtype=torch.float64)
    norm = m.diagonal().clamp_min(0).sqrt().clamp_min(1e-12)
    # Dot products <g_a, u_b> = M_ab / ||g_b||.
    gu = m / norm[None, :]
    rest = torch.arange(1, K)
    g1_u = gu[0, 0] - gu[0, rest]  # g_1 · (u_1 − u_t)   [K-1]
    # (g_1 − g_j) · (u_1 − u_t) = <g1,u1> − <g1,ut> − <gj,u1> + <gj,ut>
    d_u = gu[0, 0] - gu[0, rest][None, :] - gu[rest, 0][:, None] + gu[rest][:, rest]
    alpha_rest = g1_u @ torch.linalg.pinv(d_u)
    return torch.cat([(1 - alpha_rest.sum()).reshape(1), alpha_rest])


class IMTLGWeighting(CoefficientWeighting):
    """No state: α is solved afresh every step."""

    def coefficients(self, gram: torch.Tensor, losses: list[float], idx: list[int], step: int) -> list[float]:
        return (len(idx) * imtl_g_alpha(gram)).tolist()


class IMTLLWeighting(Weighting):
    """Learnable loss scales `log_scale` [T] (recipe order); weights e^{s_t}."""

    def __init__(self, tasks, params=None) -> None:
        super().__init__(tasks, params)
        self.log_scale = torch.nn.Parameter(torch.zeros(len(self.task_names)))

    def combine(
        self, losses: dict[str, torch.Tensor], ctx: WeightingContext
    ) -> tuple[torch.Tensor, dict[str, float]]:
        device = device_of(losses, ctx, self)
        reduced = reduce_losses(self.task_names, losses, ctx, device)
        s = self.log_scale.to(device)
        w = torch.exp(s)
        values = w.detach().tolist()
        weights = {t: values[i] if reduced.present[i] else 0.0 for i, t in enumerate(self.task_names)}
        total = exact_sum(self.task_names, losses, weights, rank_shares(self.task_names, losses, ctx, reduced.mean_count), device)
        for i in range(len(self.task_names)):
            if reduced.present[i]:  # d/ds_t from the all-reduced loss: the same on every rank
                total = total + (w[i] - w[i].detach()) * reduced.loss[i] - s[i]
        return total, weights


class IMTLWeighting(CoefficientWeighting):
    """Hybrid IMTL: learnable `log_scale` s [T] (recipe order) as in IMTL-L, α from the Gram
    matrix of the scaled gradients as in IMTL-G; weights c_t = K·α_t·e^{s_t}."""

    def __init__(self, tasks, params=None) -> None:
        super().__init__(tasks, params)
        self.log_scale = torch.nn.Parameter(torch.zeros(len(self.task_names)))
        self._scaled: dict[int, float] = {}  # this micro-batch: task index -> global mean loss

    def coefficients(self, gram: torch.Tensor, losses: list[float], idx: list[int], step: int) -> list[float]:
        scale = self.log_scale.detach().double().cpu()[idx].exp()
        alpha = imtl_g_alpha(gram * scale[:, None] * scale[None, :])  # Gram of e^{s_t} g_t
        self._scaled = dict(zip(idx, losses))
        return (len(idx) * alpha * scale).tolist()

    def combine(
        self, losses: dict[str, torch.Tensor], ctx: WeightingContext
    ) -> tuple[torch.Tensor, dict[str, float]]:
        self._scaled = {}  # filled by `coefficients` only when every present loss is finite
        total, weights = super().combine(losses, ctx)
        s = self.log_scale.to(total.device)
        for i, loss in self._scaled.items():  # d/ds_t = e^{s_t} L_t − 1, identical on every rank
            w = torch.exp(s[i])
            total = total + (w - w.detach()) * loss - s[i]
        return total, weights
