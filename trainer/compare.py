"""`manytask compare RECIPE`: is multi-task learning helping or hurting each task?

Trains the recipe's multi-task model and one `single_task` baseline per task from the same
recipe (same data, steps, batch size, optimizer, seed and encoder settings), then tabulates
each task's primary validation metric and the average relative improvement

    Δm = (1/T) Σ_t (-1)^{l_t} (M_mtl,t − M_st,t) / M_st,t × 100 %,   l_t = 1 if lower is better

(Maninis et al., CVPR 2019; Vandenhende et al., TPAMI 2021). Positive = MTL better; a negative
relative change for a task is negative transfer.

Runs go to `<run.dir>/compare/mtl` and `<run.dir>/compare/single_<task>`, one after another
in this process with the single-process engine: meant for small recipes. The table is printed
and saved as `compare.md` and `compare.csv` beside the runs, and logged as a W&B table.
"""

from __future__ import annotations

import csv
import math
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from manytask.config import Config, ModelConfig, config_from_dict, dump_config
from manytask.models import MODELS, model_params
from manytask.trainer.evaluate import HIGHER_IS_BETTER
from manytask.trainer.logger import MetricsLogger, read_metrics, safe_file_name

Say = Callable[[str], None]

# The metric each task type is judged by (it is added to a task's `metrics` when missing).
PRIMARY_METRIC = {"binary": "auc", "multilabel": "auc", "multiclass": "accuracy", "regression": "mse", "forecast": "mse"}

@dataclass
class CompareRow:
    """One task: its primary validation metric for the single-task and multi-task run."""

    task: str
    metric: str
    single: float
    multi: float
    lower_is_better: bool

    @property
    def relative(self) -> float:
        """(-1)^l (M_mtl − M_st) / M_st × 100: percent, positive = MTL better; NaN if M_st = 0."""
        if self.single == 0 or math.isnan(self.single) or math.isnan(self.multi):
            return math.nan
        sign = -1.0 if self.lower_is_better else 1.0
        return sign * (self.multi - self.single) / self.single * 100.0


def delta_m(rows: list[CompareRow]) -> float:
    """Δm in percent: the mean of every task's sign-adjusted relative change (NaN if any is)."""
    if not rows:
        return math.nan
    return math.fsum(r.relative for r in rows) / len(rows)


# --------------------------------------------------------------------------- run configs
def single_task_params(model: ModelConfig) -> dict[str, Any]:
    """`single_task` params for a multi-task model: its encoder, activation, dropout, and
    hidden widths = the widths of one task's path through the multi-task model."""
    if model.name == "single_task":
        return dict(model.params)
    params: dict[str, Any] = {}
    if "encoder" in model.params:
        params["encoder"] = model.params["encoder"]
    # The baseline gets the hidden widths one task's path has in the multi-task model (shared
    # part, then tower; the model's registry entry names them), so both see the same depth and
    # width per task.
    if MODELS[model.name].task_path:
        p = model_params(model)
        params["hidden"] = [w for key in MODELS[model.name].task_path for w in getattr(p, key)]
        params["activation"] = p.activation
        params["dropout"] = getattr(p, "dropout", 0.0)
    return params


def _with_primary_metric(task: dict[str, Any]) -> dict[str, Any]:
    metric = PRIMARY_METRIC[task["type"]]
    if task.get("metrics") and metric not in task["metrics"]:
        task = {**task, "metrics": [*task["metrics"], metric]}
    return task


def multi_task_config(cfg: Config, run_dir: Path) -> Config:
    """The recipe itself, in `run_dir`, single-process, with every primary metric evaluated."""
    data = cfg.to_dict()
    data["run"].update(dir=str(run_dir), name=f"{cfg.run.name}-mtl")
    data["engine"]["name"] = "single"
    data["tasks"] = {t: _with_primary_metric(spec) for t, spec in data["tasks"].items()}
    data["logging"]["tags"] = [*cfg.logging.tags, "compare", "mtl"]
    return config_from_dict(data)


