"""`make validate`: the real-data recipes trained on this machine, each multi-task model against
single-task baselines and a trivial predictor, printed as Markdown tables.

Run: `.venv/bin/python -m bench.validate` (about 12 min on 2 CPU cores; `--scale 0.2` for a
quick look, `--only italy_power yeast` for some rows). Every run is a normal in-process
`train(cfg)` of the recipe in configs/ (W&B off, one evaluation at the end) under
`runs/validate/`; data come from `manytask data prepare` (skipped when already there).

- multi-task: the recipe as written.
- single-task: `manytask compare`'s baseline (trainer/compare.py: `single_task` with the
  recipe's encoder and the widths of one task's path through the multi-task model) trained on
  one task with the same data, steps, batch size, optimizer and seed. Time series use the recipe's `timeseries` model with one task instead, so both columns
  have the residual ("last value +") forecast head. Yeast: one binary run per label, the mean of
  the 14 label AUCs against the multilabel head's macro AUC.
- trivial: what a model that ignores the inputs gets: AUC 0.5, the training majority class,
  the MSE of the training mean (per output step for forecasts).
- MMoE study (synthetic_correlation): mean val MSE of the two tasks for shared-bottom, OMoE,
  MMoE and single-task at each task correlation.
- Raw tables (diamonds: string columns converted by `manytask shards write`'s column specs):
  multi-task, single-task and scikit-learn's HistGradientBoostingClassifier / Regressor (default
  settings, vocabulary ids as categorical features) fitted on the same training shards and
  scored on the same validation shards.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from manytask.config import Config, config_from_dict, load_config
from manytask.data_pipeline.prepare import prepare
from manytask.data_pipeline.real_data import CORRELATIONS
from manytask.data_pipeline.sources import model_inputs
from manytask.data_pipeline.validation import val_batches
from manytask.trainer import compare
from manytask.trainer.loop import train

PRIMARY = compare.PRIMARY_METRIC
OUT = Path("runs/validate")


@dataclass
class Study:
    """One table row group: a recipe, its data, how long to train, which baseline to run."""

    name: str
    recipe: str
    datasets: list[str]
    steps: int
    overrides: list[str] = field(default_factory=list)
    single: str | None = "single_task"  # baseline model; None = no single-task runs
    per_label: str | None = None  # a multilabel task whose labels run one by one as binaries


STUDIES = [
    Study("italy_power", "configs/timeseries_forecast_classify.yaml", ["italy_power"], 600, single="timeseries"),
    Study("yeast", "configs/multilabel.yaml", ["yeast"], 400, per_label="functions"),
    Study("movielens", "configs/recommender_mmoe.yaml", ["movielens"], 1500),
    Study("multidataset", "configs/multidataset_conditioning.yaml", ["multidataset"], 1000),
    Study("multidataset combine=add", "configs/multidataset_conditioning.yaml", ["multidataset"], 1000,
          overrides=["model.params.combine=add"], single=None),
    Study("multidataset combine=multiply", "configs/multidataset_conditioning.yaml", ["multidataset"], 1000,
          overrides=["model.params.combine=multiply"], single=None),
]
# Raw-table recipes compared with gradient boosting as well (their data: `manytask data prepare`).
TABULAR = [Study("diamonds", "configs/diamonds_mmoe.yaml", ["diamonds"], 3000)]
CORRELATION_STEPS = 800
CORRELATION_MODELS = {
    "shared-bottom": ["model={name: multi_head, params: {hidden: [113], tower_hidden: [8]}}"],
    "OMoE": ["model.name=omoe"],
    "MMoE": ["model.name=mmoe"],
}


def ensure_data(name: str) -> None:
    """`manytask data prepare NAME` unless data/NAME holds manifests already (some datasets
    are nested: data/NAME/<part>/{train,val}); its messages go to stderr, not the table."""
    if not any(Path("data", name).glob("**/manifest.json")):
        with contextlib.redirect_stdout(sys.stderr):
            prepare(name)


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def run_config(cfg: Config, tag: str) -> dict[str, float]:
    """Train `cfg` in this process (its own output silenced) and return the final val metrics."""
    start = time.perf_counter()
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
        val = train(cfg)
    log(f"  {tag}: {time.perf_counter() - start:.0f}s")
    return val


def study_config(recipe: str, steps: int, tag: str, overrides: list[str]) -> Config:
    return load_config(recipe, [
        *overrides, f"run.dir={OUT / tag}", "run.resume=never", f"trainer.max_steps={steps}",
        f"trainer.eval_every={steps}", f"checkpoint.every={steps}", "logging.wandb=false",
        "logging.progress=false", "logging.heatmap_every=0",
    ])


def single_task_config(cfg: Config, task: str, model: str | None, label_field: str | None = None) -> Config:
    """`cfg` cut down to one task by `manytask compare`'s builder, in `<run dir>-<task>`;
    model "single_task" (compare's baseline) or the recipe's own model with one task."""
    run_dir = Path(f"{cfg.run.dir}-{label_field or task}")
    return compare.single_task_config(cfg, task, run_dir, label_field, keep_model=model != "single_task")


def trivial_metrics(cfg: Config) -> dict[str, float]:
    """task -> the primary metric of a predictor that ignores the inputs (fit on train)."""
    d = cfg.to_dict()
    for source in d["data"]["sources"]:
        source["val"] = source["train"]  # read the training labels through the val reader
    train_view = config_from_dict(d)
    out = {}
    for task, tc in cfg.tasks.items():
        metric = PRIMARY[tc.type]
        if metric == "auc":
            out[task] = 0.5
            continue
        fit, held = _labels(train_view, task), _labels(cfg, task)
        if metric == "accuracy":  # multiclass: the training majority class
            majority = torch.bincount(fit.long().reshape(-1)).argmax()
            out[task] = float((held.long().reshape(-1) == majority).float().mean())
        else:  # mse of the training mean, per output dim
            out[task] = float((held.float() - fit.float().mean(0)).pow(2).mean())
    return out


def _labels(cfg: Config, task: str) -> torch.Tensor:
    parts = [b.labels[task][b.masks[task]] for b in val_batches(cfg, batch_size=4096)]
    return torch.cat([p for p in parts if len(p)])


def run_study(study: Study, scale: float) -> list[list[str]]:
    steps = max(10, int(study.steps * scale))
    log(f"{study.name} ({steps} steps)")
    cfg = study_config(study.recipe, steps, study.name.replace(" ", "_"), study.overrides)
    mtl = run_config(cfg, "multi-task")
    trivial = trivial_metrics(cfg)
    rows = []
    for task, tc in cfg.tasks.items():
        metric = PRIMARY[tc.type]
        single = math.nan
        if study.per_label == task:
            n_labels = next(b.labels[task].shape[1] for b in val_batches(cfg, batch_size=1))
            scores = []
            for j in range(n_labels):
                field_name = f"label_{j:02d}"
                val = run_config(single_task_config(cfg, task, "single_task", field_name), f"single {field_name}")
                scores.append(val[f"val/{field_name}/auc"])
            single = sum(scores) / len(scores)
            metric = "macro auc"
        elif study.single:
            val = run_config(single_task_config(cfg, task, study.single), f"single {task}")
            single = val[f"val/{task}/{PRIMARY[tc.type]}"]
        rows.append([study.name, f"{task} ({tc.type})", metric, _fmt(mtl[f"val/{task}/{PRIMARY[tc.type]}"]),
                     _fmt(single), _fmt(trivial[task])])
    return rows


def split_table(cfg: Config, split: str) -> tuple[np.ndarray, list[bool], dict[str, tuple[np.ndarray, np.ndarray]]]:
    """One source's split as a feature matrix [n, d] (fields flattened in recipe order), which
    columns are categorical ids, and task -> (labels [n], mask [n]), read through the loader."""
    d = cfg.to_dict()
    if split == "train":
        for source in d["data"]["sources"]:
            source["val"] = source["train"]
    view = config_from_dict(d)
    xs, labels = [], {t: ([], []) for t in cfg.tasks}
    inputs = cfg.data.sources[0].inputs
    for b in val_batches(view, batch_size=8192):
        xs.append(np.concatenate([b.inputs[f].reshape(len(b), -1).double().numpy() for f in inputs], 1))
        for t in cfg.tasks:
            labels[t][0].append(b.labels[t].reshape(len(b), -1)[:, 0].double().numpy())
            labels[t][1].append(b.masks[t].numpy())
    spec = model_inputs(cfg)
    categorical = [bool(spec[f].vocab) and spec[f].dtype.startswith("int")
                   for f in inputs for _ in range(int(np.prod(spec[f].shape)) if spec[f].shape else 1)]
    return np.concatenate(xs), categorical, {t: (np.concatenate(y), np.concatenate(m)) for t, (y, m) in labels.items()}


def gradient_boosting(cfg: Config) -> dict[str, float]:
    """task -> the primary val metric of scikit-learn's HistGradientBoosting on the same split."""
    from sklearn.ensemble import HistGradientBoostingClassifier, HistGradientBoostingRegressor
    from sklearn.metrics import mean_squared_error, roc_auc_score

    x_train, categorical, y_train = split_table(cfg, "train")
    x_val, _, y_val = split_table(cfg, "val")
    out = {}
    for task, tc in cfg.tasks.items():
        (yt, mt), (yv, mv) = y_train[task], y_val[task]
        if tc.type == "binary":
            model = HistGradientBoostingClassifier(categorical_features=categorical, random_state=0)
            model.fit(x_train[mt], yt[mt].astype(int))
            out[task] = float(roc_auc_score(yv[mv], model.predict_proba(x_val[mv])[:, 1]))
        elif tc.type == "regression":
            model = HistGradientBoostingRegressor(categorical_features=categorical, random_state=0)
            model.fit(x_train[mt], yt[mt])
            out[task] = float(mean_squared_error(yv[mv], model.predict(x_val[mv])))
    return out


def run_tabular_study(study: Study, scale: float) -> list[list[str]]:
    steps = max(10, int(study.steps * scale))
    log(f"{study.name} ({steps} steps; gradient boosting on the same split)")
    cfg = study_config(study.recipe, steps, study.name, study.overrides)
    mtl = run_config(cfg, "multi-task")
    start = time.perf_counter()
    boosted = gradient_boosting(cfg)
    log(f"  gradient boosting: {time.perf_counter() - start:.0f}s")
    trivial = trivial_metrics(cfg)
    rows = []
    for task, tc in cfg.tasks.items():
        metric = PRIMARY[tc.type]
        single = run_config(single_task_config(cfg, task, "single_task"), f"single {task}")[f"val/{task}/{metric}"]
        rows.append([study.name, f"{task} ({tc.type})", metric, _fmt(mtl[f"val/{task}/{metric}"]), _fmt(single),
                     _fmt(boosted.get(task, math.nan)), _fmt(trivial[task])])
    return rows


def run_correlation_study(scale: float) -> list[list[str]]:
    steps = max(10, int(CORRELATION_STEPS * scale))
    log(f"synthetic_correlation ({steps} steps per run)")
    rows = []
    single_a = math.nan  # task A is the same function at every correlation: train it once
    for c in CORRELATIONS:
        data = [f"data.sources.pair.train=data/synthetic_correlation/corr_{c}/train",
                f"data.sources.pair.val=data/synthetic_correlation/corr_{c}/val"]
        row = [f"{c}"]
        for label, overrides in CORRELATION_MODELS.items():
            cfg = study_config("configs/synthetic_correlation.yaml", steps, f"corr_{c}_{label}", data + overrides)
            val = run_config(cfg, f"corr {c} {label}")
            row.append(_fmt((val["val/regress_a/mse"] + val["val/regress_b/mse"]) / 2))
        base = study_config("configs/synthetic_correlation.yaml", steps, f"corr_{c}_single", data)
        if math.isnan(single_a):
            single_a = run_config(single_task_config(base, "regress_a", "single_task"), f"corr {c} single a")["val/regress_a/mse"]
        single_b = run_config(single_task_config(base, "regress_b", "single_task"), f"corr {c} single b")["val/regress_b/mse"]
        row.append(_fmt((single_a + single_b) / 2))
        rows.append(row)
    return rows


def _fmt(x: float) -> str:
    return "—" if x is None or math.isnan(x) else f"{x:.3f}"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    names = [s.name for s in STUDIES] + [s.name for s in TABULAR] + ["synthetic_correlation"]
    parser.add_argument("--only", nargs="*", default=None, help=f"some of: {', '.join(names)}")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every run's steps")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads; the recipes' models are small enough that more threads "
                             "mostly wait on each other (10x slower on a busy 2-core machine)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("WANDB_MODE", "offline")
    wanted = set(args.only or names)
    start = time.perf_counter()
    rows, skipped = [], []
    for study in STUDIES:
        if study.name not in wanted:
            continue
        try:
            for name in study.datasets:
                ensure_data(name)
        except FileNotFoundError as err:  # movielens needs pip to reach the package index
            skipped.append(f"{study.name}: {err}")
            continue
        rows += run_study(study, args.scale)
    print("## Real-data recipes (validation; MSE lower is better, AUC/accuracy higher)\n")
    print(table(["recipe", "task", "metric", "multi-task", "single-task", "trivial"], rows))
    tabular = []
    for study in TABULAR:
        if study.name not in wanted:
            continue
        try:
            for name in study.datasets:
                ensure_data(name)
        except FileNotFoundError as err:  # the table's wheel comes from the package index
            skipped.append(f"{study.name}: {err}")
            continue
        tabular += run_tabular_study(study, args.scale)
    if tabular:
        print("\n## Raw tables: the neural models vs gradient boosting on the same split\n")
        print(table(["recipe", "task", "metric", "multi-task", "single-task", "HistGradientBoosting", "trivial"],
                    tabular))
    if "synthetic_correlation" in wanted:
        ensure_data("synthetic_correlation")
        corr = run_correlation_study(args.scale)
        print("\n## MMoE synthetic study: mean val MSE of the two tasks (lower is better)\n")
        print(table(["task correlation", *CORRELATION_MODELS, "single-task"], corr))
    for line in skipped:
        print(f"\nskipped {line}")
    print(f"\n{time.perf_counter() - start:.0f}s on {torch.get_num_threads()} threads")
    return 0


if __name__ == "__main__":
    sys.exit(main())
