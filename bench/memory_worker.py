"""One torchrun rank of the memory benchmark (bench_memory).

`torchrun --nproc-per-node=N -m bench.memory_worker RECIPE OUT.json STEPS [override ...]`

Every rank builds the job from RECIPE (the engine is the recipe's), trains STEPS steps through
the real `train_step`, then writes one checkpoint. Each rank records its peak resident memory
(`getrusage`'s ru_maxrss: the high-water mark since the process started, model construction
included) after building, after training and after the checkpoint, and on a GPU
`torch.cuda.max_memory_allocated`; rank 0 writes every rank's figures and the median step time
(steps after the first two) to OUT.json.
"""

from __future__ import annotations

import json
import resource
import statistics
import sys
import time
from pathlib import Path

import torch


def peak_rss_mib() -> float:
    """This process's peak resident set since it started, MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(recipe: str, out: str, steps: int, overrides: list[str]) -> None:
    from manytask.config import load_config
    from manytask.trainer import distributed as D
    from manytask.trainer.loop import build_job, save, train_step

    cfg = load_config(Path(recipe), ["run.resume=never", *overrides])
    job = build_job(cfg)
    try:
        built = peak_rss_mib()
        times = []
        for step in range(steps):
            D.barrier()
            start = time.perf_counter()
            train_step(job, step)
            times.append(time.perf_counter() - start)
            job.step = step + 1
        trained = peak_rss_mib()
        save(job)
        saved = peak_rss_mib()
        cuda = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
        params = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in job.engine.module.parameters())
        mine = {"built": built, "trained": trained, "saved": saved, "cuda": cuda,
                "step_s": statistics.median(times[2:] or times)}
        ranks = D.all_gather_object(mine)
        if job.info.is_rank0:
            Path(out).write_text(json.dumps({"params": params, "ranks": ranks}))
    finally:
        job.close()
    D.barrier()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:])
