"""Figures for gate utilization and task affinity.

Built with `matplotlib.figure.Figure` directly (rendered by Agg on `savefig`), never through
pyplot: no GUI backend is touched on headless nodes and no global figure list grows during a
long run, so callers need not close anything.
"""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure

MAX_ANNOTATED_CELLS = 400  # beyond this the numbers are unreadable; the colours remain


def _annotate(ax, values: np.ndarray, dark: np.ndarray) -> None:
    """Write each value in its cell; `dark` marks cells whose colour needs white text."""
    if values.size > MAX_ANNOTATED_CELLS:
        return
    for (row, col), value in np.ndenumerate(values):
        if np.isnan(value):
            continue
        colour = "white" if dark[row, col] else "black"
        ax.text(col, row, f"{value:.2f}", ha="center", va="center", fontsize=8, color=colour)


def _size(cols: int, rows: int) -> tuple[float, float]:
    return (min(max(4.0, 2.5 + 0.6 * cols), 20.0), min(max(3.0, 1.5 + 0.45 * rows), 20.0))


def gate_heatmap(gate_means: dict[str, np.ndarray], step: int) -> Figure:
    """Tasks × experts heatmap of mean gate weights at one step.

    gate_means: task -> mean gate weight per expert, `[experts]` (tensors are accepted too).
    Returns a Figure; rows are tasks in the given order, cells annotated with the weight.
    """
    tasks = list(gate_means)
    rows = [np.asarray(gate_means[t], dtype=float).reshape(-1) for t in tasks]
    experts = max((len(r) for r in rows), default=0)
    values = np.full((len(tasks), experts), np.nan)
    for i, row in enumerate(rows):
        values[i, : len(row)] = row  # gates of different widths (e.g. PLE) leave NaN

    fig = Figure(figsize=_size(experts, len(tasks)), layout="constrained")
    ax = fig.add_subplot()
    vmax = max(float(np.nanmax(values)) if np.isfinite(values).any() else 1.0, 1e-6)
    image = ax.imshow(values, cmap="viridis", vmin=0.0, vmax=vmax, aspect="auto")
    ax.set_xticks(range(experts), [f"e{i}" for i in range(experts)])
    ax.set_yticks(range(len(tasks)), tasks)
    ax.set_xlabel("expert")
    ax.set_title(f"gate utilization, step {step}")
    with np.errstate(invalid="ignore"):
        _annotate(ax, values, dark=values < 0.6 * vmax)  # viridis is dark at the low end
    fig.colorbar(image, ax=ax, label="mean gate weight")
    return fig


def affinity_heatmap(matrix: np.ndarray, tasks: list[str]) -> Figure:
    """Task × task affinity (gradient cosine, in [-1, 1]); `matrix` is `[tasks, tasks]`.

    Red cells are conflicting task pairs (negative transfer), blue cells cooperating ones.
    """
    values = np.asarray(matrix, dtype=float)
    fig = Figure(figsize=_size(len(tasks), len(tasks)), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(values, cmap="RdBu", vmin=-1.0, vmax=1.0)
    ax.set_xticks(range(len(tasks)), tasks, rotation=45, ha="right")
    ax.set_yticks(range(len(tasks)), tasks)
    ax.set_title("task affinity (gradient cosine)")
    with np.errstate(invalid="ignore"):
        _annotate(ax, values, dark=np.abs(values) > 0.6)  # RdBu is dark at both ends
    fig.colorbar(image, ax=ax, label="cosine")
    return fig


Curves = dict[str, tuple[list[int], list[float]]]  # label -> (steps, values)


def mixture_over_time(probs: Curves, losses: Curves, signals: Curves | None = None) -> Figure:
    """The task mixture as a stacked area over steps, the per-task train losses beneath it on
    the same step axis, and (when logged) the signal driving each source's share at the bottom.

    probs: source -> (steps, probability) — `sampler/<source>/prob`; the bands stack to 1.
    losses: task -> (steps, train loss); signals: curve label -> (steps, signal).
    """
    panels = 2 + bool(signals)
    fig = Figure(figsize=(8, 2.2 + 2.3 * panels), layout="constrained")
    axes = fig.subplots(panels, 1, sharex=True, squeeze=False)[:, 0]
    steps = sorted({s for st, _ in probs.values() for s in st})
    stacked = []
    for st, values in probs.values():
        at = dict(zip(st, values))
        stacked.append([at.get(s, np.nan) for s in steps])
    axes[0].stackplot(steps, np.nan_to_num(np.asarray(stacked, dtype=float)), labels=list(probs), alpha=0.85)
    axes[0].set_ylim(0, 1)
    axes[0].set_ylabel("sampling probability")
    axes[0].set_title("task mixture over time")
    axes[0].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    for ax, curves, label in ((axes[1], losses, "train loss"), (axes[2] if signals else None, signals, "signal")):
        if ax is None:
            continue
        for name, (st, values) in curves.items():
            ax.plot(st, values, label=name)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if curves:
            ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    if losses and all(v > 0 for _, values in losses.values() for v in values):
        axes[1].set_yscale("log")
    axes[-1].set_xlabel("step")
    return fig
