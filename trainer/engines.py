"""Engines: how a model is wrapped, stepped and saved — single process, DDP, DeepSpeed, or
FSDP2 (`fsdp_engine.py`).

All of them expose the same small surface to the loop: `model` (call it for the one routed
forward), `module` (the bare model), `backward(loss)`, `step(absent_tasks)` (clip, optimizer
and LR-schedule step, zero grads) and `state_dict()` / `load_state_dict()`.

A task absent from a step (no labelled sample on any rank) must not drift: its zero gradient
would still move its tower through weight decay and Adam momentum (pytorch issue 41101). The
engine therefore leaves those parameters — or, for towers batched across tasks, those slices,
with their optimizer state — exactly as they were.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from manytask.config import Config
from manytask.trainer import distributed as D
from manytask.trainer.distributed import DistInfo


def resolve_engine_name(cfg: Config, info: DistInfo) -> str:
    name = cfg.engine.name
    if name == "auto":
        return "ddp" if info.distributed else "single"
    return name


def lr_lambda(cfg: Config):
    """Linear warmup to the peak LR, then cosine decay to `lr * min_lr_ratio` at max_steps."""
    t = cfg.trainer
    warmup, total, floor = t.warmup_steps, max(t.max_steps, 1), t.min_lr_ratio

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def restart_schedule(scheduler: torch.optim.lr_scheduler.LambdaLR, lr: float) -> None:
    """After a resume whose recipe changed the LR or its schedule: peak LR `lr`, and the
    current step's LR from the new schedule at once (LambdaLR's own `base * factor(step)`)."""
    scheduler.base_lrs = [lr for _ in scheduler.base_lrs]
    for group, factor in zip(scheduler.optimizer.param_groups, scheduler.lr_lambdas):
        group["initial_lr"] = lr
        group["lr"] = lr * factor(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]


def optimizer_impl(params: list[nn.Parameter], fused: bool = True) -> dict[str, bool]:
    """Keyword arguments choosing torch's fastest optimizer implementation for `params`.

    fused: one kernel per parameter doing the whole update in one pass over its state, on CPU
    as on CUDA. An AdamW step of 100M CPU parameters takes 66-68 ms fused against 225-234 ms
    foreach and 214-223 ms for torch's CPU default, a per-tensor loop (`make bench`, part 5 of
    bench/bench_trainer.py). foreach (one op over all tensors at a time) where a parameter is
    on another device or not floating point, or when the caller asks for it.
    """
    if fused and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params):
        return {"fused": True}
    return {"foreach": True}


def make_optimizer(cfg: Config, params: list[nn.Parameter], fused: bool = True) -> torch.optim.Optimizer:
    t = cfg.trainer
    impl = optimizer_impl(params, fused)
    if t.optimizer == "sgd":
        return torch.optim.SGD(params, lr=t.lr, momentum=0.9, weight_decay=t.weight_decay, **impl)
    cls = torch.optim.AdamW if t.optimizer == "adamw" else torch.optim.Adam
    return cls(params, lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay, **impl)


def task_slices_of(module: nn.Module) -> dict[str, list[tuple[nn.Parameter, int | None]]]:
    """The model's per-task parameters, read once: walking the module tree every step costs."""
    return getattr(module, "task_parameters", lambda: {})()


def _task_slices(by_task: dict, tasks: list[str]) -> list[tuple[nn.Parameter, int | None]]:
    return [ps for task in tasks for ps in by_task.get(task, [])]


