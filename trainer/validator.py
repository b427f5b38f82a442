"""The validator: when the training loop evaluates, and the evaluation itself.

Owns its schedule like torchtitan's validator (`should_validate(step)`): every
`trainer.eval_every` steps and at the last step, decided from the step and the recipe alone, so
every rank agrees (`run` is collective: the metrics are reduced over ranks).
"""

from __future__ import annotations

from typing import Any

from manytask.data_pipeline.validation import val_batches
from manytask.trainer.evaluate import evaluate


class Validator:
    """`should_validate(step, last_step)` and `run(job)` -> `{"val/<task>/<metric>": ...}`."""

    def __init__(self, every: int):
        self.every = every

    def should_validate(self, step: int, last_step: bool = False) -> bool:
        return last_step or step % self.every == 0

    def run(self, job: Any) -> dict[str, float]:
        """The whole validation split (this rank's share), metrics identical on every rank.
        Engines whose forwards gather parameters (ZeRO-3, FSDP) set `lockstep_eval`: every
        rank then makes the same number of forwards."""
        cfg, info = job.cfg, job.info
        batches = val_batches(cfg, info.rank, info.world_size, cfg.data.val_batch_size)
        return evaluate(job.engine.module, batches, job.specs, cfg, info.device, lockstep=job.engine.lockstep_eval)
