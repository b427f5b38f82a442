"""`manytask report RUN_DIR`: PNG charts of a run from its `metrics.jsonl` alone (no W&B).

Writes into `RUN_DIR/report/`:
- `loss_<task>.png`: train loss and validation metrics of one task over steps;
- `train_loss.png`: every task's train loss and the total `train/loss` together;
- `gates.png`: per gate, mean gate weight of each expert (rows) over logged steps (columns);
- `affinity.png`: the last logged `affinity/<a>/<b>` gradient cosines as a task × task matrix;
- `sampler.png`: the task mixture (`sampler/<source>/prob`) as a stacked area over steps, the
  per-task train losses beneath it and, for adaptive mixing, the signal driving each source;
- `weights.png`: loss weights per task over steps.
Charts whose metrics were never logged are skipped.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from manytask.trainer.logger import read_metrics, safe_file_name
from manytask.trainer.plots import affinity_heatmap, mixture_over_time

# the gate is a task, `<task>/level<l>` (PLE), `(shared)` or `(shared)/level<l>`
EXPERT_KEY = re.compile(r"^gates/(?P<gate>.+)/expert_(?P<expert>\d+)$")
Series = tuple[list[int], list[float]]


def series(rows: list[dict[str, Any]], key: str) -> Series:
    """(steps, values) of one metric, skipping steps where it is missing or null."""
    steps, values = [], []
    for row in rows:
        value = row.get(key)
        if value is not None:
            steps.append(row["step"])
            values.append(float(value))
    return steps, values


def keys_matching(rows: list[dict[str, Any]], pattern: str) -> list[re.Match]:
    """Matches of `pattern` against every metric key, in first-logged order."""
    seen: dict[str, re.Match] = {}
    regex = re.compile(pattern)
    for row in rows:
        for key in row:
            if key not in seen and (match := regex.match(key)):
                seen[key] = match
    return list(seen.values())


def _lines(ax, rows: list[dict[str, Any]], keys: dict[str, str], ylabel: str) -> None:
    """One line per metric key; `keys` maps key -> legend label."""
    for key, label in keys.items():
        steps, values = series(rows, key)
        ax.plot(steps, values, marker="." if len(steps) < 30 else None, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if keys:
        ax.legend(fontsize=8)


def _save(fig: Figure, path: Path, written: list[Path]) -> None:
    fig.savefig(path, dpi=100)
    written.append(path)


def task_loss_figures(rows: list[dict[str, Any]], out: Path) -> list[Path]:
    """`loss_<task>.png` per task (train loss left, validation metrics right) and `train_loss.png`."""
    written: list[Path] = []
    train = {m["task"]: m.string for m in keys_matching(rows, r"^train/(?P<task>[^/]+)/loss$")}
    val: dict[str, dict[str, str]] = defaultdict(dict)
    for m in keys_matching(rows, r"^val/(?P<task>[^/]+)/(?P<metric>.+)$"):
        val[m["task"]][m.string] = m["metric"]

    for task in dict.fromkeys([*train, *val]):
        has_val = bool(val.get(task))
        fig = Figure(figsize=(10 if has_val else 6, 4), layout="constrained")
        ax = fig.add_subplot(1, 2 if has_val else 1, 1)
        _lines(ax, rows, {train[task]: "train loss"} if task in train else {}, "loss")
        ax.set_title(f"{task}: train")
        if has_val:
            ax = fig.add_subplot(1, 2, 2)
            _lines(ax, rows, val[task], "value")
            ax.set_title(f"{task}: validation")
        _save(fig, out / f"loss_{safe_file_name(task)}.png", written)

    if train:
        fig = Figure(figsize=(7, 4), layout="constrained")
        ax = fig.add_subplot()
        keys = {key: task for task, key in train.items()}
        if any("train/loss" in row for row in rows):
            keys["train/loss"] = "total (weighted)"
        _lines(ax, rows, keys, "loss")
        ax.set_yscale("log" if all(v > 0 for k in keys for v in series(rows, k)[1]) else "linear")
        ax.set_title("train loss per task")
        _save(fig, out / "train_loss.png", written)
    return written


def gate_keys(rows: list[dict[str, Any]]) -> dict[str, dict[int, str]]:
    """gate -> {expert index: metric key} of every `gates/<gate>/expert_<i>` logged."""
    experts: dict[str, dict[int, str]] = defaultdict(dict)
    for m in keys_matching(rows, EXPERT_KEY.pattern):
        experts[m["gate"]][int(m["expert"])] = m.string
    return dict(experts)


def gate_figure(rows: list[dict[str, Any]], out: Path) -> list[Path]:
    """`gates.png`: for each gate an experts × logged-steps heatmap of mean gate weights."""
    experts = gate_keys(rows)
    if not experts:
        return []

    fig = Figure(figsize=(10, 1.0 + 1.8 * len(experts)), layout="constrained")
    axes = fig.subplots(len(experts), 1, squeeze=False)[:, 0]
    for ax, (gate, by_index) in zip(axes, experts.items()):
        keys = [by_index[i] for i in sorted(by_index)]
        logged = [row for row in rows if any(row.get(k) is not None for k in keys)]
        grid = np.array([[np.nan if r.get(k) is None else r[k] for r in logged] for k in keys])
        image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0.0, interpolation="nearest")
        ax.set_yticks(range(len(keys)), [f"e{i}" for i in sorted(by_index)])
        ticks = np.linspace(0, len(logged) - 1, num=min(len(logged), 8)).round().astype(int)
        ax.set_xticks(ticks, [str(logged[i]["step"]) for i in ticks])
        ax.set_ylabel(gate)
        fig.colorbar(image, ax=ax, label="mean weight")
    axes[-1].set_xlabel("step")
    fig.suptitle("gate utilization over time")
    written: list[Path] = []
    _save(fig, out / "gates.png", written)
    return written


def affinity_figure(rows: list[dict[str, Any]], out: Path) -> list[Path]:
    """`affinity.png` from the last logged value of every `affinity/<a>/<b>` key."""
    pairs = keys_matching(rows, r"^affinity/(?P<a>[^/]+)/(?P<b>[^/]+)$")
    if not pairs:
        return []
    tasks = list(dict.fromkeys(t for m in pairs for t in (m["a"], m["b"])))
    index = {t: i for i, t in enumerate(tasks)}
    matrix = np.full((len(tasks), len(tasks)), np.nan)
    np.fill_diagonal(matrix, 1.0)  # a task's gradient agrees with itself
    for m in pairs:
        _, values = series(rows, m.string)
        if values:
            matrix[index[m["a"]], index[m["b"]]] = values[-1]
            if np.isnan(matrix[index[m["b"]], index[m["a"]]]):
                matrix[index[m["b"]], index[m["a"]]] = values[-1]  # cosine is symmetric
    written: list[Path] = []
    _save(affinity_heatmap(matrix, tasks), out / "affinity.png", written)
    return written


def per_task_figure(rows: list[dict[str, Any]], pattern: str, title: str, path: Path) -> list[Path]:
    """One line per task for keys matching `pattern` (with a `task` group)."""
    keys = {m.string: m["task"] for m in keys_matching(rows, pattern)}
    if not keys:
        return []
    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.add_subplot()
    _lines(ax, rows, keys, title)
    ax.set_title(f"{title} over time")
    written: list[Path] = []
    _save(fig, path, written)
    return written


def mixture_figure(rows: list[dict[str, Any]], out: Path) -> list[Path]:
    """`sampler.png`: the mixture over time with the per-task train losses beneath it."""
    probs = {m["source"]: series(rows, m.string) for m in keys_matching(rows, r"^sampler/(?P<source>[^/]+)/prob$")}
    if not probs:
        return []
    losses = {m["task"]: series(rows, m.string) for m in keys_matching(rows, r"^train/(?P<task>[^/]+)/loss$")}
    signals = {f"{m['source']} {m['kind']}".replace("signal_", ""): series(rows, m.string)
               for m in keys_matching(rows, r"^sampler/(?P<source>[^/]+)/(?P<kind>signal.*)$")}
    written: list[Path] = []
    _save(mixture_over_time(probs, losses, signals), out / "sampler.png", written)
    return written


def write_report(run_dir: str | Path) -> list[Path]:
    """Charts of a run as PNG files in `run_dir/report/`; returns the written paths."""
    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    if not rows:
        raise ValueError(f"{run_dir / 'metrics.jsonl'} holds no metrics")
    out = run_dir / "report"
    out.mkdir(exist_ok=True)
    return [
        *task_loss_figures(rows, out),
        *gate_figure(rows, out),
        *affinity_figure(rows, out),
        *mixture_figure(rows, out),
        *per_task_figure(rows, r"^weights/(?P<task>[^/]+)$", "loss weight", out / "weights.png"),
    ]