class AbsentTaskSnapshot:
    """Absent tasks' parameters (whole, or their slice of a stacked tensor) and their optimizer
    state before the step, put back after it (module docstring: absent tasks must not drift)."""

    def __init__(self, optimizer: torch.optim.Optimizer, slices: list[tuple[nn.Parameter, int | None]]):
        self.optimizer = optimizer
        self.items: list[tuple[nn.Parameter, int, torch.Tensor, dict[str, torch.Tensor]]] = []
        for param, idx in slices:
            if idx is None:
                param.grad = None  # the optimizer skips it entirely: no decay, no momentum
                continue
            state = optimizer.state.get(param, {})
            saved = {
                k: v[idx].clone()
                for k, v in state.items()
                if torch.is_tensor(v) and v.dim() > 0 and v.shape == param.shape
            }
            self.items.append((param, idx, param.data[idx].clone(), saved))

    @torch.no_grad()
    def restore(self) -> None:
        for param, idx, value, saved in self.items:
            param.data[idx] = value
            for k, v in saved.items():
                self.optimizer.state[param][k][idx] = v


def optimizer_step(engine: Any, absent_tasks: list[str], snapshot: type) -> torch.Tensor:
    """Clip, step the optimizer and LR schedule, zero grads, with the absent tasks' parameters
    put back by `snapshot(optimizer, slices)`; returns the pre-clip grad norm. The step shared by
    the torch engines (`engine`: params, optimizer, scheduler, task_slices, cfg)."""
    clip = engine.cfg.trainer.grad_clip
    norm = torch.nn.utils.clip_grad_norm_(engine.params, clip if clip > 0 else float("inf"))
    frozen = snapshot(engine.optimizer, _task_slices(engine.task_slices, absent_tasks)) if absent_tasks else None
    engine.optimizer.step()
    if frozen is not None:
        frozen.restore()
    engine.scheduler.step()
    engine.optimizer.zero_grad(set_to_none=True)
    return norm


class TorchEngine:
    """Single-process or DDP training with a torch optimizer and LR schedule."""

    lockstep_eval = False  # replicated weights: a rank may evaluate fewer batches than another

    def __init__(self, cfg: Config, model: nn.Module, info: DistInfo, ddp: bool):
        self.cfg, self.info, self.kind = cfg, info, "ddp" if ddp else "single"
        self.module = model.to(info.device)
        self.model: nn.Module = self.module
        if ddp:
            device_ids = [info.device.index] if info.device.type == "cuda" else None
            # Our models' buffers are constants (index tables): broadcasting them every forward
            # would add a collective per step for nothing. (torch 2.13 renamed the switch.)
            no_buffer_sync = (
                {"forward_sync_buffers": False}
                if "forward_sync_buffers" in inspect.signature(nn.parallel.DistributedDataParallel).parameters
                else {"broadcast_buffers": False}
            )
            self.model = nn.parallel.DistributedDataParallel(
                self.module, device_ids=device_ids, gradient_as_bucket_view=True, **no_buffer_sync
            )
            self.piggyback: D.PiggybackSum | None = D.PiggybackSum(info.world_size)
            self.model.register_comm_hook(None, self.piggyback.hook)
        else:
            self.piggyback = None
        self.params = [p for p in self.module.parameters() if p.requires_grad]  # trainer.freeze
        self.optimizer = make_optimizer(cfg, self.params)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg))
        self.grad_accum = cfg.trainer.grad_accum
        self.task_slices = task_slices_of(self.module)

    def accumulating(self, last: bool) -> contextlib.AbstractContextManager:
        """Skip DDP's gradient all-reduce on all but the last micro-batch of a step."""
        if self.kind == "ddp" and not last:
            return self.model.no_sync()
        return contextlib.nullcontext()

    def agree(self, local: torch.Tensor) -> D.PiggybackSum | D.PendingSum:
        """Sum `local` over ranks; call before the step's last backward, read `.result()`
        after it. Under DDP the vector rides on that backward's gradient all-reduce."""
        if self.piggyback is not None:
            return self.piggyback.submit(local)
        return D.all_reduce_sum_async(local)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.grad_accum if self.grad_accum > 1 else loss).backward()

    def step(self, absent_tasks: list[str]) -> float:
        """Clip, step optimizer and LR schedule, zero grads; returns the pre-clip grad norm."""
        return float(optimizer_step(self, absent_tasks, AbsentTaskSnapshot))

    def skip_step(self) -> None:
        """Drop this step's gradients (non-finite loss) without touching weights or schedule."""
        self.optimizer.zero_grad(set_to_none=True)

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])


