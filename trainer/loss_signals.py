"""The signals adaptive task mixing follows, from the train losses every rank agrees on.

`LossSignals.observe(step, losses)` takes one step's mean loss per task (the all-reduced
`StepResult.losses`, identical on every rank) and keeps, in float64:

- `smoothed`: an EMA of each task's loss (decay `ema`; non-finite or absent losses skipped);
- `initial`:  L⁰, the smoothed loss at the first update that had it;
- `progress`: an EMA (same decay) of the relative improvement of the smoothed loss between
  consecutive updates, max(0, (L_prev - L_now) / L_prev) — the rate at which a task learns.

Every `update_every` completed steps the per-task signal is recomputed:
- `loss_ratio`: L_now / L⁰ (a task that improved least has the largest ratio);
- `progress`:   the smoothed relative improvement (a plateaued task falls towards 0).

A source's signal is the arithmetic mean of the signals of the tasks it labels (each task
counts once, whatever its sample count; a task labelled by several sources feeds each of
them). A source none of whose tasks has a signal yet gets the mean of the other sources'
signals (1.0 if there is none), so it is neither favoured nor starved before it is measured.

Same inputs, same float64 arithmetic in the same order: the same numbers on every rank, with
no communication. The whole state is plain Python floats: `torch.load(weights_only=True)`
restores it bit for bit.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

# A progress signal of exactly 0 on every source would leave no mixture to scale; this keeps
# the weights positive (the floors in `sampler.min_prob` are the real protection).
PROGRESS_FLOOR = 1e-6


class LossSignals:
    """Smoothed per-task losses and the per-source signal derived from them.

    tasks:         task names, in the order of the internal arrays.
    source_tasks:  per source (in the sampler's source order), the tasks it labels.
    ema, update_every: the loss EMA's decay and how many steps an update interval holds.
    """

    def __init__(self, tasks: list[str], source_tasks: list[list[str]], ema: float, update_every: int) -> None:
        self.tasks = list(tasks)
        index = {t: i for i, t in enumerate(self.tasks)}
        self.members = [[index[t] for t in labels] for labels in source_tasks]
        self.ema = float(ema)
        self.update_every = int(update_every)
        nan = [math.nan] * len(self.tasks)
        self.smoothed = list(nan)  # EMA of each task's loss
        self.initial = list(nan)  # L⁰ per task
        self.at_last_update = list(nan)  # smoothed loss at the previous update
        self.progress = list(nan)  # EMA of the relative improvement per update
        self.updates = 0

    def observe(self, step: int, losses: dict[str, float]) -> bool:
        """Fold in the losses of completed step `step` (1-based: the count of steps done);
        returns True when this step ended an update interval and the signals changed."""
        d = self.ema
        for i, task in enumerate(self.tasks):
            value = losses.get(task, math.nan)
            if not math.isfinite(value):
                continue  # no labelled sample of this task anywhere, or a skipped step
            old = self.smoothed[i]
            self.smoothed[i] = float(value) if math.isnan(old) else d * old + (1.0 - d) * float(value)
        if step % self.update_every:
            return False
        for i, now in enumerate(self.smoothed):
            if math.isnan(now):
                continue
            if math.isnan(self.initial[i]):
                self.initial[i] = now
            before = self.at_last_update[i]
            if not math.isnan(before) and before > 0:
                gain = max(0.0, (before - now) / before)
                self.progress[i] = gain if math.isnan(self.progress[i]) else d * self.progress[i] + (1.0 - d) * gain
            self.at_last_update[i] = now
        self.updates += 1
        return True

    def task_signal(self, kind: str) -> list[float]:
        """Per task: L/L⁰ (`loss_ratio`) or the smoothed relative improvement (`progress`);
        NaN where not measured yet."""
        if kind == "loss_ratio":
            return [now / first if first > 0 else math.nan for now, first in zip(self.at_last_update, self.initial)]
        return list(self.progress)

    def source_signal(self, kind: str) -> np.ndarray:
        """float64 [sources]: the mean signal of each source's tasks (see the module doc)."""
        per_task = self.task_signal(kind)
        out = []
        for members in self.members:
            known = [per_task[i] for i in members if not math.isnan(per_task[i])]
            out.append(sum(known) / len(known) if known else math.nan)
        known = [v for v in out if not math.isnan(v)]
        fill = sum(known) / len(known) if known else 1.0
        signal = np.asarray([fill if math.isnan(v) else v for v in out], dtype=np.float64)
        return np.maximum(signal, PROGRESS_FLOOR) if kind == "progress" else signal

    def state_dict(self) -> dict[str, Any]:
        return {"tasks": list(self.tasks), "smoothed": list(self.smoothed), "initial": list(self.initial),
                "at_last_update": list(self.at_last_update), "progress": list(self.progress),
                "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if list(state["tasks"]) != self.tasks:
            raise ValueError(f"sampler loss signals were saved for tasks {state['tasks']}, this run has {self.tasks}")
        for key in ("smoothed", "initial", "at_last_update", "progress"):
            setattr(self, key, [float(v) for v in state[key]])
        self.updates = int(state["updates"])


def project_to_bounds(p: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """The mixture closest in ratio to `p` within the floors `lo` and ceilings `hi`:
    q_i = clip(c * p_i, lo_i, hi_i) with the one scale c > 0 that makes sum(q) = 1.

    p, lo, hi: float64 [sources]; p sums to 1, sum(lo) <= 1 <= sum(hi) (checked at config
    time). Sources that touch no bound keep their ratios to each other. Exact: the sum is
    piecewise linear in c, so it is solved on the segment between two breakpoints.
    """
    if not (lo > 0).any() and not (hi < 1).any():
        return p
    support = p > 0
    if np.minimum(hi, 1.0)[support].sum() + lo[~support].sum() < 1.0:
        # the sources with weight cannot reach 1 under their ceilings: give every source a sliver
        p = p + 1e-9
        support = p > 0
    breaks = np.unique(np.concatenate([[0.0], lo[support] / p[support], hi[support] / p[support]]))
    sums = np.clip(np.outer(breaks, p), lo, hi).sum(axis=1)
    k = int(np.searchsorted(sums, 1.0))  # first breakpoint whose sum reaches 1
    if k == 0:
        c = 0.0
    elif k == len(breaks):
        c = float(breaks[-1])
    else:
        a, b = breaks[k - 1], breaks[k]
        c = float(a + (1.0 - sums[k - 1]) * (b - a) / (sums[k] - sums[k - 1]))
    q = np.clip(c * p, lo, hi)
    return q / q.sum()
