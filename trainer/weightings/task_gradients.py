"""Per-task gradients of the shared parameters: the one place every gradient-based method
(and the task-affinity monitor) gets them from.

`task_gradients(...)` takes one `autograd.grad` per task labelled on this rank with respect to
the shared parameters (retain_graph, so the trainer's single backward still runs; no `.grad`
buffer or DDP hook is touched), weights each by this rank's labelled count of the task, and
averages gradients, counts and loss sums over ranks in ONE collective. Dividing by the mean
count gives, on every rank, the exact gradient of each task's mean loss over every labelled
sample of the step, g_t [P] — what one process on the whole batch would compute.

Methods need either
- the Gram matrix M = G Gᵀ [T, T] (MGDA-style solvers, CAGrad, IMTL-G, Nash-MTL,
  Aligned-MTL, UPGrad, GradVac, PCGrad's projections): every one of these produces a
  combination Σ_t c_t g_t whose coefficients c follow from M alone, so the method then runs
  as one ordinary backward of Σ_t c_t L_t (`exact_weighted_sum`);
- or the gradients themselves (DB-MTL's running gradient buffer).

`gram_matrix` is a sum of per-block partial products Σ_k G_k G_kᵀ over parameter blocks, so
a rank holding only a shard of the (reduced) gradients contributes its blocks' [T, T]
partial sum and a sum over ranks finishes it. Under DDP and ZeRO-1/2 every rank holds the full
reduced gradients. Under ZeRO-3 (`ctx.sharding`) each task's gradient is reduce-scattered, so a
rank keeps only its partition of it (`TaskGradients.grads` is then [T, P / R]), and the Gram
matrix is the all-reduced sum of the partitions' partial products (`sharded_gradients.py`):
the Gram-matrix methods (and GradNorm's norms) run there unchanged, and PCGrad writes this
rank's partition of its direction (`SurgeryBuffer`); DB-MTL, whose state is a whole [T, P]
gradient buffer, is refused under ZeRO-3 at config time.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from manytask.trainer.weightings.base import (
    Weighting,
    WeightingContext,
    device_of,
    exact_sum,
    local_count,
    rank_shares,
)
from manytask.trainer.weightings.sharded_gradients import ZeroSharding


def flat_gradient(
    loss: torch.Tensor, params: Sequence[torch.nn.Parameter], out: torch.Tensor | None = None
) -> torch.Tensor:
    """∂loss/∂params flattened to [P] (float32; zeros for a parameter the loss does not use),
    written into `out` ([P] float32) when given.

    `autograd.grad` with retain_graph: the graph stays for the trainer's backward.
    """
    grads = torch.autograd.grad(loss, list(params), retain_graph=True, allow_unused=True)
    pieces = [(g if g is not None else torch.zeros_like(p)).reshape(-1).float() for g, p in zip(grads, params)]
    return torch.cat(pieces) if out is None else torch.cat(pieces, out=out)


def gram_matrix(grads: torch.Tensor, block: int = 1 << 22) -> torch.Tensor:
    """M = G Gᵀ [T, T] (float64) of per-task gradients `[T, P]`, summed over column blocks.

    Summing partial products block by block is what makes it shard-friendly: the blocks may
    live on different ranks (sharded gradients) and their partial [T, T] sums then add up.
    """
    T, P = grads.shape
    out = torch.zeros(T, T, dtype=torch.float64, device=grads.device)
    for start in range(0, P, block):
        piece = grads[:, start : start + block].double()
        out += piece @ piece.T
    return out.cpu()


@dataclass
class TaskGradients:
    """Per-task gradients over all ranks for one micro-batch (identical on every rank).

    grads:   [T, P] float32, row t = gradient of task t's mean loss over every labelled
             sample of all ranks; zeros for a task labelled nowhere. Under ZeRO-3
             (`sharded`) only this rank's partition of it, [T, P / R].
    counts:  [T] mean over ranks of `local_count()` (labelled samples; 0 = absent everywhere).
    losses:  T global mean losses (None when absent).
    present: T flags: labelled on some rank.
    """

    grads: torch.Tensor
    counts: list[float]
    losses: list[float | None]
    present: list[bool]
    sharded: bool = False
    reduced_gram: torch.Tensor | None = field(default=None, repr=False)

    @property
    def gram(self) -> torch.Tensor:
        """G Gᵀ [T, T] float64 on the CPU (of the full gradients, also when sharded; computed
        on demand and cached)."""
        if self.reduced_gram is None:
            self.reduced_gram = gram_matrix(self.grads)
        return self.reduced_gram


def task_gradients(
    tasks: list[str],
    losses: dict[str, torch.Tensor],
    params: Sequence[torch.nn.Parameter],
    ctx: WeightingContext,
    device: torch.device,
) -> TaskGradients:
    """The exact global per-task gradients of `params` (see the module docstring).

    Each rank's gradient of task t counts with `local_count()` (its labelled count with
    `ctx.local_counts`, else 1 if it has the loss). One collective of 2T + T·P floats,
    issued on every rank whatever its data.
    """
    if ctx.sharding is not None:
        return sharded_task_gradients(tasks, losses, params, ctx, ctx.sharding, device)
    size = sum(p.numel() for p in params)
    T = len(tasks)
    # The collective's one buffer, [counts T | loss sums T | gradients T·P]: each task's
    # gradient is concatenated straight into its row (no per-task temporaries to copy).
    flat = torch.zeros(2 * T + T * size, dtype=torch.float32, device=device)
    grads = flat[2 * T :].view(T, size)
    counts = [local_count(t, losses, ctx) for t in tasks]
    held = [i for i in range(T) if counts[i] > 0]
    if held:
        flat[:T] = torch.tensor(counts, dtype=torch.float32, device=device)
        here = torch.tensor(held, device=device)
        flat[T + here] = torch.stack([losses[tasks[i]].detach().float().reshape(()) for i in held]) * flat[here]
    for i in held:
        loss = losses[tasks[i]]
        if loss.requires_grad and size:
            flat_gradient(loss, params, out=grads[i])
    grads.mul_(flat[:T].unsqueeze(1))  # count-weighted: n_t g_t (rows of absent tasks stay 0)
    reduced = ctx.all_reduce_mean(flat)
    scalars = reduced[: 2 * T].double().cpu().tolist()  # Python floats: no per-element tensor ops
    mean_counts, sums = scalars[:T], scalars[T:]
    grads = reduced[2 * T :].view(T, size).div_(reduced[:T].clamp_min(1e-12).unsqueeze(1))
    present = [c > 0 for c in mean_counts]
    if not all(present):
        grads[[i for i in range(T) if not present[i]]] = 0.0
    mean_loss = [sums[i] / mean_counts[i] if present[i] else None for i in range(T)]
    return TaskGradients(grads=grads, counts=mean_counts, losses=mean_loss, present=present)


def sharded_task_gradients(
    tasks: list[str],
    losses: dict[str, torch.Tensor],
    params: Sequence[torch.nn.Parameter],
    ctx: WeightingContext,
    sharding: ZeroSharding,
    device: torch.device,
) -> TaskGradients:
    """`task_gradients` under ZeRO-3: the same numbers, but each rank keeps its partition of
    the gradients and the Gram matrix is summed from the partitions' partial products.

    Per task one backward pass (`ZeroSharding.grad`) and one reduce-scatter of this rank's
    count-weighted gradient, made by every rank for every task whatever its data (they gather
    and scatter); then ONE all-reduce of counts, loss sums and the partial [T, T] products.
    """
    T = len(tasks)
    counts = torch.zeros(T, dtype=torch.float64, device=device)
    loss_sums = torch.zeros(T, dtype=torch.float64, device=device)
    parts = []
    for i, task in enumerate(tasks):
        n, loss = local_count(task, losses, ctx), losses.get(task)
        grads: tuple[torch.Tensor | None, ...] = (None,) * len(params)
        if loss is not None and loss.requires_grad:
            grads = sharding.grad(loss, params)
        if n > 0:
            counts[i] = n
            loss_sums[i] = n * loss.detach().double()
            grads = tuple(None if g is None else n * g for g in grads)
        else:
            grads = (None,) * len(params)  # a pass all ranks make, which adds nothing here
        parts.append(sharding.partition(grads, params))
    local = torch.stack(parts)  # [T, S]: this rank's slice of Σ_ranks n_r g_r, per task
    partial = gram_matrix(local).to(device)
    reduced = ctx.all_reduce_mean(torch.cat([counts, loss_sums, partial.reshape(-1)]))
    mean_counts, sums = reduced[:T].cpu(), reduced[T : 2 * T].cpu()
    # Σ_r n_r g_r = R·n̄·g: the mean of the partial products is R·n̄_i·n̄_j·(g_i·g_j).
    scale = sharding.world * mean_counts.clamp_min(1e-300)
    gram = reduced[2 * T :].reshape(T, T).cpu() * sharding.world / (scale[:, None] * scale[None, :])
    absent = mean_counts == 0
    gram[absent, :] = 0.0
    gram[:, absent] = 0.0
    local = local / scale.to(local.device, torch.float32).unsqueeze(1)
    local[absent.to(local.device)] = 0.0
    present = [bool(mean_counts[i] > 0) for i in range(T)]
    mean_loss = [float(sums[i] / mean_counts[i]) if present[i] else None for i in range(T)]
    return TaskGradients(grads=local, counts=mean_counts.tolist(), losses=mean_loss, present=present,
                         sharded=True, reduced_gram=gram)


def shared_task_gradients(
    weighting: Weighting, losses: dict[str, torch.Tensor], ctx: WeightingContext
) -> tuple[list[torch.nn.Parameter], torch.device, TaskGradients]:
    """(the trainable shared parameters, the losses' device, their per-task gradients reduced
    over ranks): what every method on the shared gradients starts from. ValueError when the
    context has none."""
    params = [p for p in ctx.shared_params if p.requires_grad]
    if not params:
        raise ValueError(f"{type(weighting).__name__} needs ctx.shared_params (the model's shared parameters)")
    device = device_of(losses, ctx, weighting)
    return params, device, task_gradients(weighting.task_names, losses, params, ctx, device)


class CoefficientWeighting(Weighting):
    """A gradient method whose shared direction is Σ_t c_t g_t with c computed from the
    Gram matrix of the present tasks' gradients (`coefficients`); it runs as ONE backward of
    Σ_t c_t L_t (scaled per rank by `rank_shares`, so it is exact across ranks). Task-specific
    parameters (towers) then get c_t times their ordinary gradient. The weights logged are c.

    A step with a non-finite loss or gradient keeps coefficients 1 (the total shows the
    NaN and the trainer skips the step) and leaves the method's state alone.
    """

    gradients = "shared"

    def coefficients(self, gram: torch.Tensor, losses: list[float], idx: list[int], step: int) -> list[float]:
        """c [K] for the K present tasks `idx` (recipe indices) from their Gram matrix [K, K]
        (float64) and global mean losses."""
        raise NotImplementedError

    def combine(
        self, losses: dict[str, torch.Tensor], ctx: WeightingContext
    ) -> tuple[torch.Tensor, dict[str, float]]:
        _, device, tg = shared_task_gradients(self, losses, ctx)
        idx = [i for i, p in enumerate(tg.present) if p]
        coeffs = [0.0] * len(self.task_names)
        if idx:
            gram = tg.gram[idx][:, idx]
            sub_losses = [tg.losses[i] for i in idx]
            if bool(torch.isfinite(gram).all()) and all(math.isfinite(v) for v in sub_losses):
                values = self.coefficients(gram, sub_losses, idx, ctx.step)
            else:
                values = [1.0] * len(idx)
            for k, i in enumerate(idx):
                coeffs[i] = float(values[k])
        weights = dict(zip(self.task_names, coeffs))
        shares = rank_shares(self.task_names, losses, ctx, tg.counts)
        return exact_sum(self.task_names, losses, weights, shares, device), weights


class SurgeryBuffer:
    """The shared direction a surgery method (`pcgrad`, `db_mtl`) writes into the gradients
    after the trainer's backward: summed over a step's micro-batches, written as their mean.

    Where it is written: `.grad` (single process, DDP); under DeepSpeed ZeRO-2 the engine's
    partitioned gradient (`safe_set_full_grad`: each rank keeps its fragment); under ZeRO-3 the
    direction is already this rank's partition (`TaskGradients.grads` is), written with
    `safe_set_local_grad`.
    """

    def __init__(self) -> None:
        self.params: list[torch.nn.Parameter] = []
        self.grad: torch.Tensor | None = None
        self.micro = 0
        self.step: int | None = None

    def add(self, step: int, params: list[torch.nn.Parameter], direction: torch.Tensor) -> None:
        if self.step != step:  # a new step (the previous one may have been skipped)
            self.grad, self.micro, self.step = None, 0, step
        self.grad = direction if self.grad is None else self.grad + direction
        self.micro += 1
        self.params = params

    @torch.no_grad()
    def write(self) -> None:
        """Replace the parameters' gradients by the mean direction ([P], or under ZeRO-3 this
        rank's partition [Σ_p ⌈n_p / R⌉]), in order."""
        if self.grad is None:
            return
        grad, offset = self.grad / self.micro, 0
        for p in self.params:
            if hasattr(p, "ds_id"):  # ZeRO-3: this rank's partition of p
                from deepspeed.utils import safe_set_local_grad

                size = p.ds_tensor.ds_numel
                safe_set_local_grad(p, grad[offset : offset + size])
            elif hasattr(p, "_hp_mapping"):  # ZeRO-1/2: the engine keeps p's fragment
                from deepspeed.utils import safe_set_full_grad

                size = p.numel()
                safe_set_full_grad(p, grad[offset : offset + size].view_as(p).float())
            else:
                size = p.numel()
                piece = grad[offset : offset + size].view_as(p).to(p.dtype)
                if p.grad is None:
                    p.grad = piece.clone()
                else:
                    p.grad.copy_(piece)
            offset += size
        self.grad, self.micro, self.step = None, 0, None