class DeepSpeedEngine:
    """DeepSpeed (ZeRO 0–3); its config is embedded in the recipe under `engine.deepspeed`.

    The recipe's trainer settings fill whatever the embedded config leaves out (micro batch,
    accumulation, clipping, optimizer, bf16 on GPU), so one recipe runs on every engine.
    DeepSpeed checkpoints (ZeRO shards) are written by DeepSpeed itself and read back
    weights-only (`ds_checkpoint`): see `save` / `load`.
    """

    def __init__(self, cfg: Config, model: nn.Module, info: DistInfo):
        import deepspeed

        from manytask.trainer.ds_checkpoint import use_weights_only_loading

        self.cfg, self.info, self.kind = cfg, info, "deepspeed"
        # ZeRO-3 gathers parameters from every rank in each forward: ranks make the same number
        self.lockstep_eval = zero_stage(cfg) == 3
        params = [p for p in model.parameters() if p.requires_grad]
        ds_config = deepspeed_config(cfg, info, sum(getattr(p, "ds_numel", p.numel()) for p in params))
        # Unless the embedded config names a DeepSpeed optimizer, ZeRO wraps torch's own: its
        # state (step count included) round-trips exactly, so resumed runs stay bitwise equal.
        # Fused: one pass per flat partition, where foreach allocates a partition-sized
        # temporary (sqrt of the second moment) every step.
        client_opt = None if "optimizer" in ds_config else make_optimizer(cfg, params)
        self.model, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model,
            model_parameters=params,
            optimizer=client_opt,
            config=ds_config,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg)),
        )
        use_weights_only_loading(self.model)
        share_master_weights(self.optimizer)
        self.module = self.model.module
        self.grad_accum = cfg.trainer.grad_accum
        self.task_slices = task_slices_of(self.module)
        # --- gradient methods under ZeRO-3 (weightings/sharded_gradients.py): how a weighting
        # takes per-task backward passes over one forward and keeps its gradient partition.
        self.sharding = None
        if zero_stage(cfg) == 3:
            from manytask.trainer.weightings.sharded_gradients import ZeroSharding

            self.sharding = ZeroSharding(self.module)
        # --- end

    @contextlib.contextmanager
    def accumulating(self, last: bool) -> Iterator[None]:
        self._last = last
        yield

    def agree(self, local: torch.Tensor) -> D.PendingSum:
        return D.all_reduce_sum_async(local)

    def backward(self, loss: torch.Tensor) -> None:
        self.model.backward(loss)  # DeepSpeed divides by gradient_accumulation_steps itself
        if not getattr(self, "_last", True):
            # DeepSpeed counts micro-batches in step(); off the boundary it only advances.
            self.model.step()

    def step(self, absent_tasks: list[str]) -> float:
        from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param

        # ZeRO flattens and partitions parameters, so "skip this tower" cannot be expressed as
        # grad=None; put the absent towers' values back instead (optimizer moments of those
        # towers still see a zero gradient).
        saved = []
        for param, idx in _task_slices(self.task_slices, absent_tasks):
            full = safe_get_full_fp32_param(param)
            if full is not None:
                saved.append((param, idx, (full if idx is None else full[idx]).clone()))
        self.model.step()
        for param, idx, value in saved:
            if idx is not None:  # a batched tower: only this task's slice goes back
                full = safe_get_full_fp32_param(param).clone()
                full[idx] = value
                value = full
            safe_set_full_fp32_param(param, value)
        norm = self.model.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def skip_step(self) -> None:
        self.model.zero_grad()

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    # The checkpoint interface (`trainer.checkpoint.Stateful` plus own files): DeepSpeed writes
    # its model and ZeRO-partitioned optimizer itself, so the state dict is empty and
    # `save_files` / `load_files` carry everything (read back weights-only, `ds_checkpoint`).
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def save_files(self, directory: Path) -> None:
        self.model.save_checkpoint(str(directory), tag="deepspeed")

    def load_files(self, directory: Path) -> None:
        self.model.load_checkpoint(str(directory), tag="deepspeed")

    def finite_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """What must be finite before a checkpoint: this rank's parameters and its partition
        of the optimizer state."""
        yield from ((f"model.{n}", p.data) for n, p in self.module.named_parameters())
        inner = getattr(self.optimizer, "optimizer", self.optimizer)
        for i, state in enumerate(inner.state.values()):
            for key, value in state.items():
                if torch.is_tensor(value):
                    yield f"optimizer.state.{i}.{key}", value


