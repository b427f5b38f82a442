"""`cagrad`: Conflict-Averse Gradient descent (Liu, Liu, Jin, Stone & Liu, NeurIPS 2021,
arXiv:2110.14048, Algorithm 1).

With g_0 = (1/K) Σ_t g_t the average gradient, CAGrad steps along the d that maximises the
worst task's improvement within a ball around g_0: max_d min_t g_tᵀd s.t. ||d − g_0|| ≤ c ||g_0||.
Its dual is a K-dimensional problem on the simplex,

    w* = argmin_{w ∈ Δ} g_wᵀ g_0 + c ||g_0|| ||g_w||,      g_w = Σ_t w_t g_t,

and d = g_0 + (c ||g_0|| / ||g_w*||) g_w*, divided by (1 + c²) as in the official code
(`rescale=1`). All of it uses only M = G Gᵀ: g_wᵀg_0 = wᵀM1/K, ||g_w||² = wᵀMw.
Path: coefficients (one backward of Σ_t c_t L_t, exact over ranks), c = K · (1/K + λ w*) /
(1 + c²) so that c = 0 gives `equal`. Solver (float64, on [K, K]): an active-set method whose
face optima come in closed form (`face_weights`, a few dozen [F, F] solves at K = 32; the
official code uses scipy's SLSQP, whose optimum it matches to ~1e-15 in the objective), with
Frank-Wolfe as the fallback when M is singular on a face (fewer shared parameters than tasks).
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
    max_iter: int = 200  # Frank-Wolfe steps of the fallback solver (M singular on a face)

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


def frank_wolfe_weights(m: np.ndarray, b: np.ndarray, phi: float, max_iter: int) -> np.ndarray:
    """w on the simplex minimising wᵀb + φ sqrt(wᵀMw) by Frank-Wolfe with a golden-section line
    search: slow (hundreds of iterations) but needs nothing of M; the fallback of
    `face_weights`."""
    K = m.shape[0]

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


def _face_optimum(m: np.ndarray, b: np.ndarray, phi: float, face: list[int]) -> np.ndarray | None:
    """The stationary point of f(w) = wᵀb + φ||g_w|| on the plane Σ_{t ∈ face} w_t = 1 (w = 0
    off the face), as w over the face [F]; None if M on the face is singular.

    Stationarity: b_F + φ M_FF w / ||g_w|| = ν 1. With v = φ w / ||g_w||: v = ν a − e,
    a = M_FF⁻¹ 1, e = M_FF⁻¹ b_F, and ||g_w||² = wᵀMw gives vᵀ M_FF v = φ², i.e.
    A ν² − 2Bν + C − φ² = 0 with A = 1ᵀa, B = 1ᵀe, C = b_Fᵀe. The larger root is the one with
    Σ v = √disc > 0 (w = v / Σ v then sums to 1); ν is then the worst task's improvement.
    """
    mf = m[np.ix_(face, face)]
    try:
        sol = np.linalg.solve(mf, np.stack([np.ones(len(face)), b[face]], 1))
    except np.linalg.LinAlgError:
        return None
    a, e = sol[:, 0], sol[:, 1]
    A, B, C = float(a.sum()), float(e.sum()), float(b[face] @ e)
    disc = B * B - A * (C - phi * phi)
    if not (A > 0 and disc > 0 and math.isfinite(disc)):
        return None
    nu = (B + math.sqrt(disc)) / A
    v = nu * a - e
    return v / v.sum()


def _warm_start(m: np.ndarray, b: np.ndarray, phi: float) -> tuple[np.ndarray, list[int]]:
    """A feasible start for `face_weights`: (w [K] on the simplex, its face), the optimum of a
    face. Usually most tasks are in the support, so: the optimum of every task's face, dropping
    the tasks it gives a weight ≤ 0, a few times; else the best vertex."""
    K = m.shape[0]
    face = list(range(K))
    for _ in range(4):
        z = _face_optimum(m, b, phi, face)
        if z is None:
            break
        if (z > 0).all():
            w = np.zeros(K)
            w[face] = z
            return w, face
        face = [t for t, x in zip(face, z) if x > 0]
        if not face:
            break
    best = int(np.argmin(b + phi * np.sqrt(np.diag(m))))
    w = np.zeros(K)
    w[best] = 1.0
    return w, [best]


def face_weights(m: np.ndarray, b: np.ndarray, phi: float, tol: float = 1e-9) -> np.ndarray | None:
    """w* on the simplex minimising wᵀb + φ sqrt(wᵀMw) by an active-set method (as NNLS):
    the face (support) grows by the task whose partial derivative is lowest below the face's
    common value ν, the face's optimum comes in closed form (`_face_optimum`), and when that
    leaves the simplex the step stops at the boundary and drops the tasks that reached 0.
    Each step solves a [F, F] system: a few dozen of them at K = 32 instead of hundreds of
    line searches. Returns None when it cannot certify the optimum (M singular on a face,
    ||g_w|| = 0, no convergence): the caller then falls back to Frank-Wolfe.

    Optimality (KKT on the simplex), checked before returning: w ≥ 0, Σw = 1, and every
    ∂f/∂w_t ≥ ν with equality on the support, to `tol` relative to the largest |∂f/∂w|.
    """
    K = m.shape[0]
    if not (np.diag(m) > 0).all():
        return None
    w, face = _warm_start(m, b, phi)
    for _ in range(3 * K + 10):
        norm = math.sqrt(max(float(w @ m @ w), 0.0))
        if norm <= 1e-150:
            return None
        grad = b + phi * (m @ w) / norm
        nu = float(grad[face].mean())
        scale = 1.0 + float(np.abs(grad).max())
        outside = grad.copy()
        outside[face] = np.inf
        added = int(np.argmin(outside))
        if float(outside[added]) >= nu - tol * scale:  # (also when the face is every task)
            spread = float(np.abs(grad[face] - nu).max())
            return w if spread <= tol * scale and (w >= 0).all() else None
        face = [*face, added]
        while True:  # move towards the larger face's optimum, dropping tasks that reach 0
            z = _face_optimum(m, b, phi, face)
            if z is None:
                return None
            now = w[face]
            if (z > 0).all():
                w = np.zeros(K)
                w[face] = z
                break
            # The segment now -> z leaves the simplex where the first weight reaches 0.
            ratio = np.where(z <= 0, now / np.where(z <= 0, now - z, 1.0), np.inf)
            first = int(np.argmin(ratio))
            if first == len(face) - 1 and now[first] == 0:  # the task just added leaves at once: stuck
                return None
            moved = now + float(ratio[first]) * (z - now)
            moved[first] = 0.0  # dropped exactly, so the face shrinks every pass
            keep = [k for k in range(len(face)) if moved[k] > 0]
            if not keep:
                return None
            w = np.zeros(K)
            w[[face[k] for k in keep]] = moved[keep]
            w /= w.sum()
            face = [face[k] for k in keep]
    return None


def cagrad_weights(gram: np.ndarray, c: float, max_iter: int = 200) -> np.ndarray:
    """w* on the simplex minimising wᵀb + φ sqrt(wᵀMw), b = M1/K, φ = c sqrt(1ᵀM1)/K: the
    active-set solver, or (when it cannot certify an optimum) `max_iter` Frank-Wolfe steps."""
    K = gram.shape[0]
    m = gram / max(float(np.trace(gram)) / K, 1e-300)  # the minimiser is scale-free
    b = m.sum(1) / K
    phi = c * math.sqrt(max(float(m.sum()), 0.0)) / K
    w = face_weights(m, b, phi) if phi > 0 else None
    return w if w is not None else frank_wolfe_weights(m, b, phi, max_iter)


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
