"""The one batch structure every model, loss and weighting speaks."""

from __future__ import annotations

from dataclasses import dataclass

import torch


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
