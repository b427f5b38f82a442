"""One torchrun rank of the DDP scaling benchmark (bench_trainer, item 2).

`torchrun --nproc-per-node=N -m bench.ddp_worker RECIPE OUT.json ROUNDS STEPS`

Every rank builds the job from RECIPE (1 rank: the single engine; 2 ranks: DDP over gloo), then
alternates ROUNDS times between
  - manytask: STEPS calls of `train_step` on the real loader (shards decoded in the step), and
  - bare: STEPS steps of a minimal DDP loop (a second copy of the same model wrapped in
    DistributedDataParallel when N > 1, AdamW, summed masked losses) on in-memory batches,
so that load drift on the machine hits both alike. Rank 0 writes the median samples/s (over
all ranks) of each to OUT.json.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn


def main(recipe: str, out: str, rounds: int, steps: int) -> None:
    from bench.bench_trainer import MemoryBatches
    from manytask.config import load_config
    from manytask.models import build_model
    from manytask.models.losses import task_losses
    from manytask.trainer import distributed as D
    from manytask.trainer.engines import optimizer_impl
    from manytask.trainer.loop import build_job, train_step
    from manytask.trainer.specs import build_model_spec

    cfg = load_config(Path(recipe), ["run.resume=never"])
    job = build_job(cfg)
    world, batch = job.info.world_size, cfg.data.batch_size

    torch.manual_seed(0)
    bare_module = build_model(cfg.model, build_model_spec(cfg)[1])
    bare = nn.parallel.DistributedDataParallel(bare_module) if world > 1 else bare_module
    bare_params = list(bare_module.parameters())
    bare_opt = torch.optim.AdamW(bare_params, lr=cfg.trainer.lr, **optimizer_impl(bare_params))
    batches = [job.data.next_batch([batch]) for _ in range(8)]

    def bare_step(b) -> None:
        out = bare(b.inputs, b.source_id)
        loss = sum(task_losses(out.outputs, b.labels, b.masks, job.specs).values())
        loss.backward()
        bare_opt.step()
        bare_opt.zero_grad(set_to_none=True)

    step = 0

    def time_ours() -> float:
        nonlocal step
        D.barrier()
        t = time.perf_counter()
        for _ in range(steps):
            train_step(job, step)
            step += 1
        return world * batch * steps / (time.perf_counter() - t)

    def time_bare() -> float:
        D.barrier()
        t = time.perf_counter()
        for s in range(steps):
            bare_step(batches[s % len(batches)])
        return world * batch * steps / (time.perf_counter() - t)

    loader = job.data

    def time_ours_memory() -> float:  # the same step on in-memory batches: framework cost alone
        job.data = MemoryBatches(batches)
        try:
            return time_ours()
        finally:
            job.data = loader

    time_ours(), time_bare(), time_ours_memory()  # warm-up: allocator, DDP buckets, first shard reads
    ours, plain, memory = [], [], []
    for _ in range(rounds):
        ours.append(time_ours())
        plain.append(time_bare())
        memory.append(time_ours_memory())
    if job.info.is_rank0:
        result = {"ours": statistics.median(ours), "bare": statistics.median(plain),
                  "ours_memory": statistics.median(memory)}
        Path(out).write_text(json.dumps(result))
    loader.close()
    job.logger.finish()
    D.barrier()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
