"""The training job: build every part from the recipe, then run the step loop.

`train(cfg)` is what `manytask train` and every torchrun rank call. The step itself
(`train_step`) reads top to bottom: sampler picks how many samples of each source, one routed
forward, masked per-task losses, one all-reduce of what all ranks must agree on, loss
weighting, one backward, one optimizer step. Around it, each part decides its own timing
(as torchtitan's trainer does): `logger.should_log`, `affinity.should_run`,
`validator.should_validate`, `logger.should_log_gate_heatmap`, `ckpt.should_save` — from
the step and the recipe alone, plus the agreed stop flag, so every rank decides the same.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from manytask.config import Config
from manytask.data_pipeline.loader import MultiSourceLoader
from manytask.data_pipeline.sources import source_sizes
from manytask.models import build_model
from manytask.models.losses import task_losses
from manytask.models.spec import TaskSpec
from manytask.trainer import distributed as D
from manytask.trainer.checkpoint import Checkpointer, check_compatible
from manytask.trainer.engines import (
    autocast,
    build_engine,
    model_construction,
    restart_schedule,
)
from manytask.trainer.finetune import prepare_finetune
from manytask.trainer.logger import MetricsLogger
from manytask.trainer.memory import keep_freed_memory
from manytask.trainer.model_io import write_model_spec
from manytask.trainer.monitor import (
    GateHealth,
    TaskAffinity,
    gate_experts_of,
    gate_means_from_metrics,
    log_affinity_heatmap,
)
from manytask.trainer.preemption import PreemptionFlag
from manytask.trainer.progress import Progress
from manytask.trainer.recipe_changes import SCHEDULE_KEYS, check_resume_changes
from manytask.trainer.run_dir import RunDir
from manytask.trainer.run_lock import RunLock, RunLocked
from manytask.trainer.specs import build_model_spec
from manytask.trainer.task_sampler import TaskSampler
from manytask.trainer.validator import Validator
from manytask.trainer.weightings import build_weighting
from manytask.trainer.weightings.base import WeightingContext


class NonFiniteLossError(RuntimeError):
    """Raised when `trainer.on_nonfinite: stop` and a step's loss is NaN or infinite."""


@dataclass
class StepResult:
    losses: dict[str, float]  # mean loss per task over all ranks (nan when absent everywhere)
    counts: dict[str, int]  # labelled samples per task over all ranks
    weights: dict[str, float]
    total: float
    skipped: bool
    stop_requested: bool
    samples: int = 0  # samples this rank trained on in this step (all micro-batches)
    out: Any = None  # last micro-batch's ModelOutput (gate statistics)


@dataclass
class Job:
    cfg: Config
    info: D.DistInfo
    run: RunDir
    lock: RunLock
    specs: dict[str, TaskSpec]
    data: MultiSourceLoader
    sampler: TaskSampler
    engine: Any
    weighting: Any
    weighting_opt: torch.optim.Optimizer | None
    logger: MetricsLogger | None  # None for a run that is already finished
    ckpt: Checkpointer
    preempt: PreemptionFlag
    affinity: TaskAffinity
    gate_health: GateHealth
    validator: Validator
    step: int = 0
    samples_per_task: dict[str, int] = field(default_factory=dict)
    nonfinite_steps: int = 0
    wandb_run_id: str | None = None
    last_shared_layer: list = field(default_factory=list)  # the model's last shared layer (GradNorm)
    shared_params: list = field(default_factory=list)  # every trainable shared parameter (gradient methods)
    model_spec: Any = None  # what the model was built from (written to the run dir for loading)

    @property
    def tasks(self) -> list[str]:
        return list(self.specs)

    def close(self) -> None:
        """Give back what the job holds: signal handlers, W&B, stream workers, the run lock."""
        self.preempt.uninstall()
        if self.logger is not None:
            self.logger.finish()
        self.data.close()
        self.lock.release()