def single_task_config(
    cfg: Config, task: str, run_dir: Path, label_field: str | None = None, keep_model: bool = False
) -> Config:
    """The recipe cut down to `task`: only the sources labelling it (with only that label),
    model `single_task`, equal weighting (one task), no affinity monitor; data, steps, batch
    size, optimizer and seed unchanged.

    label_field: the baseline is a binary task of that name read from that field (one label of
    a multilabel task). keep_model: keep the recipe's own model with one task instead of
    `single_task` (a time-series model, so both sides have the same forecast head).
    """
    data = cfg.to_dict()
    name = label_field or task
    data["run"].update(dir=str(run_dir), name=f"{cfg.run.name}-single_{name}")
    data["engine"]["name"] = "single"
    data["tasks"] = {name: _with_primary_metric({"type": "binary"} if label_field else data["tasks"][task])}
    sources = [s for s in data["data"]["sources"] if task in s["labels"]]
    for source in sources:
        source["labels"] = {name: label_field or source["labels"][task]}
    data["data"]["sources"] = sources
    kept = {s["name"] for s in sources}
    data["sampler"]["weights"] = {k: v for k, v in data["sampler"]["weights"].items() if k in kept}
    if not keep_model:
        params = single_task_params(cfg.model)
        encoder = params.get("encoder")
        if isinstance(encoder, dict) and encoder.get("fields"):
            # Fields only the dropped sources provide are no longer inputs.
            inputs = {f for s in sources for f in s["inputs"]}
            params["encoder"] = {**encoder, "fields": [f for f in encoder["fields"] if f in inputs]}
        data["model"] = {"name": "single_task", "params": params}
    data["weighting"] = {"name": "equal", "params": {}}
    data["monitor"]["affinity_every"] = 0
    data["logging"]["tags"] = [*cfg.logging.tags, "compare", "single_task"]
    return config_from_dict(data)


# --------------------------------------------------------------------------- running
def same_config(cfg: Config) -> bool:
    """Whether `cfg.run.dir` holds a run of this config (`logging` aside: it does not change
    results, so turning W&B off does not invalidate a finished run)."""
    saved = Path(cfg.run.dir) / "config.yaml"
    if not saved.exists():
        return False
    old = yaml.safe_load(saved.read_text()) or {}
    new = yaml.safe_load(dump_config(cfg))
    return {k: v for k, v in old.items() if k != "logging"} == {k: v for k, v in new.items() if k != "logging"}


def finished_metrics(cfg: Config) -> dict[str, float] | None:
    """The final `val/...` metrics of a run that finished with this config, else None."""
    run_dir = Path(cfg.run.dir)
    if not same_config(cfg) or not (run_dir / "metrics.jsonl").exists():
        return None
    rows = read_metrics(run_dir)
    last = rows[-1] if rows else {}
    if last.get("step") != cfg.trainer.max_steps:
        return None
    val = {k: math.nan if v is None else float(v) for k, v in last.items() if k.startswith("val/")}
    wanted = [f"val/{t}/{PRIMARY_METRIC[spec.type]}" for t, spec in cfg.tasks.items()]
    return val if all(k in val for k in wanted) else None


def run_or_reuse(cfg: Config, reuse: bool, say: Say = print) -> dict[str, float]:
    """Final validation metrics of the run `cfg` describes: read from its run dir when `reuse`
    and it finished with this config, else trained (resuming its checkpoint when `reuse`,
    from scratch in an emptied run dir otherwise)."""
    from manytask.trainer.loop import train

    run_dir = Path(cfg.run.dir)
    if reuse and (done := finished_metrics(cfg)) is not None:
        say(f"compare: reusing finished run {run_dir}")
        return done
    if run_dir.exists() and (not reuse or not same_config(cfg)):
        shutil.rmtree(run_dir)  # a stale checkpoint must not be resumed into this run
    say(f"compare: training {run_dir}")
    train(cfg)
    done = finished_metrics(cfg)
    if done is None:
        raise RuntimeError(f"compare: run {run_dir} did not finish (see {run_dir / 'train.log'})")
    return done


