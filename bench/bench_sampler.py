"""The task sampler's per-step cost next to a training step.

Run: `.venv/bin/python -m bench.bench_sampler` (under a minute on 2 CPU cores).

Per step the trainer asks the sampler for the batch composition (`counts`) and feeds it the
agreed losses (`observe`); with an adaptive strategy the mixture is recomputed from the loss
signals, with floors and ceilings projected. Both are timed per strategy for 16 sources and
8 tasks (a large mix) and compared with one `train_step` of the demo recipe (demo model,
batch 256, one process). Goal: the sampler below 1% of the step.
"""

from __future__ import annotations

import math
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench.bench_trainer import MemoryBatches, demo_data, recipe
from manytask.config import SamplerConfig, SchedulePoint
from manytask.trainer.task_sampler import TaskSampler

SOURCES = [f"s{i}" for i in range(16)]
SIZES = [int(1000 * 1.6**i) for i in range(16)]
TASKS = [f"t{i}" for i in range(8)]
LABELS = {s: [TASKS[i % 8], TASKS[(i + 3) % 8]] for i, s in enumerate(SOURCES)}
CONFIGS = {
    "proportional": SamplerConfig(strategy="proportional"),
    "temperature + bounds": SamplerConfig(strategy="temperature", min_prob=0.01, max_prob=0.3),
    "loss_ratio + bounds": SamplerConfig(strategy="loss_ratio", base="temperature", update_every=10,
                                         min_prob=0.01, max_prob=0.3),
    "schedule (loss_ratio -> progress)": SamplerConfig(
        strategy="schedule", schedule=[SchedulePoint(0, strategy="loss_ratio"), SchedulePoint(10**6, strategy="progress")],
        min_prob=0.01, update_every=10),
}


def sampler_step_us(cfg: SamplerConfig, steps: int = 3000) -> float:
    """Median over rounds of the microseconds one step of `counts` + `observe` takes."""
    sampler = TaskSampler(SOURCES, SIZES, cfg, seed=0, max_steps=10**6, batch_size=256, source_tasks=LABELS)
    rounds = []
    for r in range(5):
        t = time.perf_counter()
        for s in range(r * steps, (r + 1) * steps):
            sampler.counts(s)
            sampler.observe(s + 1, {task: 1.0 / math.sqrt(s + 2 + i) for i, task in enumerate(TASKS)})
        rounds.append((time.perf_counter() - t) / steps * 1e6)
    return statistics.median(rounds)


def train_step_us(steps: int = 30) -> float:
    """Microseconds of one demo-recipe `train_step` on in-memory batches (one process)."""
    from manytask.config import load_config
    from manytask.trainer.loop import build_job, train_step

    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        data = demo_data(Path(tmp))
        cfg = load_config(recipe(Path(tmp), data, "sampler_bench"), ["weighting.name=equal", "run.resume=never"])
        job = build_job(cfg)
        try:
            batches = [job.data.next_batch([cfg.data.batch_size]) for _ in range(8)]
            job.data.close()
            job.data = MemoryBatches(batches)
            for s in range(5):
                train_step(job, s)  # warm-up
            rounds = []
            for _ in range(3):
                t = time.perf_counter()
                for s in range(steps):
                    train_step(job, s)
                rounds.append((time.perf_counter() - t) / steps * 1e6)
        finally:
            job.logger.finish()
            job.lock.release()
    return statistics.median(rounds)


def main() -> None:
    step = train_step_us()
    print(f"train_step (demo recipe, batch 256, 1 process): {step:9.1f} us")
    print(f"sampler per step, {len(SOURCES)} sources x {len(TASKS)} tasks (counts + observe):")
    for name, cfg in CONFIGS.items():
        us = sampler_step_us(cfg)
        print(f"  {name:<36} {us:8.1f} us  = {100 * us / step:5.2f}% of the step")


if __name__ == "__main__":
    main()