@dataclass
class Tally:
    """What one rank counts in a micro-batch, for every rank to sum: labelled samples and loss
    sums per task, and whether this rank was asked to stop. Sent as one float64 vector
    (`pack`), so under DDP it rides in the gradient all-reduce (distributed.PiggybackSum)."""

    counts: torch.Tensor  # [T] labelled samples per task
    loss_sums: torch.Tensor  # [T] count × mean loss per task (NaN/inf propagate)
    stop: torch.Tensor  # [] 1.0 if a preemption signal arrived

    @classmethod
    def of(cls, counts: list[int], losses: list[torch.Tensor], stop: bool, device: torch.device) -> Tally:
        n = torch.tensor(counts, dtype=torch.float64, device=device)
        return cls(n, torch.stack([x.detach() for x in losses]).double() * n, torch.tensor(float(stop), dtype=torch.float64, device=device))

    def pack(self) -> torch.Tensor:
        return torch.cat([self.counts, self.loss_sums, self.stop.reshape(1)])

    @classmethod
    def unpack(cls, flat: torch.Tensor, tasks: int) -> Tally:
        return cls(flat[:tasks], flat[tasks : 2 * tasks], flat[2 * tasks])

    def __add__(self, other: Tally) -> Tally:
        return Tally(self.counts + other.counts, self.loss_sums + other.loss_sums, self.stop + other.stop)


@dataclass
class Agreed:
    """What every rank agrees on for a step, summed over ranks and micro-batches: labelled
    samples and loss sums per task, a stop request, whether any loss was non-finite."""

    count: list[float]
    loss_sum: list[float]
    stop: bool = False
    nonfinite: bool = False

    def add(self, summed: Tally) -> None:
        """Fold in a tally summed over ranks."""
        sums = summed.loss_sums.tolist()
        self.count = [a + b for a, b in zip(self.count, summed.counts.tolist())]
        self.loss_sum = [a + b for a, b in zip(self.loss_sum, sums)]
        self.stop |= float(summed.stop) > 0
        # a NaN or inf on any rank stays non-finite in the sum (and reached every gradient)
        self.nonfinite |= not all(map(math.isfinite, sums))

    def losses(self, tasks: list[str]) -> dict[str, float]:
        """Mean loss per task over all ranks (NaN when no rank had a label)."""
        return {t: s / c if c > 0 else math.nan for t, s, c in zip(tasks, self.loss_sum, self.count)}


def train_step(job: Job, step: int) -> StepResult:
    cfg, info, engine, tasks = job.cfg, job.info, job.engine, job.tasks
    counts_per_source = job.sampler.counts(step)
    accum = cfg.trainer.grad_accum
    agreed = Agreed([0.0] * len(tasks), [0.0] * len(tasks))
    weights, total, tally, pending = {}, None, None, None
    # DeepSpeed must not run backward on a non-finite loss, so it agrees on each micro-batch
    # before its backward; the torch engines agree once per step, during the last backward
    # (under DDP inside the gradient all-reduce itself: one collective per step).
    agree_first = engine.kind == "deepspeed"
    for micro in range(accum):
        last = micro == accum - 1
        batch = job.data.next_batch(counts_per_source)
        # Labelled samples per task, counted on the host before the batch moves to the device.
        n = torch.stack([batch.masks[t] for t in tasks]).sum(1).tolist()
        batch = batch.to(info.device, non_blocking=True)
        with engine.accumulating(last=last):
            with autocast(cfg, info):
                out = engine.model(batch.inputs, batch.source_id)
                losses = task_losses(out.outputs, batch.labels, batch.masks, job.specs)
            mine = Tally.of(n, [losses[t] for t in tasks], job.preempt.requested, info.device)
            if agree_first:
                agreed.add(Tally.unpack(engine.agree(mine.pack()).result(), len(tasks)))
            else:
                tally = mine if tally is None else tally + mine
                if last:
                    pending = engine.agree(tally.pack())
            if not agreed.nonfinite:
                total, weights = job.weighting.combine(losses, weighting_context(job, step, out, dict(zip(tasks, n))))
                if out.aux_losses:
                    total = total + sum(out.aux_losses.values())
                engine.backward(total)
    if pending is not None:
        agreed.add(Tally.unpack(pending.result(), len(tasks)))
    if agreed.nonfinite:
        engine.skip_step()
        if job.weighting_opt is not None:
            job.weighting_opt.zero_grad(set_to_none=True)
    else:
        job.weighting.before_step()  # gradient surgery (pcgrad, db_mtl) rewrites shared gradients here
        engine.step([t for t, c in zip(tasks, agreed.count) if c == 0])
        if job.weighting_opt is not None:
            sync_weighting_grads(job)
            job.weighting_opt.step()
            job.weighting_opt.zero_grad(set_to_none=True)
    return StepResult(
        losses=agreed.losses(tasks),
        counts={t: int(c) for t, c in zip(tasks, agreed.count)},
        weights=weights,
        total=float(total.detach()) if not agreed.nonfinite and total is not None else math.nan,
        skipped=agreed.nonfinite,
        stop_requested=agreed.stop,
        samples=sum(counts_per_source) * accum,
        out=out,
    )


