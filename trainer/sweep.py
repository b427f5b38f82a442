"""`manytask compare RECIPE --weightings equal,famo,... --seeds 3`: which loss weighting helps on
this data, honestly.

For every seed: the single-task baselines once, then the recipe's multi-task model once per
weighting (run.seed = seed, everything else as the recipe says). Always included: `equal`,
`rlw` (random weights: a method that does not beat it is not doing anything) and
`tuned_static`, fixed weights chosen from a small grid on validation (all 1; each task at 2
with the others at 1) by Δm with the first seed, then rerun with every seed.
Caveat printed with the table: the grid is chosen on the same validation split the table
reports, which favours `tuned_static` (there is no separate test split).

The table: per weighting, every task's primary validation metric and Δm against the
single-task baselines of the same seed, mean ± std over seeds. Written as `sweep.md` /
`sweep.csv` in `<run.dir>/sweep` (or `--runs-dir`).
"""

from __future__ import annotations

import csv
import math
import os
import statistics
from pathlib import Path

from manytask.config import Config, config_from_dict
from manytask.trainer.compare import (
    PRIMARY_METRIC,
    CompareRow,
    Say,
    delta_m,
    multi_task_config,
    run_or_reuse,
    single_task_config,
)
from manytask.trainer.evaluate import HIGHER_IS_BETTER
from manytask.trainer.logger import safe_file_name
from manytask.trainer.weightings import WEIGHTINGS, weighting_class

ALWAYS = ["equal", "rlw"]


def parse_weightings(text: str) -> list[str]:
    """`all` or a comma list of registry names (ConfigError naming the closest otherwise);
    `equal` and `rlw` are always added, `tuned_static` is added by the sweep."""
    names = list(WEIGHTINGS) if text.strip() == "all" else [n.strip() for n in text.split(",") if n.strip()]
    for name in names:
        weighting_class(name, "--weightings")
    return list(dict.fromkeys([*ALWAYS, *names]))


def with_weighting(cfg: Config, name: str, params: dict, seed: int, run_dir: Path) -> Config:
    data = cfg.to_dict()
    data["weighting"] = {"name": name, "params": params}
    data["run"]["seed"] = seed
    return multi_task_config(config_from_dict(data), run_dir)


def static_grid(tasks: list[str]) -> list[dict[str, float]]:
    """All 1, then each task at 2 with the others at 1 (T + 1 runs: the grid stays small when
    the recipe has many tasks; halving one task is doubling all the others, up to the LR)."""
    return [{t: 1.0 for t in tasks}] + [{t: (2.0 if t == u else 1.0) for t in tasks} for u in tasks]


def rows_of(cfg: Config, single: dict[str, dict[str, float]], multi: dict[str, float]) -> list[CompareRow]:
    out = []
    for task, spec in cfg.tasks.items():
        metric = PRIMARY_METRIC[spec.type]
        key = f"val/{task}/{metric}"
        out.append(CompareRow(task, metric, single[task][key], multi[key], not HIGHER_IS_BETTER[metric]))
    return out


def sweep(cfg: Config, weightings: list[str], seeds: int, runs_dir: str | os.PathLike | None = None,
          reuse: bool = False, say: Say = print) -> dict[str, list[list[CompareRow]]]:
    """Train (or reuse) every run and write the tables; returns weighting -> per-seed rows."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("manytask compare runs in one process; start it without torchrun")
    out = Path(runs_dir) if runs_dir is not None else Path(cfg.run.dir) / "sweep"
    base = cfg.run.seed
    singles = []
    for k in range(seeds):
        data = cfg.to_dict()
        data["run"]["seed"] = base + k
        seeded = config_from_dict(data)
        singles.append({
            t: run_or_reuse(single_task_config(seeded, t, out / f"seed{k}" / f"single_{safe_file_name(t)}"), reuse, say)
            for t in cfg.tasks
        })
    # tuned_static: the grid point with the best Δm at the first seed.
    best, best_dm = None, -math.inf
    for i, weights in enumerate(static_grid(list(cfg.tasks))):
        run = with_weighting(cfg, "static", {"weights": weights}, base, out / "seed0" / f"static_grid{i}")
        dm = delta_m(rows_of(cfg, singles[0], run_or_reuse(run, reuse, say)))
        if dm > best_dm:
            best, best_dm = weights, dm
    say(f"compare: tuned_static picked {best} (Δm {best_dm:+.2f}% on validation, seed {base})")
    results: dict[str, list[list[CompareRow]]] = {}
    for name in [*weightings, "tuned_static"]:
        method, params = ("static", {"weights": best}) if name == "tuned_static" else (name, {})
        results[name] = []
        for k in range(seeds):
            run = with_weighting(cfg, method, params, base + k, out / f"seed{k}" / name)
            results[name].append(rows_of(cfg, singles[k], run_or_reuse(run, reuse, say)))
    table = format_sweep(results, list(cfg.tasks), best)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.md").write_text(table + "\n")
    write_csv(results, out / "sweep.csv")
    say(table)
    say(f"written: {out / 'sweep.md'}, {out / 'sweep.csv'}")
    return results


def mean_std(values: list[float]) -> str:
    if not values or any(math.isnan(v) for v in values):
        return "nan"
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.4f} ± {std:.4f}"


def format_sweep(results: dict[str, list[list[CompareRow]]], tasks: list[str], static: dict | None) -> str:
    """Markdown: one row per weighting, each task's metric and Δm (%), mean ± std over seeds,
    sorted by mean Δm; the single-task baseline first."""
    first = next(iter(results.values()))
    seeds = len(first)
    heads = [f"{r.task} {r.metric} {'↓' if r.lower_is_better else '↑'}" for r in first[0]]
    lines = [f"| weighting | {' | '.join(heads)} | Δm (%) |", "| --- |" + " ---: |" * (len(heads) + 1)]
    singles = [mean_std([rows[i].single for rows in first]) for i in range(len(tasks))]
    lines.append(f"| single-task | {' | '.join(singles)} | 0 |")

    def dm_of(name: str) -> list[float]:
        return [delta_m(rows) for rows in results[name]]

    for name in sorted(results, key=lambda n: -statistics.fmean(dm_of(n))):
        cells = [mean_std([rows[i].multi for rows in results[name]]) for i in range(len(tasks))]
        dms = dm_of(name)
        dm = f"{statistics.fmean(dms):+.2f} ± {statistics.stdev(dms) if len(dms) > 1 else 0.0:.2f}"
        lines.append(f"| {name} | {' | '.join(cells)} | {dm} |")
    lines.append("")
    lines.append(
        f"{seeds} seed(s); Δm against the single-task runs of the same seed (> 0: multi-task better). "
        f"tuned_static = static weights {static}, picked from a {len(tasks) + 1}-point grid by Δm on the "
        f"validation split this table reports (so it is favoured)."
    )
    return "\n".join(lines)


def write_csv(results: dict[str, list[list[CompareRow]]], path: Path) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["weighting", "seed", "task", "metric", "single_task", "multi_task", "relative_pct"])
        for name, per_seed in results.items():
            for k, rows in enumerate(per_seed):
                for r in rows:
                    writer.writerow([name, k, r.task, r.metric, repr(r.single), repr(r.multi), repr(r.relative)])
                writer.writerow([name, k, "delta_m", "", "", "", repr(delta_m(rows))])
