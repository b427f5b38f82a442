"""`aligned_mtl`: Aligned-MTL (Senushkin, Patakin, Kuznetsov & Konushin, "Independent Component
Alignment for Multi-Task Learning", CVPR 2023, Algorithm 1).

The task gradients are replaced by an orthogonal system with equal norms, the closest one to
G (a Procrustes problem), and scaled by the smallest singular value so the step is no longer
than the weakest direction allows. With M = G Gᵀ = V Λ Vᵀ (eigenvalues above the numerical
rank tolerance), B = √λ_min · V Λ^{-1/2} Vᵀ and Ĝ = B G; the shared step is Σ_t ĝ_t = (B 1)ᵀ G.
The condition number of Ĝ is 1: no task's gradient dominates, none conflicts.

Path: coefficients c = B 1 from the Gram matrix alone (one backward, exact over ranks).
"""

from __future__ import annotations

import torch

from manytask.trainer.weightings.task_gradients import CoefficientWeighting


def aligned_coefficients(gram: torch.Tensor) -> torch.Tensor:
    """c = B 1 [K] for a Gram matrix M [K, K] (float64)."""
    m = gram.double()
    lam, vec = torch.linalg.eigh(m)
    tol = lam.max().clamp_min(0) * m.shape[0] * torch.finfo(torch.float64).eps
    keep = lam > tol
    if not bool(keep.any()):
        return torch.zeros(m.shape[0], dtype=torch.float64)
    lam, vec = lam[keep], vec[:, keep]
    b = lam.min().sqrt() * (vec * lam.rsqrt()) @ vec.T
    return b.sum(1)


class AlignedMTLWeighting(CoefficientWeighting):
    """No state."""

    def coefficients(self, gram: torch.Tensor, losses: list[float], idx: list[int], step: int) -> list[float]:
        return aligned_coefficients(gram).tolist()