def weighting_context(job: Job, step: int, out: Any, local_counts: dict[str, int]) -> WeightingContext:
    """What the weighting may use this micro-batch. Presence is left to the weighting: those
    that need it agree on it in their own collective."""
    return WeightingContext(
        step=step,
        representation=out.shared,
        last_shared_layer=job.last_shared_layer,
        shared_params=job.shared_params,
        all_reduce_mean=D.all_reduce_mean,
        local_counts=local_counts,
        seed=job.cfg.run.seed,
        sharding=getattr(job.engine, "sharding", None),  # ZeRO-3's partitioned gradients
    )


def sync_weighting_grads(job: Job) -> None:
    """Learnable loss weights live outside DDP/DeepSpeed: average their grads by hand."""
    for p in job.weighting.parameters():
        if p.grad is not None:
            p.grad.copy_(D.all_reduce_mean(p.grad))


def gate_metrics(out: Any) -> dict[str, float]:
    """Gate utilization of this step averaged over all ranks (a collective on every rank)."""
    if out is None or not out.gate_means:
        return {}
    keys = sorted(out.gate_means)
    flat = torch.cat([torch.cat([out.gate_means[k].float().reshape(-1), out.gate_entropy[k].float().reshape(1)]) for k in keys])
    flat = D.all_reduce_mean(flat.detach()).cpu()
    metrics, offset = {}, 0
    for k in keys:
        experts = out.gate_means[k].numel()
        for e in range(experts):
            metrics[f"gates/{k}/expert_{e}"] = float(flat[offset + e])
        metrics[f"gates/{k}/entropy"] = float(flat[offset + experts])
        offset += experts + 1
    return metrics


# --------------------------------------------------------------------------- set-up
def build_job(cfg: Config) -> Job:
    keep_freed_memory(cfg.engine.name)  # before the first big allocation: no per-step page faults on CPU
    info = D.init_distributed(cfg.engine.backend, deepspeed=cfg.engine.name == "deepspeed")
    D.seed_everything(cfg.run.seed, info.rank)
    run = RunDir(cfg, info)
    lock = hold_run_dir(run, cfg, info)
    job = None
    try:
        job = _build_parts(cfg, info, run, lock)
        register_state(job)
        restore(job)
        if job.step < cfg.trainer.max_steps:  # a finished run started again logs nothing, not even to W&B
            job.logger = MetricsLogger(run.path, cfg, info.is_rank0, resume_step=job.step, run_id=job.wandb_run_id)
            job.wandb_run_id = job.logger.run_id
    except BaseException:
        if job is not None:
            job.close()
        else:
            lock.release()
        raise
    return job


def hold_run_dir(run: RunDir, cfg: Config, info: D.DistInfo) -> RunLock:
    """Rank 0 takes the run directory's lock (every rank raises RunLocked if another job has it)."""
    lock = RunLock(run.path, cfg.run.lock_lease)
    refused = None
    if info.is_rank0:
        with run.warnings_said():  # a stale lock taken over
            try:
                lock.acquire()
            except RunLocked as err:
                refused = str(err)
    refused = D.broadcast_object(refused)
    if refused:
        raise RunLocked(refused)
    return lock