def share_master_weights(optimizer: Any) -> bool:
    """ZeRO-1/2 training in fp32: make the optimizer's fp32 master partition the model's own
    partition (same storage) instead of DeepSpeed's copy of it. True if shared.

    DeepSpeed keeps a master copy of this rank's partition in fp32 and copies it back into the
    model after each step, which in fp32 training is the same values twice — 4 bytes per
    parameter per rank. ZeRO-3 already shares it when the dtypes agree. The values, and so
    training, checkpoints and resume, stay bit for bit the same.
    """
    masters = getattr(optimizer, "single_partition_of_fp32_groups", None)
    partitions = getattr(optimizer, "parallel_partitioned_bit16_groups", None)
    if not masters or partitions is None or getattr(optimizer, "cpu_offload", False):
        return False
    import deepspeed.comm as dist

    shared = False
    for i, master in enumerate(masters):
        own = partitions[i][dist.get_rank(group=optimizer.real_dp_process_group[i])]
        if own.dtype == master.dtype and own.device == master.device and own.shape == master.shape:
            master.data = own.data  # the same tensor object: the optimizer's param groups keep it
            shared = True
    return shared


def zero_stage(cfg: Config) -> int | None:
    """The recipe's ZeRO stage under DeepSpeed (0 when it names none), None on other engines."""
    if cfg.engine.name != "deepspeed":
        return None
    return int(cfg.engine.deepspeed.get("zero_optimization", {}).get("stage", 0))


def model_construction(cfg: Config, info: DistInfo) -> contextlib.AbstractContextManager:
    """The context the model is built in.

    ZeRO-2 and 3: experts in the per-member layout (`models.layers.sharded_layout`). ZeRO-3
    gathers a module's parameters whole, and ZeRO-2 reduces a gradient larger than a bucket
    whole, so 8 experts stacked in one `[8, 4096, 4096]` tensor — 134M of the benchmark's 138M
    parameters — would be gathered and their gradient held in full on every rank.
    ZeRO-3 also builds under `deepspeed.zero.Init`, which partitions every module's parameters
    as soon as the module is built, so no rank ever holds more than one layer in full (and that
    only while it is built) instead of the whole model until `deepspeed.initialize`. Its
    parameters are broadcast from rank 0 before partitioning, so every rank builds the same model.
    Neither with `run.init_from`: copying a trained model's weights in needs the full tensors.
    FSDP: parameters on the `meta` device, materialised shard by shard (`fsdp_engine`).
    Other engines: a no-op (they replicate the model anyway).
    """
    if cfg.engine.name == "fsdp":
        from manytask.trainer.fsdp_engine import builds_on_meta, parameters_on_meta

        return parameters_on_meta() if builds_on_meta(cfg) else contextlib.nullcontext()
    stage = zero_stage(cfg)
    if stage not in (2, 3) or cfg.run.init_from:
        return contextlib.nullcontext()
    return _sharded_construction(cfg, info, stage)


