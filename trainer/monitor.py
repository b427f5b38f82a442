"""Negative-transfer monitoring during training: task affinity and gate health.

Task affinity is the pairwise cosine similarity of per-task gradients on the shared
parameters (as in PCGrad / GradVac). It is measured on a fixed validation batch (so the
training stream is untouched), in eval mode with every RNG put back (so dropout draws and
anything seeded later are untouched), with `autograd.grad` (so no `.grad` buffer, DDP hook
or optimizer state is touched), and with gradients summed over ranks (so every rank
computes the same matrix and the same warnings). A run with affinity on trains bit-for-bit
like one without.

Read it with care: with a free head per task, heads can absorb a sign, so two tasks whose
targets are anti-correlated need not conflict on the shared layers; a persistently
negative cosine means the tasks pull the *shared* layers apart.

Gate health turns the logged mean gate weights (`gates/<gate>/expert_<i>`) into two
warnings: a collapsed gate (one expert takes nearly all the weight) and dead experts (no gate
uses them).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch

from manytask.config import MonitorConfig
from manytask.data_pipeline.batch import Batch
from manytask.models.losses import task_losses
from manytask.trainer import distributed as D
from manytask.trainer.weightings.task_gradients import flat_gradient, gram_matrix

Say = Callable[[str], None]


# --------------------------------------------------------------------------- task affinity
def cosine_matrix(grads: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
    """[T, T] cosine similarity of per-task gradients (`[T, P]` or T tensors, any shape).

    From the Gram matrix (`weightings/task_gradients.py`, the gradient methods' too), in
    float64; a row or column of a task whose gradient is all zero (no labelled
    sample in the measured batch) is NaN: "unknown", not "unrelated".
    """
    gram = gram_matrix(torch.stack([x.reshape(-1) for x in grads]))
    norms = gram.diagonal().clamp_min(0).sqrt()
    matrix = gram / (norms[:, None] * norms[None, :]).clamp_min(1e-300)
    missing = (norms == 0).nonzero().reshape(-1)
    matrix[missing, :] = math.nan
    matrix[:, missing] = math.nan
    return matrix


def task_gradients(
    model: torch.nn.Module,
    batches: Batch | Iterable[Batch],
    specs: dict,
    params: list[torch.nn.Parameter],
) -> torch.Tensor:
    """Per-task gradients of the summed masked loss w.r.t. `params`: `[T, P]` (float32).

    Row t is Σ over batches and ranks of (labelled samples of t) × ∇ mean loss of t, i.e. the
    gradient of task t's total loss over every rank's batches; a rank without batches or a
    task without labels contributes zeros. One all-reduce for all tasks, so every rank must
    call this (the same number of times). Uses `autograd.grad`: `.grad` stays untouched.
    """
    if isinstance(batches, Batch):
        batches = [batches]
    device = params[0].device if params else torch.device("cpu")
    total = torch.zeros(len(specs), sum(p.numel() for p in params), device=device)
    for batch in batches:
        out = model(batch.inputs, batch.source_id)
        losses = task_losses(out.outputs, batch.labels, batch.masks, specs)
        for i, task in enumerate(specs):
            n = int(batch.masks[task].sum())
            if n == 0 or not params:
                continue
            total[i] += n * flat_gradient(losses[task], params)
    return D.all_reduce_sum(total)


def affinity_matrix(metrics: dict[str, float], tasks: list[str]) -> np.ndarray:
    """`[T, T]` matrix from `affinity/<a>/<b>` metric keys (diagonal 1, missing pairs NaN)."""
    matrix = np.full((len(tasks), len(tasks)), np.nan)
    np.fill_diagonal(matrix, 1.0)
    for i, j in itertools.combinations(range(len(tasks)), 2):
        value = metrics.get(f"affinity/{tasks[i]}/{tasks[j]}")
        if value is not None:
            matrix[i, j] = matrix[j, i] = value
    return matrix


class TaskAffinity:
    """Every `monitor.affinity_every` steps: `affinity/<a>/<b>` gradient cosines for every task
    pair, `affinity/conflicting_pairs`, and a warning when a pair has stayed negative for
    `monitor.affinity_window` measurements in a row. State: the negative streak per pair."""

    def __init__(self, cfg: MonitorConfig, tasks: list[str]):
        self.cfg, self.tasks = cfg, tasks
        self.negative_run: dict[str, int] = {}
        self._batches: list[Batch] | None = None
        self._off = False  # no validation split to measure on

    def should_run(self, step: int) -> bool:
        """At multiples of `monitor.affinity_every` with two tasks or more (from the step and
        the recipe alone, so all ranks agree without a collective: `measure` is one)."""
        every = self.cfg.affinity_every
        return bool(every) and step % every == 0 and len(self.tasks) >= 2

    def fixed_batches(self, job: Any) -> list[Batch]:
        """The first validation batch of every source (this rank's share), read once."""
        if self._batches is None:
            from manytask.data_pipeline.validation import val_batches

            cfg, info = job.cfg, job.info
            batches = val_batches(cfg, info.rank, info.world_size, cfg.data.batch_size, max_batches=1)
            self._batches = [b.to(info.device) for b in batches]
        return self._batches

    def measure(self, job: Any, step: int) -> dict[str, float]:
        if not any(src.val for src in job.cfg.data.sources):
            # The same config on every rank, so all ranks turn it off together.
            if not self._off:
                job.run.say("monitor.affinity_every is set but no source has a `val` split: task affinity is off")
            self._off = True
            return {}
        model = job.engine.module  # the bare model: no DDP / DeepSpeed hooks run
        params = [p for p in model.shared_parameters() if p.requires_grad]
        rng = D.rng_state()
        was_training = model.training
        model.eval()
        try:
            grads = task_gradients(model, self.fixed_batches(job), job.specs, params)
        finally:
            model.train(was_training)
            D.load_rng_state(rng)
        return self.record(cosine_matrix(grads), step, job.run.say)

    def record(self, matrix: torch.Tensor, step: int, say: Say = print) -> dict[str, float]:
        """Affinity scalars of one measurement `[T, T]`; warns once when a pair's negative
        streak reaches the window (a NaN pair, i.e. a task without labels, keeps its streak)."""
        metrics: dict[str, float] = {}
        conflicts = 0
        for i, j in itertools.combinations(range(len(self.tasks)), 2):
            a, b = self.tasks[i], self.tasks[j]
            value = float(matrix[i, j])
            metrics[f"affinity/{a}/{b}"] = value
            key = f"{a}/{b}"
            if not math.isnan(value):
                self.negative_run[key] = self.negative_run.get(key, 0) + 1 if value < 0 else 0
            streak = self.negative_run.get(key, 0)
            if streak >= self.cfg.affinity_window:
                conflicts += 1
                if streak == self.cfg.affinity_window:
                    say(
                        f"step {step}: tasks '{a}' and '{b}' have had conflicting gradients "
                        f"(cosine < 0, now {value:.2f}) for {streak} measurements in a row: "
                        f"possible negative transfer (compare with `manytask compare`)"
                    )
        metrics["affinity/conflicting_pairs"] = float(conflicts)
        return metrics

    def state_dict(self) -> dict[str, Any]:
        return {"negative_run": dict(self.negative_run)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.negative_run = dict(state["negative_run"])


def log_affinity_heatmap(job: Any, metrics: dict[str, float]) -> None:
    """The task × task heatmap image (`affinity/heatmap`) on rank 0, at measurement steps."""
    if not job.info.is_rank0 or not any(k.startswith("affinity/") and k.count("/") == 2 for k in metrics):
        return
    from manytask.trainer.plots import affinity_heatmap

    fig = affinity_heatmap(affinity_matrix(metrics, job.tasks), job.tasks)
    fig.axes[0].set_title(f"task affinity (gradient cosine), step {job.step}")
    job.logger.log_image(job.step, "affinity/heatmap", fig)


# --------------------------------------------------------------------------- gate health
def gate_means_from_metrics(metrics: dict[str, float]) -> dict[str, list[float]]:
    """{gate: [E]} from flat `gates/<gate>/expert_<i>` metric keys."""
    means: dict[str, dict[int, float]] = {}
    for key, value in metrics.items():
        if key.startswith("gates/") and "/expert_" in key:
            gate, expert = key[len("gates/") :].rsplit("/expert_", 1)
            means.setdefault(gate, {})[int(expert)] = value
    return {g: [v[i] for i in sorted(v)] for g, v in means.items()}


def gate_health(
    gates: dict[str, list[float]], cfg: MonitorConfig, experts: dict[str, list[str]] | None = None
) -> tuple[list[str], list[str]]:
    """(collapsed gates, dead experts) for batch-mean gate weights {gate: [E]}.

    Collapsed: a gate (of at least 2 experts) giving one expert more than
    `collapse_threshold` of its weight, i.e. routing nearly every sample to that expert.
    Dead: an expert below `dead_threshold` in every gate that sees it. `experts` (the model's
    `gate_experts()`) names the expert behind each gate position, so that e.g. PLE's task
    gates and shared gate, which order their experts differently, count the same expert once.
    A gate it does not name is read as `expert_<e>`, prefixed by its key's level suffix
    (`<task>/level<l>` -> `level<l>/expert_<e>`).
    """
    collapsed = [g for g, w in gates.items() if len(w) >= 2 and max(w) > cfg.collapse_threshold]
    seen: dict[str, list[float]] = {}
    for gate, weights in gates.items():
        names = (experts or {}).get(gate)
        if names is None or len(names) != len(weights):
            level = gate.split("/", 1)[1] + "/" if "/" in gate else ""
            names = [f"{level}expert_{e}" for e in range(len(weights))]
        for name, value in zip(names, weights):
            seen.setdefault(name, []).append(value)
    dead = [name for name, values in seen.items() if all(v < cfg.dead_threshold for v in values)]
    return collapsed, dead


def gate_experts_of(model: Any) -> dict[str, list[str]] | None:
    """The model's `gate_experts()` (gate key -> expert names), None for a model without gates."""
    names = getattr(model, "gate_experts", None)
    return names() if callable(names) else None


class GateHealth:
    """Checks the logged gate means at every log step: `gates/collapsed` (number of collapsed
    gates) and `gates/dead_experts` (number of dead experts), warning when either set grows."""

    def __init__(self, cfg: MonitorConfig, experts: dict[str, list[str]] | None = None):
        self.cfg = cfg
        self.experts = experts  # the model's gate_experts(), when it has gates
        self.collapsed: list[str] = []
        self.dead: list[str] = []

    def check(self, job: Any, gate_metrics: dict[str, float]) -> dict[str, float]:
        gates = gate_means_from_metrics(gate_metrics)
        if not gates:
            return {}
        collapsed, dead = gate_health(gates, self.cfg, self.experts)
        new_collapsed = [g for g in collapsed if g not in self.collapsed]
        if new_collapsed:
            job.run.say(
                f"step {job.step}: gate collapse in {', '.join(new_collapsed)}: one expert takes "
                f"> {self.cfg.collapse_threshold:.0%} of the gate's weight (monitor.collapse_threshold)"
            )
        new_dead = [e for e in dead if e not in self.dead]
        if new_dead:
            job.run.say(
                f"step {job.step}: dead experts {', '.join(new_dead)}: weight < "
                f"{self.cfg.dead_threshold} in every gate (monitor.dead_threshold)"
            )
        self.collapsed, self.dead = collapsed, dead
        return {"gates/collapsed": float(len(collapsed)), "gates/dead_experts": float(len(dead))}

    def state_dict(self) -> dict[str, Any]:
        return {"collapsed": list(self.collapsed), "dead": list(self.dead)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # Checkpoints written before the per-gate lists kept only a flag and expert indices.
        self.collapsed = [str(g) for g in state.get("collapsed", [])]
        self.dead = [str(e) if isinstance(e, str) else f"expert_{e}" for e in state.get("dead", [])]