def _build_parts(cfg: Config, info: D.DistInfo, run: RunDir, lock: RunLock) -> Job:
    specs, model_spec = build_model_spec(cfg)
    with model_construction(cfg, info):  # ZeRO-3: each rank holds only its partition
        model = build_model(cfg.model, model_spec)
    frozen = prepare_finetune(cfg, model, run.say)  # run.init_from weights, trainer.freeze
    weighting = build_weighting(cfg.weighting, cfg.tasks).to(info.device)
    learnable = [p for p in weighting.parameters() if p.requires_grad]
    weighting_opt = torch.optim.Adam(learnable, lr=cfg.trainer.lr) if learnable else None
    engine = build_engine(cfg, model, info)
    frozen.attach(engine)
    data = MultiSourceLoader(cfg, info.rank, info.world_size, cfg.run.seed)
    sampler = TaskSampler(
        [s.name for s in cfg.data.sources], source_sizes(cfg), cfg.sampler, cfg.run.seed,
        cfg.trainer.max_steps, cfg.data.batch_size, {s.name: list(s.labels) for s in cfg.data.sources},
    )
    return Job(
        cfg=cfg, info=info, run=run, lock=lock, specs=specs, data=data, sampler=sampler, engine=engine,
        weighting=weighting, weighting_opt=weighting_opt, logger=None,  # type: ignore[arg-type]
        ckpt=Checkpointer(run.ckpt, info, cfg.checkpoint.keep_last, every=cfg.checkpoint.every),
        preempt=PreemptionFlag().install(),
        affinity=TaskAffinity(cfg.monitor, list(specs)),
        gate_health=GateHealth(cfg.monitor, gate_experts_of(engine.module)),
        validator=Validator(cfg.trainer.eval_every),
        samples_per_task={t: 0 for t in specs}, last_shared_layer=list(engine.module.last_shared_parameters()),
        shared_params=[p for p in engine.module.shared_parameters() if p.requires_grad],
        model_spec=model_spec,
    )


# --------------------------------------------------------------------------- state
class TrainCounters:
    """The job's own counters as a checkpoint part: step, samples per task, skipped steps and
    the W&B run id (reused on resume so the W&B run continues)."""

    def __init__(self, job: Job):
        self.job = job

    def state_dict(self) -> dict[str, Any]:
        job = self.job
        return {"step": job.step, "samples_per_task": dict(job.samples_per_task),
                "nonfinite_steps": job.nonfinite_steps, "wandb_run_id": job.wandb_run_id}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        job = self.job
        job.step = int(state["step"])
        job.samples_per_task = dict(state["samples_per_task"])
        job.nonfinite_steps = int(state["nonfinite_steps"])
        job.wandb_run_id = state.get("wandb_run_id")


class RNGStates:
    """This rank's python / numpy / torch RNG states as a checkpoint part."""

    def state_dict(self) -> dict[str, Any]:
        return D.rng_state()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        D.load_rng_state(state)


def register_state(job: Job) -> None:
    """Every stateful part of the job, registered once by name with the checkpointer."""
    ckpt = job.ckpt
    ckpt.header = {"config": job.cfg.to_dict(), "tasks": job.tasks}
    ckpt.register("engine", job.engine, must_be_finite=True)  # model, optimizer, LR schedule
    ckpt.register("sampler", job.sampler)
    ckpt.register("weighting", job.weighting, must_be_finite=True)
    if job.weighting_opt is not None:
        ckpt.register("weighting_opt", job.weighting_opt, must_be_finite=True)
    ckpt.register("affinity", job.affinity)
    ckpt.register("gate_health", job.gate_health)
    ckpt.register("train", TrainCounters(job))
    ckpt.register("stream", job.data, per_rank=True)
    # A new world size re-seeds the RNGs (README: "A different world size on resume").
    ckpt.register("rng", RNGStates(), per_rank=True, same_world_only=True)


