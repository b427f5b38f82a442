"""`nash_mtl`: Nash-MTL (Navon, Shamsian, Achituve, Maron, Kawaguchi, Chechik & Fetaya,
"Multi-Task Learning as a Bargaining Game", ICML 2022, arXiv:2202.01017, Algorithm 1).

The Nash bargaining solution over the tasks is d = Σ_t α_t g_t with α > 0 solving the
paper's GᵀGα = 1/α (its G has the task gradients as columns); in our Gram form
(M α)_t = 1 / α_t for every task (M = G Gᵀ): each task's gain g_tᵀd is inversely
proportional to its weight. The paper solves it by a sequence of convex
problems (cvxpy); here: α is the unique minimiser of the strictly convex
f(α) = ½ αᵀMα − Σ_t log α_t (its gradient is Mα − 1/α), found by damped Newton steps
(Hessian M + diag(1/α²)), a few iterations on a [K, K] matrix. As in the official code, M is
first divided by its Frobenius norm, so α does not grow like 1/||g|| when gradients shrink.

Path: coefficients (one backward of Σ_t α_t L_t, exact over ranks).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from manytask.schema import ConfigError
from manytask.trainer.weightings.task_gradients import CoefficientWeighting


@dataclass
class NashMTLParams:
    max_iter: int = 50  # Newton iterations (it converges in a handful)
    normalize: bool = True  # divide M by its Frobenius norm first (official code)

    def validate(self, file: str | None) -> None:
        if self.max_iter <= 0:
            raise ConfigError(f"'weighting.params.max_iter' of nash_mtl in {file}: expected > 0, got {self.max_iter}")


def nash_alpha(gram: torch.Tensor, max_iter: int = 50, tol: float = 1e-12) -> torch.Tensor:
    """α > 0 [K] with (Mα) ⊙ α = 1 for a Gram matrix M [K, K] (float64).

    A task with a zero gradient has no finite solution; it gets α = 0 (and the others are
    solved without it).
    """
    m = gram.double()
    alive = m.diagonal() > 0
    alpha = torch.zeros(m.shape[0], dtype=torch.float64)
    if not bool(alive.any()):
        return alpha
    idx = alive.nonzero().reshape(-1)
    m = m[idx][:, idx]
    a = 1 / m.diagonal().sqrt()  # the solution when the gradients are orthogonal

    def f(x: torch.Tensor) -> float:
        return float(0.5 * x @ m @ x - torch.log(x).sum())

    for _ in range(max_iter):
        grad = m @ a - 1 / a
        hess = m + torch.diag(1 / a**2)
        step = torch.linalg.solve(hess, grad)
        t, fa = 1.0, f(a)
        while t > 1e-10:  # backtracking: stay positive and decrease f
            cand = a - t * step
            if bool((cand > 0).all()) and f(cand) <= fa - 0.25 * t * float(grad @ step):
                break
            t /= 2
        a = a - t * step
        if float(grad @ step) < tol:
            break
    alpha[idx] = a
    return alpha


class NashMTLWeighting(CoefficientWeighting):
    """No state: α is solved afresh every step."""

    Params = NashMTLParams

    def coefficients(self, gram: torch.Tensor, losses: list[float], idx: list[int], step: int) -> list[float]:
        m = gram
        if self.params.normalize:
            m = gram / gram.norm().clamp_min(1e-300)
        return nash_alpha(m, self.params.max_iter).tolist()
