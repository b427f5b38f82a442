"""Task towers: tasks whose towers have the same shape run as one stacked MLP.

Tasks are grouped by output width (every tower has the same hidden widths), so a recipe with
64 binary tasks runs 64 towers as one `baddbmm` per layer. Task i of a group owns slice i of
every stacked tensor of that group.
"""

from __future__ import annotations

import torch
from torch import nn

from manytask.models.gates import mix
from manytask.models.layers import Activation, StackedMLP
from manytask.models.mixed_linear import use_fused
from manytask.models.spec import TaskSpec


class Towers(nn.Module):
    """One tower per task: hidden widths `hidden`, then a linear layer to `out_dim`.

    forward: `[B, in_dim]` (every tower reads the same representation) or `[T, B, in_dim]`
    (tower t reads its own, in task order) -> {task: `[B, out_dim]`} in task order.
    """

    def __init__(
        self,
        in_dim: int,
        hidden: list[int],
        tasks: dict[str, TaskSpec],
        activation: Activation = "relu",
        dropout: float = 0.0,
    ):
        super().__init__()
        self.task_names = list(tasks)
        by_width: dict[int, list[int]] = {}
        for t, spec in enumerate(tasks.values()):
            by_width.setdefault(spec.out_dim, []).append(t)
        self.group_tasks: list[list[int]] = list(by_width.values())
        self.groups = nn.ModuleList(
            StackedMLP(len(idx), in_dim, [*hidden, out], activation, last_activation=False, dropout=dropout)
            for out, idx in by_width.items()
        )
        for g, idx in enumerate(self.group_tasks):
            self.register_buffer(f"_index{g}", torch.tensor(idx), persistent=False)

    def _group_input(self, x: torch.Tensor, g: int) -> torch.Tensor:
        if x.dim() == 2:
            return x
        idx = self.group_tasks[g]
        if len(idx) == x.shape[0]:  # one group holds every task, in order
            return x
        if idx == list(range(idx[0], idx[0] + len(idx))):  # a contiguous run: a view
            return x[idx[0] : idx[0] + len(idx)]
        return x.index_select(0, getattr(self, f"_index{g}"))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self._by_task([group(self._group_input(x, g)) for g, group in enumerate(self.groups)])

    def _by_task(self, group_outputs: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Group outputs `[n, B, out]` -> {task: `[B, out]`} in task order."""
        out: dict[str, torch.Tensor] = {}
        for g, y in enumerate(group_outputs):
            # unbind: one backward op for the whole group, not a zero-filled [n, B, out] per task
            for t, y_t in zip(self.group_tasks[g], y.unbind(0)):
                out[self.task_names[t]] = y_t
        return {name: out[name] for name in self.task_names}

    def forward_mixed(self, w: torch.Tensor, experts: torch.Tensor) -> dict[str, torch.Tensor]:
        """Towers on gate mixtures: tower t reads Σ_e w[t, b, e] · experts[e, b].

        w `[T, B, E]`, experts `[E, B, D]` -> {task: `[B, out_dim]`}. Same result as
        `self(mix(w, experts))`; on CPU the mixture is fused into each group's first layer
        (`mixed_linear`), so no `[T, B, D]` tensor is allocated or kept for the backward.
        """
        if not use_fused(w, experts.shape[-1]):
            return self(mix(w, experts))
        ys = []
        for g, group in enumerate(self.groups):
            h = group.layers[0](experts, mix=self._group_input(w, g))
            ys.append(group.after_layer(h, 0))  # [n, B, out]
        return self._by_task(ys)

    def task_parameters(self) -> dict[str, list[tuple[nn.Parameter, int | None]]]:
        """task -> its tower's parameters as (stacked tensor, slice index)."""
        params: dict[str, list[tuple[nn.Parameter, int | None]]] = {}
        for g, group in enumerate(self.groups):
            for i, t in enumerate(self.group_tasks[g]):
                params[self.task_names[t]] = list(group.member_parameters(i))
        return {name: params[name] for name in self.task_names}
