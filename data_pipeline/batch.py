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
        # per output (input field or task): each source's field for it, or None
        self.input_of = {f: [f if f in s.inputs else None for s in cfg.data.sources] for f in self.inputs}
        self.label_of = {t: [s.labels.get(t) for s in cfg.data.sources] for t in self.labels}
        self.pin = torch.cuda.is_available()

    def fields(self, i: int) -> list[str]:
        """The fields source i's batches need (its inputs and label fields)."""
        return self.src_fields[i]

    def __call__(self, parts: list[dict[str, np.ndarray] | None], rows: list[int] | None = None) -> Batch:
        """parts[i]: field -> array [n_i, ...] of source i, or None; rows: the n_i if known.
        The arrays are copied (they may be views of a worker's shared memory)."""
        if rows is None:
            rows = [_rows(p) if p is not None else 0 for p in parts]
        present = [(i, p, n) for i, (p, n) in enumerate(zip(parts, rows)) if n > 0]
        sizes = [n for _, _, n in present]
        total = sum(sizes)
        inputs = {name: _stack(spec, present, total, self.input_of[name]) for name, spec in self.inputs.items()}
        labels, masks = {}, {}
        for task, spec in self.labels.items():
            fields = self.label_of[task]
            y = _stack(spec, present, total, fields)
            has = np.repeat([fields[i] is not None for i, _, _ in present], sizes).astype(bool)
            labels[task], masks[task] = y, torch.from_numpy(_clean_label(y.numpy(), has))
        ids = torch.empty(total, dtype=torch.long)
        ids.numpy()[:] = np.repeat([i for i, _, _ in present], sizes)
        batch = Batch(inputs, labels, masks, ids)
        return batch.pin_memory() if self.pin else batch

def _rows(part: dict[str, Any]) -> int:
    return int(next(iter(part.values())).shape[0]) if part else 0


def _stack(spec: FieldSpec, present: list, total: int, field_of: list[str | None]) -> torch.Tensor:
    """One fresh tensor [total, ...] from the present sources' fields (`field_of[source]`;
    zeros where None). Always a fresh torch allocation, never a view into a block: a view's
    offset (and so its alignment) depends on where a resumed stream's first block starts,
    which changes SIMD reduction order and the last bit of a loss."""
    out = torch.from_numpy(np.empty(0, spec.dtype)).new_empty((total, *spec.shape))
    pieces = [p[f] if (f := field_of[i]) is not None else np.zeros((n, *spec.shape), spec.dtype) for i, p, n in present]
    if pieces:
        np.concatenate(pieces, out=out.numpy(), casting="same_kind")
    return out


def _clean_label(y: np.ndarray, has: np.ndarray) -> np.ndarray:
    """Mask [n] of usable labels (the source labels the task, no NaN float, no negative int);
    `y` is zeroed in place where the mask is False."""
    if y.dtype == np.bool_:
        bad = np.zeros(len(y), dtype=bool)
    else:
        bad = np.isnan(y) if y.dtype.kind == "f" else y < 0
        if y.ndim > 1:
            bad = bad.reshape(len(y), -1).any(1)
    mask = has & ~bad
    if not mask.all():
        y[~mask] = 0
    return mask
