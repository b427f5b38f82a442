"""`cagrad`: Conflict-Averse Gradient descent (Liu, Liu, Jin, Stone & Liu, NeurIPS 2021,
arXiv:2110.14048, Algorithm 1).

With g_0 = (1/K) Σ_t g_t the average gradient, CAGrad steps along the d that maximises the
worst task's improvement within a ball around g_0: max_d min_t g_tᵀd s.t. ||d − g_0|| ≤ c ||g_0||.
Its dual is a K-dimensional problem on the simplex,

    w* = argmin_{w ∈ Δ} g_wᵀ g_0 + c ||g_0|| ||g_w||,      g_w = Σ_t w_t g_t,

and d = g_0 + (c ||g_0|| / ||g_w*||) g_w*, divided by (1 + c²) as in the official code
(`rescale=1`). All of it uses only M = G Gᵀ: g_wᵀg_0 = wᵀM1/K, ||g_w||² = wᵀMw.
Path: coefficients (one backward of Σ_t c_t L_t, exact over ranks), c = K · (1/K + λ w*) /
(1 + c²) so that c = 0 gives `equal`. Solver: Frank-Wolfe on the simplex with a golden-section
line search (float64, a few hundred [K, K] products: the official code uses scipy's SLSQP).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from manytask.schema import ConfigError
from manytask.trainer.weightings.task_gradients import CoefficientWeighting


@dataclass
class CAGradParams:
    c: float = 0.4  # radius of the ball around the mean gradient, relative to its norm
    rescale: bool = True  # divide the direction by 1 + c² (official code's rescale=1)
    max_iter: int = 200

    def validate(self, file: str | None) -> None:
        if self.c < 0 or self.max_iter <= 0:
            raise ConfigError(f"'weighting.params' of cagrad in {file}: c must be >= 0 and max_iter > 0, got c={self.c}, max_iter={self.max_iter}")


def _golden(f, lo: float = 0.0, hi: float = 1.0, iters: int = 40) -> float:
    """Minimiser of a convex f on [lo, hi]."""
    r = (math.sqrt(5) - 1) / 2
    a, b = lo, hi
    x1, x2 = b - r * (b - a), a + r * (b - a)
    f1, f2 = f(x1), f(x2)
    for _ in range(iters):
        if f1 < f2:
            b, x2, f2 = x2, x1, f1
            x1 = b - r * (b - a)
            f1 = f(x1)
        else:
            a, x1, f1 = x1, x2, f2
            x2 = a + r * (b - a)
            f2 = f(x2)
    return (a + b) / 2


def cagrad_weights(gram: np.ndarray, c: float, max_iter: int = 200) -> np.ndarray:
    """w* on the simplex minimising wᵀb + φ sqrt(wᵀMw), b = M1/K, φ = c sqrt(1ᵀM1)/K."""
    K = gram.shape[0]
    m = gram / max(float(np.trace(gram)) / K, 1e-300)  # the minimiser is scale-free
    b = m.sum(1) / K
    phi = c * math.sqrt(max(float(m.sum()), 0.0)) / K

    def f(w: np.ndarray) -> float:
        return float(w @ b + phi * math.sqrt(max(float(w @ m @ w), 0.0)))

    w = np.full(K, 1.0 / K)
    for _ in range(max_iter):
        norm = math.sqrt(max(float(w @ m @ w), 1e-300))
        grad = b + phi * (m @ w) / norm
        t = int(np.argmin(grad))
        step = np.zeros(K)
        step[t] = 1.0
        direction = step - w
        if float(grad @ -direction) <= 1e-12:  # Frank-Wolfe gap: optimal
            break
        gamma = _golden(lambda g, w=w, d=direction: f(w + g * d))
        w = w + gamma * direction
    return w


def cagrad_coefficients(gram: torch.Tensor, c: float, rescale: bool = True, max_iter: int = 200) -> torch.Tensor:
    """c [K] with Σ_t c_t g_t = K · CAGrad's direction (see the module docstring)."""
    m = gram.double().numpy()
    K = m.shape[0]
    w = cagrad_weights(m, c, max_iter)
    g0_norm = math.sqrt(max(float(m.sum()), 0.0)) / K
    gw_norm = math.sqrt(max(float(w @ m @ w), 1e-300))
    lam = c * g0_norm / gw_norm
    coeff = (np.full(K, 1.0 / K) + lam * w) * K
    if rescale:
        coeff = coeff / (1 + c * c)
    return torch.from_numpy(coeff)


class CAGradWeighting(CoefficientWeighting):
    """No state: w* is solved afresh every step."""

    Params = CAGradParams

    def coefficients(self, gram: torch.Tensor, losses: list[float], idx: list[int], step: int) -> list[float]:
        p = self.params
        return cagrad_coefficients(gram, p.c, p.rescale, p.max_iter).tolist()