def compare(cfg: Config, runs_dir: str | os.PathLike | None = None, reuse: bool = False,
            say: Say = print) -> list[CompareRow]:
    """Train (or reuse) the multi-task run and every single-task run, then write
    `compare.md` / `compare.csv` into `runs_dir` (default `<run.dir>/compare`), log a W&B
    table, print the table and return its rows (recipe task order)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("manytask compare runs in one process; start it without torchrun")
    out = Path(runs_dir) if runs_dir is not None else Path(cfg.run.dir) / "compare"
    mtl = run_or_reuse(multi_task_config(cfg, out / "mtl"), reuse, say)
    rows = []
    for task, spec in cfg.tasks.items():
        single = run_or_reuse(single_task_config(cfg, task, out / f"single_{safe_file_name(task)}"), reuse, say)
        metric = PRIMARY_METRIC[spec.type]
        key = f"val/{task}/{metric}"
        rows.append(CompareRow(task, metric, single[key], mtl[key], not HIGHER_IS_BETTER[metric]))
    write_tables(rows, out)
    log_to_wandb(rows, cfg, out)
    say(format_table(rows))
    say(f"written: {out / 'compare.md'}, {out / 'compare.csv'}")
    return rows


# --------------------------------------------------------------------------- output
COLUMNS = ["task", "metric", "single_task", "multi_task", "relative_pct"]


def table_rows(rows: list[CompareRow]) -> list[list[Any]]:
    return [[r.task, r.metric + (" ↓" if r.lower_is_better else " ↑"), r.single, r.multi, r.relative] for r in rows]


def format_table(rows: list[CompareRow]) -> str:
    """A Markdown table of the rows plus the Δm line."""
    lines = [
        "| task | metric | single-task | multi-task | Δ vs single (%) |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for task, metric, single, multi, rel in table_rows(rows):
        lines.append(f"| {task} | {metric} | {single:.4f} | {multi:.4f} | {rel:+.2f} |")
    lines.append("")
    lines.append(
        f"Δm = {delta_m(rows):+.2f}%  (mean sign-adjusted relative change of the multi-task model "
        f"over single-task baselines; > 0: multi-task better, a negative task row: negative transfer)"
    )
    return "\n".join(lines)


def write_tables(rows: list[CompareRow], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.md").write_text(format_table(rows) + "\n")
    with open(out / "compare.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow([*COLUMNS, "lower_is_better"])
        for r in rows:
            writer.writerow([r.task, r.metric, repr(r.single), repr(r.multi), repr(r.relative), int(r.lower_is_better)])
        writer.writerow(["delta_m", "", "", "", repr(delta_m(rows)), ""])


def log_to_wandb(rows: list[CompareRow], cfg: Config, out: Path) -> None:
    """A `compare` table and `compare/...` scalars in a run of their own (`<name>-compare`)."""
    data = cfg.to_dict()
    data["run"].update(dir=str(out), name=f"{cfg.run.name}-compare")
    data["logging"]["tags"] = [*cfg.logging.tags, "compare"]
    log_cfg = config_from_dict(data)
    logger = MetricsLogger(out, log_cfg, is_rank0=True)
    try:
        scalars = {f"compare/{r.task}/relative_pct": r.relative for r in rows}
        scalars["compare/delta_m"] = delta_m(rows)
        logger.log(cfg.trainer.max_steps, scalars)
        logger.log_table("compare", COLUMNS, [*table_rows(rows), ["Δm", "", None, None, delta_m(rows)]])
        logger.summary(scalars)
    finally:
        logger.finish()
