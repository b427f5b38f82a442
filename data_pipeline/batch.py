"""The one batch structure every model, loss and weighting speaks, and how it is built."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from manytask.data_pipeline.fields import FieldSpec

if TYPE_CHECKING:
    from manytask.config import Config
    from manytask.data_pipeline.sources import Sources


@dataclass
class Batch:
    """A training or validation batch of B samples, possibly from several sources.

    inputs:    field name -> tensor [B, ...]; a field a sample's source lacks is zero-filled.
    labels:    task name -> tensor [B, ...]; zero where the task is masked.
    masks:     task name -> bool tensor [B]; True where the sample carries that task's label.
    source_id: long tensor [B]; index of the sample's source in `data.sources` (also the
               task descriptor used by task-conditioned models).
    Every task of the recipe is present in `labels` and `masks` on every rank, even when no
    sample of the batch carries it (mask all False), so all ranks build the same graph.
    """

    inputs: dict[str, torch.Tensor]
    labels: dict[str, torch.Tensor]
    masks: dict[str, torch.Tensor]
    source_id: torch.Tensor

    def __len__(self) -> int:
        return int(self.source_id.shape[0])

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        if self.source_id.device == torch.device(device):
            return self  # already there (CPU training): skip rebuilding four dicts every step
        move = lambda d: {k: v.to(device, non_blocking=non_blocking) for k, v in d.items()}  # noqa: E731
        return Batch(
            inputs=move(self.inputs),
            labels=move(self.labels),
            masks=move(self.masks),
            source_id=self.source_id.to(device, non_blocking=non_blocking),
        )

    def pin_memory(self) -> Batch:
        pin = lambda d: {k: v.pin_memory() for k, v in d.items()}  # noqa: E731
        return Batch(pin(self.inputs), pin(self.labels), pin(self.masks), self.source_id.pin_memory())


class BatchBuilder:
    """Builds a Batch from per-source parts (field -> array [n_i, ...]), sources in recipe order.

    A field a source lacks is zero-filled; a task a source does not label is masked, and so is
    a label holding NaN (float, any element) or a negative value (int), with the label zeroed.
    """

    def __init__(self, cfg: Config, sources: Sources):
        self.inputs = sources.inputs
        self.labels = {t: sources.labels[t] for t in cfg.tasks}
        self.src_inputs = [set(s.inputs) for s in cfg.data.sources]
        self.src_labels = [dict(s.labels) for s in cfg.data.sources]
        self.src_fields = [list(dict.fromkeys([*s.inputs, *s.labels.values()])) for s in cfg.data.sources]
        self.pin = torch.cuda.is_available()

    def fields(self, i: int) -> list[str]:
        """The fields source i's batches need (its inputs and label fields)."""
        return self.src_fields[i]

    def __call__(self, parts: list[dict[str, np.ndarray] | None]) -> Batch:
        """parts[i]: field -> writable array [n_i, ...] of source i, or None."""
        present = [
            (i, {k: torch.from_numpy(v) for k, v in p.items()}, _rows(p))
            for i, p in enumerate(parts) if p is not None and _rows(p) > 0
        ]
        inputs = {}
        for name, spec in self.inputs.items():
            pieces = [p[name] if name in self.src_inputs[i] else _zeros(n, spec) for i, p, n in present]
            inputs[name] = _cat(pieces, spec)
        labels, masks = {}, {}
        for task, spec in self.labels.items():
            ys, ms = [], []
            for i, p, n in present:
                field = self.src_labels[i].get(task)
                if field is None:
                    ys.append(_zeros(n, spec))
                    ms.append(torch.zeros(n, dtype=torch.bool))
                else:
                    y, m = _clean_label(p[field])
                    ys.append(y)
                    ms.append(m)
            labels[task] = _cat(ys, spec)
            masks[task] = torch.cat(ms) if ms else torch.zeros(0, dtype=torch.bool)
        ids = [torch.full((n,), i, dtype=torch.long) for i, _, n in present]
        batch = Batch(inputs, labels, masks, torch.cat(ids) if ids else torch.zeros(0, dtype=torch.long))
        return batch.pin_memory() if self.pin else batch


def _rows(part: dict[str, Any]) -> int:
    return int(next(iter(part.values())).shape[0]) if part else 0


def _zeros(n: int, spec: FieldSpec) -> torch.Tensor:
    return torch.from_numpy(np.zeros((n, *spec.shape), dtype=spec.dtype))


def _cat(pieces: list[torch.Tensor], spec: FieldSpec) -> torch.Tensor:
    if not pieces:
        return _zeros(0, spec)
    # Always a fresh allocation, never a view into a block: a view's offset (and so its
    # alignment) depends on where a resumed stream's first block starts, which changes SIMD
    # reduction order and the last bit of a loss. One memcpy keeps resumed runs bitwise equal.
    return torch.cat(pieces)


def _clean_label(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(label with missing entries zeroed, mask [n]): NaN floats and negative ints are missing."""
    if y.dtype == torch.bool:
        return y, torch.ones(y.shape[0], dtype=torch.bool)
    bad = torch.isnan(y) if y.is_floating_point() else y < 0
    if y.dim() > 1:
        bad = bad.flatten(1).any(1)
    if not bool(bad.any()):
        return y, ~bad
    return y.masked_fill(bad.view(-1, *[1] * (y.dim() - 1)), 0), ~bad