def save(job: Job) -> None:
    path = job.ckpt.save(job.step)
    if path is not None:
        job.run.say(f"checkpoint step {job.step} -> {path}")


def restore(job: Job) -> None:
    """Resume from the checkpoint `run.resume` names, if any, then record what runs.

    The recipe is compared with the checkpoint's first: a difference a resume cannot apply
    is refused (ResumeRefused, every rank) before any file is written; the ones it can
    (`recipe_changes.APPLIED_ON_RESUME`) are announced, the LR schedule follows the new
    recipe from the resumed step on, and `config.yaml` / `config_history.jsonl` record them.
    """
    with job.run.warnings_said():  # a damaged checkpoint passed over, naming the file
        path = job.ckpt.resolve(job.cfg.run.resume)
    changes: dict[str, tuple[Any, Any]] = {}
    if path is not None:
        loaded = job.ckpt.load(path)
        changes = check_resume_changes(loaded.common.get("config", {}), job.cfg.to_dict(), str(path))
        check_compatible(loaded.common, job.tasks, job.engine.module.state_dict(), path)
        job.ckpt.restore(loaded)
        if changes.keys() & SCHEDULE_KEYS:
            restart_schedule(job.engine.scheduler, job.cfg.trainer.lr)
            if job.weighting_opt is not None:
                for group in job.weighting_opt.param_groups:
                    group["lr"] = job.cfg.trainer.lr
        job.run.say(f"resumed from {path} at step {job.step}")
        for key, (old, new) in changes.items():
            job.run.say(f"  recipe change applied from step {job.step}: {key}: {old!r} -> {new!r}")
    job.run.record_config(job.cfg, job.step, path, changes)
    write_model_spec(job.run.path, job.model_spec, job.info.is_rank0)  # a loaded model needs no shards


# --------------------------------------------------------------------------- loop
def train(cfg: Config) -> dict[str, float]:
    """Run (or resume) the recipe to `trainer.max_steps`; returns the final validation metrics."""
    job = build_job(cfg)
    t = cfg.trainer
    try:
        if job.step >= t.max_steps:
            job.run.say(f"run {job.run.path} already finished: it is at step {job.step}, trainer.max_steps is "
                        f"{t.max_steps}; nothing to train (raise trainer.max_steps to continue it)")
            return {}
        if job.step == 0:
            job.logger.log(0, job.validator.run(job))
        progress = Progress(job.info.is_rank0 and cfg.logging.progress, job.step, t.max_steps)
        rate = SampleRate()
        val: dict[str, float] = {}
        while job.step < t.max_steps:
            result = train_step(job, job.step)
            job.step += 1
            last = job.step == t.max_steps
            account(job, result)
            rate.add(result.samples * job.info.world_size)
            metrics: dict[str, float] = {}
            if job.logger.should_log(job.step, last_step=last):
                metrics.update(log_metrics(job, result, rate.take()))
                progress.update(job.step, result.losses, metrics["perf/samples_per_s"])
            if job.affinity.should_run(job.step):
                metrics.update(job.affinity.measure(job, job.step))
            if job.validator.should_validate(job.step, last_step=last):
                val = job.validator.run(job)
                job.sampler.observe_eval(job.step, val)  # val_loss_ratio mixing
                metrics.update(val)
            if metrics:
                job.logger.log(job.step, metrics)
            if job.logger.should_log_gate_heatmap(job.step):
                log_gate_heatmap(job, metrics)
            if job.affinity.should_run(job.step):
                log_affinity_heatmap(job, metrics)
            if result.stop_requested:  # agreed by every rank in the step's collective
                job.run.say(f"preemption signal: stopping at step {job.step}")
                save(job)
                return val
            if job.ckpt.should_save(job.step, last_step=last):
                save(job)
        summarize(job, val)
        return val
    finally:
        job.close()