@contextlib.contextmanager
def _sharded_construction(cfg: Config, info: DistInfo, stage: int) -> Iterator[None]:
    import deepspeed

    from manytask.models.layers import sharded_layout

    partitioned = (
        deepspeed.zero.Init(config_dict_or_path=deepspeed_config(cfg, info), mem_efficient_linear=False)
        if stage == 3 else contextlib.nullcontext()
    )
    with sharded_layout(), partitioned:
        yield


# DeepSpeed's default buckets hold 5e8 elements: its gradient-reduction buffer alone is 2 GB of
# fp32 per rank, allocated whatever the model's size (stage 3 allocates it in `initialize`),
# more than the model states it partitions for a 100M-parameter model.
MAX_BUCKET, MIN_BUCKET = 500_000_000, 1 << 20


def bucket_elements(num_params: int) -> int:
    """Default ZeRO bucket size for a model of `num_params` elements: a sixteenth of the model
    (a few collectives per step, and buffers far below the model states), between 1M elements
    and DeepSpeed's own default, a multiple of 1024 (ZeRO aligns partitions to the world size)."""
    return int(min(MAX_BUCKET, max(MIN_BUCKET, num_params // 16))) // 1024 * 1024


def deepspeed_config(cfg: Config, info: DistInfo, num_params: int | None = None) -> dict[str, Any]:
    """DeepSpeed's config: the recipe's `engine.deepspeed`, completed from the trainer section;
    with `num_params`, ZeRO's buckets sized for the model (unless the recipe sets them)."""
    t = cfg.trainer
    ds = dict(cfg.engine.deepspeed)
    ds.setdefault("train_micro_batch_size_per_gpu", cfg.data.batch_size)
    ds.setdefault("gradient_accumulation_steps", t.grad_accum)
    ds.setdefault("gradient_clipping", t.grad_clip)
    ds.setdefault("steps_per_print", 10**9)
    ds.setdefault("wall_clock_breakdown", False)
    ds.setdefault("zero_allow_untested_optimizer", True)  # torch's AdamW under ZeRO
    if info.device.type == "cuda" and t.precision in ("auto", "bf16") and torch.cuda.is_bf16_supported():
        ds.setdefault("bf16", {"enabled": True})
    zero = dict(ds.get("zero_optimization", {"stage": 0}))
    if num_params is not None and zero.get("stage", 0) > 0:
        bucket = bucket_elements(num_params)
        zero.setdefault("reduce_bucket_size", bucket)
        zero.setdefault("allgather_bucket_size", bucket)
        if zero["stage"] == 3:
            # DeepSpeed keeps up to 1e9 gathered parameters alive (and any reused within 1e9
            # elements): the whole model stays gathered through forward and backward.
            zero.setdefault("stage3_prefetch_bucket_size", bucket)
            zero.setdefault("stage3_max_live_parameters", bucket)
            zero.setdefault("stage3_max_reuse_distance", bucket)
    ds["zero_optimization"] = zero
    return ds


def build_engine(cfg: Config, model: nn.Module, info: DistInfo) -> Any:
    """The engine the recipe names: TorchEngine (single, ddp), DeepSpeedEngine or FSDPEngine."""
    name = resolve_engine_name(cfg, info)
    if name == "deepspeed":
        return DeepSpeedEngine(cfg, model, info)
    if name == "fsdp":
        from manytask.trainer.fsdp_engine import FSDPEngine

        return FSDPEngine(cfg, model, info)
    if name == "ddp" and not info.distributed:
        name = "single"  # a 1-process launch: DDP would only add overhead
    return TorchEngine(cfg, model, info, ddp=name == "ddp")


def autocast(cfg: Config, info: DistInfo):
    """bf16 autocast on GPU (precision auto/bf16); a no-op context on CPU and for fp32."""
    if info.device.type == "cuda" and cfg.trainer.precision in ("auto", "bf16"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
