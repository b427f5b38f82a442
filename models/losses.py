"""Per-task losses over masked batches, and predictions for metrics.

Every loss is the mean over the samples whose mask is True. With no valid sample the loss is
an exact, finite 0 that still depends on the output (so DDP and DeepSpeed see a gradient,
zero, for every parameter), and labels at masked positions are never read (a NaN there is
harmless).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from manytask.models.spec import TaskSpec


def _per_sample(spec: TaskSpec, output: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """Unreduced loss per sample `[B]` (label already sanitised at masked positions)."""
    out = output.float()
    if spec.type == "binary":
        return F.binary_cross_entropy_with_logits(
            out.reshape(-1), label.reshape(-1).float(), reduction="none"
        )
    if spec.type == "multiclass":
        return F.cross_entropy(out, label.reshape(-1).long(), reduction="none")
    if spec.type == "multilabel":
        bce = F.binary_cross_entropy_with_logits(out, label.reshape(out.shape).float(), reduction="none")
        return bce.mean(1)
    if spec.type in ("regression", "forecast"):
        return (out - label.reshape(out.shape).float()).pow(2).mean(1)
    raise ValueError(f"unknown task type {spec.type!r}")


def task_loss(spec: TaskSpec, output: torch.Tensor, label: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked mean loss of one task.

    output `[B, out_dim]` raw scores; label: binary `[B]`/`[B, 1]` 0/1 of any dtype,
    multiclass int `[B]`, multilabel `[B, L]`, regression `[B]`/`[B, D]`, forecast `[B, H]`;
    mask bool `[B]`. Returns a scalar (float32): BCE-with-logits, cross-entropy, BCE averaged
    over labels, or MSE averaged over dims; 0 (in the graph) when the mask is all False.
    """
    return stacked_task_loss(spec, output[None], label[None], mask.reshape(1, -1))[0]


def task_losses(
    outputs: dict[str, torch.Tensor],
    labels: dict[str, torch.Tensor],
    masks: dict[str, torch.Tensor],
    specs: dict[str, TaskSpec],
) -> dict[str, torch.Tensor]:
    """{task: scalar masked loss} for every task in `specs` (every task is always present).

    Tasks of the same type whose outputs and labels have the same shape and dtype are computed
    together as one stacked loss, so 64 binary tasks cost one set of ops, not 64.
    """
    groups: dict[tuple, list[str]] = {}
    for t, spec in specs.items():
        key = (spec.type, tuple(outputs[t].shape), outputs[t].dtype, tuple(labels[t].shape), labels[t].dtype)
        groups.setdefault(key, []).append(t)
    losses: dict[str, torch.Tensor] = {}
    for names in groups.values():
        if len(names) == 1:
            t = names[0]
            losses[t] = task_loss(specs[t], outputs[t], labels[t], masks[t])
            continue
        stacked = stacked_task_loss(
            specs[names[0]],
            torch.stack([outputs[t] for t in names]),
            torch.stack([labels[t] for t in names]),
            torch.stack([masks[t].reshape(-1) for t in names]),
        )
        losses.update(zip(names, stacked.unbind(0)))
    return {t: losses[t] for t in specs}


def stacked_task_loss(spec: TaskSpec, output: torch.Tensor, label: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`task_loss` of n same-shaped tasks at once: output `[n, B, ...]`, label `[n, B, ...]`,
    mask bool `[n, B]` -> `[n]` masked mean losses (0 for a task with no valid sample)."""
    n, B = mask.shape
    mask = mask.bool()
    # Zero the labels the mask hides so that whatever they hold cannot reach the loss or its
    # gradient (0 * NaN would be NaN).
    keep = mask.view(n, B, *([1] * (label.dim() - 2)))
    label = torch.where(keep, label, torch.zeros((), dtype=label.dtype, device=label.device))
    per = _per_sample(spec, output.reshape(n * B, *output.shape[2:]), label.reshape(n * B, *label.shape[2:]))
    per = torch.where(mask, per.view(n, B), torch.zeros((), dtype=per.dtype, device=per.device))
    # No host sync on mask.any(): with no valid sample this is 0 / 1 = 0, still in the graph.
    return per.sum(1) / mask.sum(1).clamp_min(1).to(per.dtype)


def predictions(spec: TaskSpec, output: torch.Tensor) -> torch.Tensor:
    """What metrics compare with labels: binary -> probability `[B]`; multiclass -> class
    probabilities `[B, C]`; multilabel -> probabilities `[B, L]`; regression -> values `[B]`
    when out_dim is 1, else `[B, D]`; forecast -> values `[B, H]`."""
    out = output.detach().float()
    if spec.type == "binary":
        return torch.sigmoid(out.reshape(-1))
    if spec.type == "multiclass":
        return torch.softmax(out, dim=-1)
    if spec.type == "multilabel":
        return torch.sigmoid(out)
    if spec.type == "regression" and out.shape[-1] == 1:
        return out.reshape(-1)
    return out
