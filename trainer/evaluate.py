"""Validation: per-task loss and metrics over the whole validation split, synced across ranks.

Metrics come from torchmetrics and are synced with its own public mechanism (`compute()`
gathers every state from every rank and reduces it: sums for counts and error sums, a
concatenation for exact AUROC's predictions), so the result is the metric of the whole split,
not an average of per-rank metrics. During training AUROC is binned (256 thresholds: fixed-size
states, cheap at every `eval_every`); `exact=True` (what `manytask eval` uses) keeps every
prediction for the exact AUROC and accumulates in float64, so it equals scikit-learn's on the
same predictions.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

import torch
from torch import nn

from manytask.config import Config
from manytask.data_pipeline.batch import Batch
from manytask.models.losses import task_losses
from manytask.models.spec import TaskSpec
from manytask.trainer import distributed as D

if TYPE_CHECKING:
    import torchmetrics

DEFAULT_METRICS = {
    "binary": ["auc", "accuracy"],
    "multiclass": ["accuracy"],
    "multilabel": ["auc", "accuracy"],
    "regression": ["mse", "mae"],
    "forecast": ["mse", "mae"],
}
HIGHER_IS_BETTER = {"auc": True, "accuracy": True, "mse": False, "mae": False, "loss": False}


def make_metric(name: str, spec: TaskSpec, exact: bool = False) -> torchmetrics.Metric:
    """A torchmetrics metric (binned AUROC unless `exact`); ValueError for unknown names."""
    import torchmetrics  # imported here: ~1.3 s that every rank would pay at start-up

    kind, n = spec.type, spec.out_dim
    bins = None if exact else 256
    table = {
        ("auc", "binary"): lambda: torchmetrics.classification.BinaryAUROC(thresholds=bins),
        ("accuracy", "binary"): lambda: torchmetrics.classification.BinaryAccuracy(),
        ("accuracy", "multiclass"): lambda: torchmetrics.classification.MulticlassAccuracy(
            num_classes=n, average="micro"
        ),
        ("auc", "multilabel"): lambda: torchmetrics.classification.MultilabelAUROC(
            num_labels=n, thresholds=bins
        ),
        ("accuracy", "multilabel"): lambda: torchmetrics.classification.MultilabelAccuracy(num_labels=n),
        ("mse", "regression"): torchmetrics.MeanSquaredError,
        ("mae", "regression"): torchmetrics.MeanAbsoluteError,
        ("mse", "forecast"): torchmetrics.MeanSquaredError,
        ("mae", "forecast"): torchmetrics.MeanAbsoluteError,
    }
    if (name, kind) not in table:
        valid = sorted(m for m, k in table if k == kind)
        raise ValueError(f"metric '{name}' is not available for a {kind} task (choose from {valid})")
    metric = table[(name, kind)]()
    if exact:
        metric.set_dtype(torch.float64)
    if name == "auc" and exact:
        # A list state that stays empty on one rank would skip that rank's gathers in
        # compute() and hang the others: every rank starts with one empty update.
        width = (0, n) if kind == "multilabel" else (0,)
        metric.update(torch.zeros(width), torch.zeros(width, dtype=torch.long))
    return metric


def _metric_inputs(spec: TaskSpec, output: torch.Tensor, label: torch.Tensor, exact: bool = False):
    if spec.type == "binary":
        return torch.sigmoid(output.float().reshape(-1)), label.reshape(-1).long()
    if spec.type == "multiclass":
        return output.float(), label.reshape(-1).long()
    if spec.type == "multilabel":
        return torch.sigmoid(output.float()), label.long()
    real = torch.float64 if exact else torch.float32
    return output.float().reshape(label.shape).to(real), label.to(real)


def synced_compute(metric: torchmetrics.Metric) -> float:
    """The metric over every rank's updates (torchmetrics gathers and reduces the states; a
    collective: call on every rank). A rank without updates of its own contributes nothing."""
    with warnings.catch_warnings():
        # "compute called before update" on a rank whose share held no sample of the task
        warnings.filterwarnings("ignore", message=r".*was called before the ``update``")
        return float(metric.compute())


def in_lockstep(batches: Iterable[Batch]) -> Iterator[tuple[Batch, bool]]:
    """`(batch, counts)` until every rank is out of batches: a rank whose share ran out
    repeats its last batch with counts=False, so all ranks make the same number of forwards;
    a rank that had none at all (a validation split smaller than the ranks' shares) borrows
    another rank's first batch, also with counts=False.

    ZeRO-3 gathers each layer's parameters inside the forward (a collective): ranks with
    different numbers of validation batches would otherwise wait for each other for ever.
    One small object all-gather per batch."""
    it, last = iter(batches), None
    me = torch.distributed.get_rank() if D.is_initialized() else 0
    while True:
        batch = next(it, None)
        last = batch if batch is not None else last
        state = D.all_gather_object((batch is not None, last is not None))
        if not any(has for has, _ in state):
            return
        if not all(had for _, had in state):
            lender = next(r for r, (has, _) in enumerate(state) if has)
            lent = D.broadcast_object(batch if me == lender else None, src=lender)
            last = last if last is not None else lent
        yield (batch, True) if batch is not None else (last, False)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable[Batch],
    specs: dict[str, TaskSpec],
    cfg: Config,
    device: torch.device,
    exact: bool = False,
    lockstep: bool = False,
) -> dict[str, float]:
    """Per-task metrics over `batches` (this rank's share), reduced over all ranks.

    Returns `{"val/<task>/loss": ..., "val/<task>/<metric>": ...}`, identical on every rank.
    exact: exact AUROC and float64 sums (see the module docstring).
    lockstep: every rank makes the same number of forwards (`in_lockstep`; ZeRO-3).
    """
    was_training = model.training
    model.eval()
    metrics = {
        task: {m: make_metric(m, spec, exact).to(device) for m in cfg.tasks[task].metrics or DEFAULT_METRICS[spec.type]}
        for task, spec in specs.items()
    }
    tasks = list(specs)
    loss_sum = torch.zeros(len(tasks), dtype=torch.float64, device=device)
    count = torch.zeros(len(tasks), dtype=torch.float64, device=device)
    paired = in_lockstep(batches) if lockstep else ((b, True) for b in batches)
    for batch, counts in paired:
        batch = batch.to(device)
        out = model(batch.inputs, batch.source_id)
        if not counts:
            continue
        losses = task_losses(out.outputs, batch.labels, batch.masks, specs)
        for i, task in enumerate(tasks):
            mask = batch.masks[task]
            n = int(mask.sum())
            if n == 0:
                continue
            loss_sum[i] += float(losses[task]) * n
            count[i] += n
            preds, target = _metric_inputs(specs[task], out.outputs[task][mask], batch.labels[task][mask], exact)
            for metric in metrics[task].values():
                metric.update(preds, target)
    D.all_reduce_sum(loss_sum)
    D.all_reduce_sum(count)
    result: dict[str, float] = {}
    for i, task in enumerate(tasks):
        result[f"val/{task}/loss"] = float(loss_sum[i] / count[i]) if count[i] > 0 else float("nan")
        for name, metric in metrics[task].items():
            # count is global, so every rank takes the same branch (compute() is a collective)
            result[f"val/{task}/{name}"] = synced_compute(metric) if count[i] > 0 else float("nan")
    model.train(was_training)
    return result
