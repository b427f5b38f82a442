"""Task-mixing strategies compared on a skewed mix at the same budget (README "Task mixing").

Run: `.venv/bin/python -m bench.compare_mixing [--steps 400] [--seeds 0 1]` (single process,
CPU; a few minutes per strategy and seed). It prepares `configs/skewed_mix.yaml`'s data
(one source of 40k samples, three of 2k / 1k / 500) in a temporary directory, trains the
recipe once per strategy with everything else equal — same model, seed, steps and batch —
and prints each task's primary validation metric (MSE for regression, AUC for binary) and
Δm against `proportional` (trainer.compare's definition: the mean of every task's
sign-adjusted relative change, in percent; positive = better than proportional).
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
from pathlib import Path

from manytask.config import load_config
from manytask.data_pipeline.synthetic import SKEWED_MIX, prepare_skewed_mix
from manytask.trainer.compare import PRIMARY_METRIC, CompareRow, delta_m
from manytask.trainer.evaluate import HIGHER_IS_BETTER
from manytask.trainer.loop import train

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs" / "skewed_mix.yaml"
BASELINE = "proportional"
# strategy -> sampler overrides; the adaptive ones start from the temperature mixture
STRATEGIES = {
    "proportional": ["sampler.strategy=proportional"],
    "temperature": ["sampler.strategy=temperature"],
    "loss_ratio": ["sampler.strategy=loss_ratio"],
    "progress": ["sampler.strategy=progress"],
}


def run(strategy: str, seed: int, steps: int, data: Path, runs: Path) -> dict[str, float]:
    """Final validation metrics of one training run of the recipe with `strategy`."""
    overrides = [
        *STRATEGIES[strategy], f"run.seed={seed}", f"trainer.max_steps={steps}", f"trainer.eval_every={steps}",
        f"run.dir={runs / f'{strategy}_seed{seed}'}", "run.resume=never", "logging.wandb=false",
        "logging.progress=false", f"checkpoint.every={steps}",
    ]
    for source in SKEWED_MIX:
        overrides += [f"data.sources.{source}.train={data / source / 'train'}",
                      f"data.sources.{source}.val={data / source / 'val'}"]
    return train(load_config(RECIPE, overrides))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    args = parser.parse_args()
    cfg = load_config(RECIPE)
    primary = {task: PRIMARY_METRIC[spec.type] for task, spec in cfg.tasks.items()}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        prepare_skewed_mix(data)
        results: dict[str, dict[str, float]] = {}  # strategy -> task -> metric (mean over seeds)
        for strategy in STRATEGIES:
            per_seed = [run(strategy, seed, args.steps, data, Path(tmp) / "runs") for seed in args.seeds]
            results[strategy] = {t: statistics.fmean(m[f"val/{t}/{primary[t]}"] for m in per_seed) for t in primary}
    tasks = list(primary)
    print(f"\nskewed_mix, {args.steps} steps x batch {cfg.data.batch_size}, seeds {args.seeds} "
          f"(mean); sizes {SKEWED_MIX}")
    print("| strategy | " + " | ".join(f"{t} ({primary[t]})" for t in tasks) + " | Δm vs proportional |")
    print("|---" * (len(tasks) + 2) + "|")
    for strategy, metrics in results.items():
        rows = [CompareRow(t, primary[t], results[BASELINE][t], metrics[t], not HIGHER_IS_BETTER[primary[t]])
                for t in tasks]
        dm = delta_m(rows)
        cells = " | ".join(f"{metrics[t]:.4f}" for t in tasks)
        print(f"| {strategy} | {cells} | {'—' if strategy == BASELINE else f'{dm:+.2f}%' if math.isfinite(dm) else 'nan'} |")


if __name__ == "__main__":
    main()
