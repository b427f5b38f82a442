"""Negative-transfer monitoring during training: task affinity and gate health.

Task affinity is the pairwise cosine similarity of per-task gradients on the shared
parameters. It is measured on a fixed validation batch (so the training stream is untouched),
in eval mode with the RNG state put back (so dropout draws are untouched), with gradients
averaged over ranks (so every rank computes the same matrix).
"""

from __future__ import annotations

import itertools
from typing import Any

import torch

from manytask.config import MonitorConfig
from manytask.models.losses import task_losses
from manytask.trainer import distributed as D


def cosine_matrix(grads: list[torch.Tensor]) -> torch.Tensor:
    """[T, T] cosine similarity of flattened per-task gradients (0 where a gradient is 0)."""
    g = torch.stack([x.reshape(-1).double() for x in grads])
    norms = g.norm(dim=1, keepdim=True).clamp_min(1e-30)
    unit = g / norms
    return unit @ unit.T


def task_gradients(model: torch.nn.Module, batch: Any, specs: dict, params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
    """One gradient per task of its masked loss w.r.t. `params`, averaged over ranks."""
    out = model(batch.inputs, batch.source_id)
    losses = task_losses(out.outputs, batch.labels, batch.masks, specs)
    grads = []
    for task in specs:
        g = torch.autograd.grad(losses[task], params, retain_graph=True, allow_unused=True)
        flat = torch.cat([(x if x is not None else torch.zeros_like(p)).reshape(-1) for x, p in zip(g, params)])
        grads.append(D.all_reduce_mean(flat))
    return grads


class TaskAffinity:
    def __init__(self, cfg: MonitorConfig, tasks: list[str]):
        self.cfg, self.tasks = cfg, tasks
        self.negative_run: dict[str, int] = {}
        self._batch = None

    def maybe_measure(self, job: Any, step: int) -> dict[str, float]:
        every = self.cfg.affinity_every
        if not every or step % every or len(self.tasks) < 2:
            return {}
        return self.measure(job, step)

    def measure(self, job: Any, step: int) -> dict[str, float]:
        from manytask.data_pipeline.loader import val_batches

        if self._batch is None:
            batches = val_batches(job.cfg, job.info.rank, job.info.world_size, job.cfg.data.batch_size)
            self._batch = next(iter(batches)).to(job.info.device)
        model = job.engine.module
        params = [p for p in model.shared_parameters() if p.requires_grad]
        rng = torch.get_rng_state()
        was_training = model.training
        model.eval()
        try:
            grads = task_gradients(model, self._batch, job.specs, params)
        finally:
            model.train(was_training)
            torch.set_rng_state(rng)
            model.zero_grad(set_to_none=True)
        matrix = cosine_matrix(grads)
        return self.record(matrix, step, job.run.say)

    def record(self, matrix: torch.Tensor, step: int, say=print) -> dict[str, float]:
        """Affinity scalars for one measurement; warns when a pair stays negative for a window."""
        metrics: dict[str, float] = {}
        conflicts = 0
        for i, j in itertools.combinations(range(len(self.tasks)), 2):
            a, b = self.tasks[i], self.tasks[j]
            value = float(matrix[i, j])
            metrics[f"affinity/{a}/{b}"] = value
            key = f"{a}/{b}"
            self.negative_run[key] = self.negative_run.get(key, 0) + 1 if value < 0 else 0
            if self.negative_run[key] >= self.cfg.affinity_window:
                conflicts += 1
                if self.negative_run[key] == self.cfg.affinity_window:
                    say(
                        f"step {step}: tasks '{a}' and '{b}' have had conflicting gradients "
                        f"(cosine < 0) for {self.cfg.affinity_window} measurements in a row: "
                        f"possible negative transfer"
                    )
        metrics["affinity/conflicting_pairs"] = float(conflicts)
        return metrics

    def state_dict(self) -> dict[str, Any]:
        return {"negative_run": dict(self.negative_run)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.negative_run = dict(state["negative_run"])


def gate_means_from_metrics(metrics: dict[str, float]) -> dict[str, list[float]]:
    """{gate: [E]} from flat `gates/<gate>/expert_<i>` metric keys."""
    means: dict[str, dict[int, float]] = {}
    for key, value in metrics.items():
        if key.startswith("gates/") and "/expert_" in key:
            gate, expert = key[len("gates/") :].rsplit("/expert_", 1)
            means.setdefault(gate, {})[int(expert)] = value
    return {g: [v[i] for i in sorted(v)] for g, v in means.items()}


def gate_health(gates: dict[str, list[float]], cfg: MonitorConfig) -> tuple[bool, list[int]]:
    """(collapsed, dead experts) for gate means {gate: [E]}.

    Collapsed: in every gate a single expert takes more than `collapse_threshold`.
    Dead: an expert index whose weight is below `dead_threshold` in every gate (gates of the
    widest width only, since e.g. PLE's task-specific gates see a different expert set).
    """
    if not gates:
        return False, []
    collapsed = all(max(w) > cfg.collapse_threshold for w in gates.values())
    width = max(len(w) for w in gates.values())
    wide = [w for w in gates.values() if len(w) == width]
    dead = [e for e in range(width) if all(w[e] < cfg.dead_threshold for w in wide)]
    return collapsed, dead


class GateHealth:
    def __init__(self, cfg: MonitorConfig):
        self.cfg = cfg
        self.was_collapsed = False
        self.dead: list[int] = []

    def check(self, job: Any, gate_metrics: dict[str, float]) -> dict[str, float]:
        gates = gate_means_from_metrics(gate_metrics)
        if not gates:
            return {}
        collapsed, dead = gate_health(gates, self.cfg)
        if collapsed and not self.was_collapsed:
            job.run.say(
                f"step {job.step}: gate collapse — one expert takes > {self.cfg.collapse_threshold:.0%} "
                f"of the weight in every gate"
            )
        if dead and dead != self.dead:
            job.run.say(
                f"step {job.step}: dead experts {dead} (weight < {self.cfg.dead_threshold} in every gate)"
            )
        self.was_collapsed, self.dead = collapsed, dead
        return {"gates/collapsed": float(collapsed), "gates/dead_experts": float(len(dead))}

    def state_dict(self) -> dict[str, Any]:
        return {"was_collapsed": self.was_collapsed, "dead": list(self.dead)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.was_collapsed, self.dead = bool(state["was_collapsed"]), list(state["dead"])
