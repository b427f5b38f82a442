"""What every loss weighting receives and the helpers they share.

A weighting is an `nn.Module` with

    combine(losses, ctx) -> (total, weights)
    before_step()            (gradient surgery only: rewrite .grad before the optimizer step)

`losses` maps task -> scalar mean loss over this rank's labelled samples of that task. A task
with no labelled sample on this rank is either left out or passed as a finite 0 that stays in
the graph (models/losses.py); pass `ctx.local_counts` so that such a 0 is not mistaken for a
measured loss when losses are averaged over ranks.
`total` is the scalar the trainer backpropagates once (the methods that all-reduce build it with
`rank_shares`, so that the ranks' averaged backward is exactly that of one process on the
whole batch, however the labelled samples are split; `equal`/`static`/`rlw`, which make no
collective, are exact when every rank holds the same number of each task's labels); `weights` maps every task to the
python float its loss was multiplied by (the trainer logs it as `weights/<task>`), 0.0 for a
task absent on every rank (`equal`/`static`/`rlw` know only this rank's `losses`: they give 0.0
to a task left out of them; the trainer passes every task, so they weigh one labelled nowhere
as usual, and its in-graph 0 trains nothing).

Weights must be identical on every rank, so a weighting derives them only from quantities that
went through `ctx.all_reduce_mean`, and issues the same collectives on every rank whatever the
local data: the adaptive methods make exactly one `all_reduce_mean` per `combine` (losses,
gradient statistics and presence counts packed into one float64 tensor); `equal` and `static`
make none. Their running state (EMAs, windows, initial losses) is updated only from present
tasks with finite all-reduced values, so an absent task or a NaN step leaves it untouched.
Every loss passed in stays in `total`, weight 0 included, so DDP and DeepSpeed see a (zero)
gradient for every tower, and a non-finite loss always shows in `total` for the trainer to
skip the step.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from manytask.config import TaskConfig
from manytask.schema import ConfigError, closest

if TYPE_CHECKING:
    from manytask.trainer.weightings.sharded_gradients import ZeroSharding


def identity(x: torch.Tensor) -> torch.Tensor:
    """`all_reduce_mean` of a single process."""
    return x


@dataclass
class WeightingContext:
    """What the trainer knows at the moment it combines the losses.

    step:              optimizer step (drives windows, schedules and RLW's draw).
    representation:    the model's shared representation Z, requires grad, [B, ...] (MGDA), or None.
    last_shared_layer: parameters of the last shared layer (GradNorm).
    shared_params:     every trainable shared parameter (the gradient methods; see
                       `task_gradients.py`).
    all_reduce_mean:   elementwise mean over ranks (may work in place; it gets a fresh
                       tensor); identity in one process.
    local_counts:      task -> labelled samples on this rank, or None. Given, the per-task
                       means over ranks are weighted by them (the exact global mean) and a rank
                       with 0 samples contributes nothing; None: every task in `losses` counts
                       once. Whether a task is present this step is decided from these counts
                       all-reduced (the adaptive methods), or from `losses` alone by the methods
                       without a collective (`equal`, `static`, `rlw`, `pcgrad`'s logged weights).
    seed:              the run's seed (RLW draws from (seed, step): the same on every rank).
    sharding:          set under ZeRO-3, where every parameter is partitioned across ranks:
                       how a method takes several backward passes over one forward and keeps
                       only this rank's partition of the gradients (`sharded_gradients.py`).
                       Every rank then passes every task's loss, in the graph (the trainer does).
    """

    step: int = 0
    representation: torch.Tensor | None = None
    last_shared_layer: list[torch.nn.Parameter] = field(default_factory=list)
    shared_params: list[torch.nn.Parameter] = field(default_factory=list)
    all_reduce_mean: Callable[[torch.Tensor], torch.Tensor] = identity
    local_counts: dict[str, int] | None = None
    seed: int = 0
    sharding: ZeroSharding | None = None


def task_backward(
    loss: torch.Tensor, inputs: list[torch.Tensor], ctx: WeightingContext
) -> tuple[torch.Tensor | None, ...]:
    """`torch.autograd.grad(loss, inputs)` keeping the graph for the trainer's backward; under
    ZeRO-3 (`ctx.sharding`) as one more backward pass DeepSpeed's layer gathering allows."""
    if ctx.sharding is not None:
        return ctx.sharding.grad(loss, inputs)
    return torch.autograd.grad(loss, inputs, retain_graph=True, allow_unused=True)


@dataclass
class NoParams:
    """A method without options: any key under `weighting.params` is a typo."""


class Weighting(torch.nn.Module):
    """Base class: the task names (recipe order), the method's validated params, and the
    method's running state saved under the task list it was built for.

    `gradients` says which gradients a method takes (checked at config time, e.g. ZeRO-3):
    "none" (losses only), "last_layer" (per-task gradients of the last shared layer),
    "representation" (of the shared representation, MGDA-UB), "shared" (of every shared
    parameter, through `task_gradients.py`). `state_fields` names the attributes that make
    up the running state; the base saves them with the task list and refuses a checkpoint
    made for other tasks.
    """

    Params: type = NoParams  # each method's dataclass for `weighting.params`
    gradients: str = "none"
    surgery: bool = False  # rewrites the shared gradients in before_step (`SurgeryBuffer`)
    # The DeepSpeed ZeRO stages the method runs under (checked at config time; each one is
    # tested exact across ranks in tests/test_weightings_zero.py).
    deepspeed_stages: tuple[int, ...] = (0, 1, 2, 3)
    state_fields: tuple[str, ...] = ()

    def __init__(self, tasks: dict[str, TaskConfig], params: Any = None) -> None:
        super().__init__()
        if not tasks:
            raise ConfigError("weighting: at least one task is required")
        self.task_names = list(tasks)
        self.task_configs = dict(tasks)
        self.params = params if params is not None else self.Params()

    def combine(
        self, losses: dict[str, torch.Tensor], ctx: WeightingContext
    ) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    def before_step(self) -> None:
        """Called after the step's backward, before the optimizer step (not on skipped steps):
        gradient surgery (`pcgrad`, `db_mtl`) rewrites gradients here; the others do nothing."""

    def get_extra_state(self) -> dict[str, Any]:
        return {"tasks": list(self.task_names), **{k: copy.deepcopy(getattr(self, k)) for k in self.state_fields}}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        if list(state["tasks"]) != self.task_names:
            name = type(self).__name__
            raise ValueError(f"{name} state was saved for tasks {state['tasks']}, this run has {self.task_names}")
        for k in self.state_fields:
            setattr(self, k, copy.deepcopy(state[k]))


def present_here(task: str, losses: dict[str, torch.Tensor]) -> bool:
    """Whether `task` is trained this step, decided without a collective: it has a loss here.
    (The trainer passes every task, an absent one as an in-graph 0, so every rank agrees.)"""
    return task in losses


def local_count(task: str, losses: dict[str, torch.Tensor], ctx: WeightingContext) -> float:
    """How much this rank's loss of `task` counts in the mean over ranks: its labelled count
    with `ctx.local_counts`, else 1 if it has the loss; 0 = no labelled sample here."""
    if task not in losses:
        return 0.0
    if ctx.local_counts is None:
        return 1.0
    return float(ctx.local_counts.get(task, 0))


def device_of(losses: dict[str, torch.Tensor], ctx: WeightingContext, module: torch.nn.Module) -> torch.device:
    """Where collectives and the total live: a loss's device, else the model's, else CPU.

    Matters under NCCL, which only reduces CUDA tensors, even on a rank without any loss.
    """
    for loss in losses.values():
        return loss.device
    if ctx.representation is not None:
        return ctx.representation.device
    for p in [*ctx.shared_params, *ctx.last_shared_layer, *module.parameters()]:
        return p.device
    return torch.device("cpu")


def weighted_sum(
    losses: dict[str, torch.Tensor], weights: dict[str, float], device: torch.device
) -> torch.Tensor:
    """Σ_i w_i L_i over this rank's losses (a zero scalar if none).

    Zero weights are kept: the tower then still gets a (zero) gradient, which DDP expects.
    """
    total = None
    for task, loss in losses.items():
        if task not in weights:
            raise ValueError(f"loss for unknown task '{task}' (tasks: {', '.join(weights)})")
        term = loss if weights[task] == 1.0 else weights[task] * loss  # skip a multiply by 1
        total = term if total is None else total + term
    return torch.zeros((), device=device) if total is None else total


@dataclass
class Reduced:
    """Per-task quantities averaged over the ranks that hold the task (same on every rank).

    present:    labelled on at least one rank.
    loss:    mean loss over the ranks holding the task; None when not present. May be NaN/inf:
             the weighting then leaves its state alone and the trainer skips the step.
    extra:   name -> per-task list of further means (e.g. gradient norms), same convention.
    mean_count: mean over ranks of `local_count()` per task (fraction of ranks, or mean sample count).
    tensor:  `extra_tensor` averaged over all ranks (not masked), or None.
    """

    present: list[bool]
    loss: list[float | None]
    extra: dict[str, list[float | None]]
    mean_count: list[float]
    tensor: torch.Tensor | None = None

    @property
    def finite(self) -> bool:
        """Every present task's loss and extras are finite: safe to update running state."""
        values = [self.loss, *self.extra.values()]
        return all(v[i] is not None and math.isfinite(v[i]) for v in values for i, p in enumerate(self.present) if p)


def reduce_losses(
    tasks: list[str],
    losses: dict[str, torch.Tensor],
    ctx: WeightingContext,
    device: torch.device,
    extra: dict[str, dict[str, torch.Tensor]] | None = None,
    extra_tensor: torch.Tensor | None = None,
) -> Reduced:
    """One collective: every task's loss (and `extra` per-task scalars) averaged over ranks.

    Each rank's value counts with its `local_count()` weight h: mean = sum(x * h) / sum(h), so a rank
    without the task contributes nothing, and with `ctx.local_counts` the mean is the exact
    mean over all labelled samples. `extra_tensor` (any shape) rides along in the same
    collective and is averaged over all ranks, unweighted. Called identically on every rank.
    """
    extra = extra or {}
    n = len(tasks)
    h = [local_count(t, losses, ctx) for t in tasks]
    zero = torch.zeros((), dtype=torch.float64, device=device)
    weight = torch.tensor(h, dtype=torch.float64, device=device)
    rows = [
        torch.stack([src[t].detach().to(device, torch.float64).reshape(()) if h[i] > 0 else zero for i, t in enumerate(tasks)])
        * weight
        for src in [losses, *extra.values()]
    ]
    flat = [weight, *rows]
    if extra_tensor is not None:
        flat.append(extra_tensor.detach().to(device, torch.float64).reshape(-1))
    reduced = ctx.all_reduce_mean(torch.cat(flat)).cpu()
    tensor = None
    if extra_tensor is not None:
        tensor = reduced[n * (len(rows) + 1) :].reshape(extra_tensor.shape)
    packed = reduced[: n * (len(rows) + 1)].tolist()
    mean_count = packed[:n]
    values = [packed[n * (k + 1) : n * (k + 2)] for k in range(len(rows))]

    def mean(k: int, i: int) -> float | None:
        return values[k][i] / mean_count[i] if mean_count[i] > 0 else None

    # Decided by the all-reduced count, never by local data: the same on every rank.
    present = [mean_count[i] > 0 for i in range(n)]
    loss = [mean(0, i) if present[i] else None for i in range(n)]
    named = {name: [mean(k + 1, i) if present[i] else None for i in range(n)] for k, name in enumerate(extra)}
    return Reduced(present=present, loss=loss, extra=named, mean_count=mean_count, tensor=tensor)


def rank_shares(tasks: list[str], losses: dict[str, torch.Tensor], ctx: WeightingContext, mean_counts: list[float]) -> list[float]:
    """Per task, h_t / h̄_t: this rank's `local_count()` over its mean over ranks (0 if none here).

    Multiplying this rank's loss by it turns the ranks' averaged gradient (DDP, DeepSpeed)
    into the gradient of the global mean loss: (1/R) Σ_r (n_r / n̄) ∇L_r = Σ_r n_r ∇L_r / N.
    """
    return [local_count(t, losses, ctx) / mean_counts[i] if mean_counts[i] > 0 else 0.0 for i, t in enumerate(tasks)]


def exact_sum(
    tasks: list[str], losses: dict[str, torch.Tensor], weights: dict[str, float], shares: list[float], device: torch.device
) -> torch.Tensor:
    """Σ_t w_t · share_t · L_t over this rank's losses (zero weights kept in the graph)."""
    scaled = {t: weights[t] * shares[i] for i, t in enumerate(tasks)}
    return weighted_sum({t: losses[t] for t in tasks if t in losses}, scaled, device)


def softmax_weights(scores: list[float | None], temperature: float) -> list[float]:
    """K · softmax(score / temperature) over the non-None scores (K of them), 0 elsewhere.

    Summing to K keeps the total on the scale of `equal` (all weights 1), which it becomes as
    the temperature grows.
    """
    idx = [i for i, s in enumerate(scores) if s is not None]
    out = [0.0] * len(scores)
    if not idx:
        return out
    z = torch.tensor([scores[i] for i in idx], dtype=torch.float64) / temperature
    w = torch.softmax(z, dim=0) * len(idx)
    for i, v in zip(idx, w.tolist()):
        out[i] = v
    return out


def check_task_keys(mapping: dict[str, Any], tasks: list[str], key: str) -> None:
    """ConfigError for a key of `mapping` that is not a task, naming the closest task."""
    for name in mapping:
        if name not in tasks:
            near = closest(name, tasks)
            fix = f"; did you mean '{key}.{near}'?" if near else ""
            raise ConfigError(f"'{key}.{name}': unknown task{fix} (tasks: {', '.join(tasks)})")