def account(job: Job, result: StepResult) -> None:
    """Fold a finished step into the job: adaptive mixing sees the agreed losses, the
    per-task sample counters grow, and a skipped (non-finite) step is counted, announced,
    and raises NonFiniteLossError past `trainer.on_nonfinite` / `trainer.max_nonfinite`."""
    t = job.cfg.trainer
    job.sampler.observe(job.step, result.losses)
    for task, n in result.counts.items():
        job.samples_per_task[task] += n
    if not result.skipped:
        return
    job.nonfinite_steps += 1
    job.run.say(f"step {job.step}: non-finite loss, step skipped ({nonfinite_tasks(result)}; "
                f"{job.nonfinite_steps} so far)")
    if t.on_nonfinite == "stop" or job.nonfinite_steps > t.max_nonfinite:
        raise NonFiniteLossError(
            f"non-finite loss at step {job.step} (per-task losses {result.losses}); "
            f"set trainer.on_nonfinite: skip to skip such steps"
        )


class SampleRate:
    """Samples per second (all ranks) since the previous log step."""

    def __init__(self) -> None:
        self.start, self.samples = time.perf_counter(), 0

    def add(self, samples: int) -> None:
        self.samples += samples

    def take(self) -> float:
        """The rate since the last `take` (or creation), and start a new window."""
        rate = self.samples / max(time.perf_counter() - self.start, 1e-9)
        self.start, self.samples = time.perf_counter(), 0
        return rate


def nonfinite_tasks(result: StepResult) -> str:
    """Which tasks' losses were NaN/inf in a skipped step, for the message."""
    bad = [t for t, v in result.losses.items() if result.counts[t] > 0 and not math.isfinite(v)]
    if bad:
        return "tasks " + ", ".join(f"{t}={result.losses[t]}" for t in bad)
    return "every task's loss finite: the loss weighting or an auxiliary loss"


def log_metrics(job: Job, result: StepResult, samples_per_s: float) -> dict[str, float]:
    metrics = {f"train/{t}/loss": v for t, v in result.losses.items() if not math.isnan(v)}
    metrics["train/loss"] = result.total
    metrics.update({f"weights/{t}": float(w) for t, w in result.weights.items()})
    metrics.update(job.sampler.metrics(job.step))
    metrics.update({f"samples/{t}": float(n) for t, n in job.samples_per_task.items()})
    metrics["perf/samples_per_s"] = samples_per_s
    metrics["perf/lr"] = job.engine.lr
    metrics["train/nonfinite_steps"] = float(job.nonfinite_steps)
    metrics.update({f"data/{src}/skipped": float(n) for src, n in job.data.skipped().items()})
    metrics.update({f"data/{src}/epoch": float(e) for src, e in job.data.epochs().items()})
    gates = gate_metrics(result.out)
    metrics.update(gates)
    metrics.update(job.gate_health.check(job, gates))
    return metrics


def log_gate_heatmap(job: Job, metrics: dict[str, float]) -> None:
    if not job.info.is_rank0 or not any(k.startswith("gates/") for k in metrics):
        return
    from manytask.trainer.plots import gate_heatmap

    means = gate_means_from_metrics(metrics)
    if means:
        job.logger.log_image(job.step, "gates/heatmap", gate_heatmap(means, job.step))


def summarize(job: Job, val: dict[str, float]) -> None:
    lines = [f"finished {job.step} steps. validation:"]
    for task in job.tasks:
        parts = [f"{k.split('/')[-1]}={v:.4f}" for k, v in val.items() if k.startswith(f"val/{task}/")]
        lines.append(f"  {task:<20} " + "  ".join(parts))
    lines.append(f"run dir      {job.run.path}")
    lines.append(f"metrics      {job.run.path / 'metrics.jsonl'}")
    lines.append(f"checkpoints  {job.run.ckpt}")
    if job.logger.wandb_dir:
        lines.append(f"W&B run      {job.logger.wandb_dir}  (upload: wandb sync {job.logger.wandb_dir})")
    job.run.say("\n".join(lines))
    job.logger.summary({k: v for k, v in val.items()})
