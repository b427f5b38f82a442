"""`pcgrad`: gradient surgery (Yu, Kumar, Gupta, Levine, Hausman & Finn, NeurIPS 2020).

On the shared parameters, each task's gradient g_i is projected off every other task's
gradient it conflicts with: if g_i · g_j < 0, g_i ← g_i − (g_i · g_j / ||g_j||²) g_j, visiting
the other tasks in a random order; the shared parameters then step along Σ_i g_i. Every
task-specific parameter (towers, task gates) keeps its ordinary gradient.

Per step: one `autograd.grad` per present task wrt the shared parameters (retain_graph, so
the trainer's single backward still runs); the per-task gradients `[T, P]` are averaged over
ranks weighted by labelled samples (the exact global task gradients) in one collective, so
every rank projects the same vectors in the same order (drawn from the step number). `combine`
returns the plain sum of the losses (weights 1) for the trainer's backward; `before_step`
then puts the projected sum into the shared parameters' `.grad` (over micro-batches: their
mean, like the backward's). Memory: T × (number of shared parameters) floats.
Not available under DeepSpeed, whose engine owns the gradients between backward and step.
"""

from __future__ import annotations

import random

import torch

from manytask.config import TaskConfig
from manytask.trainer.weightings.base import (
    NoParams,
    Weighting,
    WeightingContext,
    device_of,
    present_here,
    weighted_sum,
)


def project_conflicts(grads: torch.Tensor, order_seed: int) -> torch.Tensor:
    """PCGrad's surgery on per-task gradients `[T, P]` -> the summed projected gradient `[P]`.

    Rows that are all zero (a task without labels) neither change nor get projected.
    """
    original = grads.double()
    projected = original.clone()
    norms_sq = (original * original).sum(1)
    rng = random.Random(order_seed)
    for i in range(grads.shape[0]):
        others = [j for j in range(grads.shape[0]) if j != i and norms_sq[j] > 0]
        rng.shuffle(others)
        for j in others:
            dot = projected[i] @ original[j]
            if dot < 0:
                projected[i] -= dot / norms_sq[j] * original[j]
    return projected.sum(0).to(grads.dtype)


class PCGradWeighting(Weighting):
    """No persistent state; holds the projected shared gradient between backward and step."""

    Params = NoParams

    def __init__(self, tasks: dict[str, TaskConfig], params: NoParams | None = None) -> None:
        super().__init__(tasks, params)
        self._params: list[torch.nn.Parameter] = []
        self._grad: torch.Tensor | None = None  # Σ over micro-batches of the projected gradient
        self._micro = 0
        self._step: int | None = None

    def combine(
        self, losses: dict[str, torch.Tensor], ctx: WeightingContext
    ) -> tuple[torch.Tensor, dict[str, float]]:
        params = [p for p in (ctx.all_shared_params or ctx.shared_params) if p.requires_grad]
        if not params:
            raise ValueError("pcgrad needs ctx.all_shared_params (the model's shared parameters)")
        device = device_of(losses, ctx, self)
        size = sum(p.numel() for p in params)
        rows, counts = [], []
        for task in self.task_names:
            loss = losses.get(task)
            n = 1.0 if ctx.local_counts is None else float(ctx.local_counts.get(task, 0))
            if loss is None or n == 0 or not loss.requires_grad:
                rows.append(torch.zeros(size, device=device))
                counts.append(0.0)
                continue
            grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
            flat = torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)])
            rows.append(n * flat.detach().float())
            counts.append(n)
        # One collective: count-weighted task gradients and the counts, averaged over ranks.
        packed = torch.cat([torch.tensor(counts, device=device), torch.stack(rows).reshape(-1)])
        reduced = ctx.all_reduce_mean(packed)
        T = len(self.task_names)
        mean_counts = reduced[:T]
        task_grads = reduced[T:].reshape(T, size) / mean_counts.clamp_min(1e-12).unsqueeze(1)
        task_grads[mean_counts == 0] = 0.0
        if self._step != ctx.step:  # a new step (the previous one may have been skipped)
            self._grad, self._micro, self._step = None, 0, ctx.step
        surgery = project_conflicts(task_grads, order_seed=ctx.step)
        self._grad = surgery if self._grad is None else self._grad + surgery
        self._micro += 1
        self._params = params
        weights = {t: 1.0 if present_here(t, losses, ctx) else 0.0 for t in self.task_names}
        return weighted_sum(losses, weights, device), weights

    @torch.no_grad()
    def before_step(self) -> None:
        """Replace the shared parameters' gradients by the projected sum (mean over micro-batches)."""
        if self._grad is None:
            return
        grad, offset = self._grad / self._micro, 0
        for p in self._params:
            piece = grad[offset : offset + p.numel()].view_as(p).to(p.dtype)
            if p.grad is None:
                p.grad = piece.clone()
            else:
                p.grad.copy_(piece)
            offset += p.numel()
        self._grad, self._micro, self._step = None, 0, None
