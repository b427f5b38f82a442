"""`upgrad`: Unconflicting Projection of Gradients (Quinton & Rey, "Jacobian Descent for
Multi-Objective Optimization", 2024, arXiv:2406.16232: the projection π_J onto the dual cone
is its Eq. (3), the quadratic program below its Proposition 1; TorchJD's `UPGrad`).

Each task gradient g_i is projected onto the dual cone of the rows of G, {x : G x ≥ 0}
(the directions that increase no loss), and the projections are added:
d = Σ_i π(g_i). The projection of Gᵀu onto the cone is Gᵀv with
v = argmin_{v ≥ u} vᵀ M v (the dual of the projection; M = G Gᵀ), so everything follows from
the Gram matrix: c = Σ_i v_i. Without conflicts every π(g_i) = g_i and UPGrad is `equal`
(TorchJD averages instead of adding; the sum keeps `equal`'s scale).

Path: coefficients (one backward, exact over ranks). Solver: cyclic coordinate descent on the
box-constrained quadratic (exact per coordinate), float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from manytask.schema import ConfigError
from manytask.trainer.weightings.task_gradients import CoefficientWeighting


@dataclass
class UPGradParams:
    max_iter: int = 200  # coordinate-descent sweeps per projection

    def validate(self, file: str | None) -> None:
        if self.max_iter <= 0:
            raise ConfigError(f"'weighting.params.max_iter' of upgrad in {file}: expected > 0, got {self.max_iter}")


def project_to_dual_cone(gram: torch.Tensor, u: torch.Tensor, max_iter: int = 200, tol: float = 1e-12) -> torch.Tensor:
    """v = argmin_{v ≥ u} vᵀ M v for every row of u [N, K] at once (or one u [K]): Gᵀv is the
    projection of Gᵀu onto {x : G x ≥ 0}. Cyclic coordinate descent, exact per coordinate."""
    m = gram.double().numpy()
    lower = np.atleast_2d(u.double().numpy())
    v = lower.copy()
    diag = np.diagonal(m)
    for _ in range(max_iter):
        moved = 0.0
        for j in range(m.shape[0]):
            if diag[j] <= 0:
                continue
            new = np.maximum(lower[:, j], v[:, j] - (v @ m[:, j]) / diag[j])
            moved = max(moved, float(np.abs(new - v[:, j]).max()))
            v[:, j] = new
        if moved < tol:
            break
    out = torch.from_numpy(v)
    return out if u.dim() == 2 else out[0]


def upgrad_coefficients(gram: torch.Tensor, max_iter: int = 200) -> torch.Tensor:
    """c [K] = Σ_i argmin_{v ≥ e_i} vᵀMv."""
    return project_to_dual_cone(gram, torch.eye(gram.shape[0], dtype=torch.float64), max_iter).sum(0)


class UPGradWeighting(CoefficientWeighting):
    """No state."""

    Params = UPGradParams

    def coefficients(self, gram: torch.Tensor, losses: list[float], idx: list[int], step: int) -> list[float]:
        return upgrad_coefficients(gram, self.params.max_iter).tolist()
