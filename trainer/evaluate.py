"""Validation: per-task loss and metrics over the whole validation split, synced across ranks.

Metrics come from torchmetrics, chosen so that every state is a fixed-size sum (binned AUROC,
counts, error sums): one all-reduce per state gives the exact global value, and a rank whose
share of the split has no sample of a task contributes zeros instead of hanging a gather.
"""

from __future__ import annotations

from collections.abc import Iterable
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


def make_metric(name: str, spec: TaskSpec) -> torchmetrics.Metric:
    """A torchmetrics metric whose states are all sums; raises ValueError for unknown names."""
    import torchmetrics  # imported here: ~1.3 s that every rank would pay at start-up

    kind, n = spec.type, spec.out_dim
    table = {
        ("auc", "binary"): lambda: torchmetrics.classification.BinaryAUROC(thresholds=256),
        ("accuracy", "binary"): lambda: torchmetrics.classification.BinaryAccuracy(),
        ("accuracy", "multiclass"): lambda: torchmetrics.classification.MulticlassAccuracy(
            num_classes=n, average="micro"
        ),
        ("auc", "multilabel"): lambda: torchmetrics.classification.MultilabelAUROC(
            num_labels=n, thresholds=256
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
    metric.sync_on_compute = False  # synced by all_reduce_states, see module docstring
    return metric


def _metric_inputs(spec: TaskSpec, output: torch.Tensor, label: torch.Tensor):
    if spec.type == "binary":
        return torch.sigmoid(output.float().reshape(-1)), label.reshape(-1).long()
    if spec.type == "multiclass":
        return output.float(), label.reshape(-1).long()
    if spec.type == "multilabel":
        return torch.sigmoid(output.float()), label.long()
    return output.float().reshape(label.shape), label.float()


def all_reduce_states(metric: torchmetrics.Metric) -> None:
    for name in metric._defaults:
        value = getattr(metric, name)
        if not torch.is_tensor(value):
            raise TypeError(f"metric {type(metric).__name__} keeps a list state '{name}'")
        D.all_reduce_sum(value)
    metric._update_count = max(metric._update_count, 1)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable[Batch],
    specs: dict[str, TaskSpec],
    cfg: Config,
    device: torch.device,
) -> dict[str, float]:
    """Per-task metrics over `batches` (this rank's share), reduced over all ranks.

    Returns `{"val/<task>/loss": ..., "val/<task>/<metric>": ...}`, identical on every rank.
    """
    was_training = model.training
    model.eval()
    metrics = {
        task: {m: make_metric(m, spec).to(device) for m in cfg.tasks[task].metrics or DEFAULT_METRICS[spec.type]}
        for task, spec in specs.items()
    }
    tasks = list(specs)
    loss_sum = torch.zeros(len(tasks), dtype=torch.float64, device=device)
    count = torch.zeros(len(tasks), dtype=torch.float64, device=device)
    for batch in batches:
        batch = batch.to(device)
        out = model(batch.inputs, batch.source_id)
        losses = task_losses(out.outputs, batch.labels, batch.masks, specs)
        for i, task in enumerate(tasks):
            mask = batch.masks[task]
            n = int(mask.sum())
            if n == 0:
                continue
            loss_sum[i] += float(losses[task]) * n
            count[i] += n
            preds, target = _metric_inputs(specs[task], out.outputs[task][mask], batch.labels[task][mask])
            for metric in metrics[task].values():
                metric.update(preds, target)
    D.all_reduce_sum(loss_sum)
    D.all_reduce_sum(count)
    result: dict[str, float] = {}
    for i, task in enumerate(tasks):
        result[f"val/{task}/loss"] = float(loss_sum[i] / count[i]) if count[i] > 0 else float("nan")
        for name, metric in metrics[task].items():
            all_reduce_states(metric)
            result[f"val/{task}/{name}"] = float(metric.compute()) if count[i] > 0 else float("nan")
    model.train(was_training)
    return result
