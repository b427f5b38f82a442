"""Per-task gradients when ZeRO-3 partitions the parameters: each rank ends with its partition
of every task's gradient, and the Gram matrix G Gᵀ is the sum over ranks of the partitions'
partial products.

Under ZeRO-3 a parameter's `.data` is empty outside the forward/backward of its module:
DeepSpeed gathers it in a hook before the module's backward and releases it after, counting
down per-module counters that the forward set. Those counters allow ONE backward per forward.
The gradient methods need T passes over one forward (one `autograd.grad` per task) and then
the trainer's backward, so every pass here is run by `ZeroSharding.grad`, which puts the
counters back to where the forward left them: each pass then gathers and releases the layers it
crosses, exactly like the trainer's own backward.

`autograd.grad` returns a rank's full local gradient of the shared parameters (one task at a
time, so P floats at most, as in DDP's own backward); `partition` reduce-scatters it, so each
rank keeps only its partition [P / R] of each task's gradient summed over ranks, laid out as
DeepSpeed lays out its own partition of each parameter (`ds_tensor`: the flattened parameter
padded to a multiple of R, rank r holding the r-th slice). The [T, T] partial products of the
partitions are then summed over ranks in one all-reduce (`task_gradients.task_gradients`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn

# DeepSpeed's ZeRO-3 per-module backward counters (deepspeed/runtime/zero/parameter_offload.py):
# the pre-backward gather runs while `applied_pre_backward_ref_cnt` > 0, the post-backward
# release when `ds_grads_remaining` falls to 0; the forward sets both.
BACKWARD_COUNTERS = ("applied_pre_backward_ref_cnt", "ds_grads_remaining")


def full_shape(param: nn.Parameter) -> torch.Size:
    """A parameter's shape, also when ZeRO-3 has partitioned it (then `.data` is empty)."""
    return getattr(param, "ds_shape", param.shape)


def full_numel(param: nn.Parameter) -> int:
    return math.prod(full_shape(param))


class ZeroSharding:
    """What the gradient methods need from a ZeRO-3 model (made by the DeepSpeed engine).

    module: the engine's bare model, whose modules carry DeepSpeed's backward counters.
    rank, world: this rank and the number of ranks the parameters are partitioned over.
    """

    def __init__(self, module: nn.Module, group: dist.ProcessGroup | None = None) -> None:
        self.modules = list(module.modules())
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)

    def grad(self, loss: torch.Tensor, inputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor | None, ...]:
        """`torch.autograd.grad(loss, inputs)` (retain_graph) as one more backward pass over
        this forward: DeepSpeed's counters are put back afterwards, so the next pass (or the
        trainer's backward) gathers the layers again. Every rank must make the same passes:
        each gathers the partitioned parameters of the layers it crosses (a collective)."""
        saved = [(m, [m.__dict__.get(c) for c in BACKWARD_COUNTERS]) for m in self.modules]
        try:
            return torch.autograd.grad(loss, list(inputs), retain_graph=True, allow_unused=True)
        finally:
            for m, values in saved:
                for counter, value in zip(BACKWARD_COUNTERS, values):
                    if value is not None:
                        setattr(m, counter, value)

    def partition_numel(self, param: nn.Parameter) -> int:
        """Elements of this rank's partition of `param` (DeepSpeed's `ds_tensor` size).

        ValueError when DeepSpeed partitions it over another group than all ranks (hpZ,
        MiCS): the partitions would not line up with `ds_tensor`."""
        part = -(-full_numel(param) // self.world)
        ds_tensor = getattr(param, "ds_tensor", None)
        if ds_tensor is not None and ds_tensor.ds_numel != part:
            raise ValueError(
                f"a ZeRO-3 parameter of shape {tuple(full_shape(param))} is partitioned into {ds_tensor.ds_numel} "
                f"elements per rank, not {part} (all {self.world} ranks): the gradient methods need ZeRO-3 "
                "to partition over every rank (no zero_hpz_partition_size or mics_shard_size)"
            )
        return part

    def partition(self, grads: Sequence[torch.Tensor | None], params: Sequence[nn.Parameter]) -> torch.Tensor:
        """This rank's partition [Σ_p ⌈n_p / R⌉] of Σ_ranks grads, in one reduce-scatter.

        grads: this rank's full gradient of each of `params` (None = zeros), float32.
        Row r of the scattered [R, Σ_p ⌈n_p / R⌉] input is every parameter's r-th slice, so the
        rank's result lines up with its own `ds_tensor` of each parameter, in order.
        """
        rows = []
        device = params[0].device if params else torch.device("cpu")
        for g, p in zip(grads, params):
            n, part = full_numel(p), self.partition_numel(p)
            flat = torch.zeros(self.world * part, dtype=torch.float32, device=device)
            if g is not None:
                flat[:n] = g.reshape(-1).float()
            rows.append(flat.view(self.world, part))
        scattered = torch.cat(rows, dim=1)
        out = torch.empty(scattered.shape[1], dtype=torch.float32, device=scattered.device)
        dist.reduce_scatter_tensor(out, scattered.reshape(-1), group=self.group)
        return out
