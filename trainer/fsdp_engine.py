"""FSDP2 (`torch.distributed.fsdp.fully_shard`): parameters, gradients and optimizer state
sharded over the ranks, torch-native (no JIT-built ops), with sharded checkpoints.

Sharding units (`shard_units`): every module that holds parameters of its own (a layer:
`nn.Linear`, a stacked expert or tower layer, the gates) with at least
`engine.fsdp.min_unit_params` elements gets its own `fully_shard`, then the root takes the
rest. A layer reads its parameters only inside its own forward, which is where FSDP gathers
them; a model that splits its experts into finer layers is sharded finer without a change
here. Each unit is gathered in full only around its forward and backward.

Construction (`parameters_on_meta`, `materialize`): the model is built with its parameters on
the `meta` device (no memory; buffers stay real), sharded, then each rank allocates only its
shard and fills it module by module: the module's parameters are re-created in full on the
CPU, `reset_parameters()` runs under the generator DDP's rank 0 builds with, and this rank's
rows are kept. Initial weights are therefore exactly DDP's for the same seed while no rank
ever holds more than one layer in full. Models whose construction does more than each
layer's `reset_parameters` (and `run.init_from`) are built in full and then sharded.

Checkpoints: `torch.distributed.checkpoint` writes every rank's shard of the model and
optimizer state (`engine/fsdp/__<rank>_0.distcp` plus `.metadata`); the checkpointer hashes
every one of those files into COMPLETE. Loading reshards, so a run saved on 2 ranks resumes on
1 (and back). `read_full_model_state` reads the full model out of such a directory without a
process group (export, eval, predict).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

try:  # FSDP2's interfaces for custom collectives (torch >= 2.9; not yet exported publicly)
    from torch.distributed.fsdp._fully_shard._fsdp_api import AllGather, ReduceScatter

    CUSTOM_COMMS = True
except ImportError:  # pragma: no cover - an older torch: FSDP's own collectives
    AllGather = ReduceScatter = object  # type: ignore[assignment,misc]
    CUSTOM_COMMS = False

from manytask.config import Config
from manytask.trainer import distributed as D
from manytask.trainer.distributed import DistInfo
from manytask.trainer.engines import lr_lambda, make_optimizer, optimizer_step, task_slices_of

# The checkpoint part's own directory (under `<step>/engine/`) and the DCP key of its state.
DCP_DIR, DCP_KEY = "fsdp", "fsdp"

# Models whose construction is exactly "each layer's reset_parameters(), in registration
# order" (tests/test_fsdp_init.py checks it against the full build); the others are built in
# full before sharding. `conditioned` re-initialises a layer after building it.
META_INIT_MODELS = frozenset({"mmoe", "omoe", "multi_head", "single_task"})


# --------------------------------------------------------------------------- construction
def builds_on_meta(cfg: Config) -> bool:
    return cfg.model.name in META_INIT_MODELS and not cfg.run.init_from


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Every parameter registered inside this context lives on the `meta` device (no memory,
    and its initialisation draws nothing from the RNG); buffers (index tables) stay real."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def init_seed(seed: int) -> int:
    """The seed DDP's model is built under: rank 0's (`distributed.seed_everything`), whose
    weights DDP broadcasts to every rank."""
    return seed * 1000003


@torch.no_grad()
def materialize(model: nn.Module, device: torch.device, seed: int) -> None:
    """Allocate this rank's shards of a sharded meta-parameter model on `device` and fill them
    with exactly the values a full build under `init_seed(seed)` gives (see module docstring)."""
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    model.to_empty(device=device)
    for name, value in buffers.items():
        model.get_buffer(name).copy_(value)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed(seed))
        for module in model.modules():
            own = dict(module.named_parameters(recurse=False))
            if not own:
                continue
            full = {n: nn.Parameter(torch.empty(p.shape, dtype=p.dtype)) for n, p in own.items()}
            module._parameters.update(full)
            try:
                module.reset_parameters()
            finally:
                module._parameters.update(own)
            for n, p in own.items():
                keep_shard(p, full[n].data.to(device))


def keep_shard(param: torch.Tensor, full: torch.Tensor) -> None:
    """Copy this rank's part of `full` (the whole tensor, the same on every rank) into `param`."""
    if isinstance(param, DTensor):
        # src_data_rank=None: every rank cuts its own part from its own copy, no communication
        mine = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)
        param.to_local().copy_(mine.to_local())
    else:
        param.copy_(full)


def shard_units(model: nn.Module, min_params: int) -> list[nn.Module]:
    """The sub-modules that get their own `fully_shard`, innermost first: every module below
    the root holding at least `min_params` parameter elements of its own."""
    units = [
        m for m in model.modules()
        if m is not model and sum(p.numel() for p in m.parameters(recurse=False)) >= max(min_params, 1)
    ]
    return units[::-1]


def ensure_process_group(info: DistInfo) -> None:
    """FSDP needs a process group even on one process (a 1-rank run, or a resume of a
    multi-rank checkpoint on one process): create a 1-rank group when torchrun made none."""
    if D.is_initialized():
        return
    backend = "nccl" if info.device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


class AllGatherByAllReduce(AllGather):
    """FSDP's parameter all-gather as an all-reduce over a zero-filled buffer (gloo only).

    gloo's `all_gather` takes 2-3x as long as an `all_reduce` of the gathered size (128 MiB:
    1.17 s against 0.50 s here). Each rank writes its shard into its own slice and zeros the
    rest, so the sum is the concatenation, exactly (x + 0 = x)."""

    def allocate(self, size: Sequence[int], *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return torch.empty(size, dtype=dtype, device=device)

    def __call__(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor, group: dist.ProcessGroup,
                 async_op: bool = False) -> dist.Work | None:
        n, rank = input_tensor.numel(), group.rank()
        mine = output_tensor.narrow(0, rank * n, n)
        if mine.data_ptr() != input_tensor.data_ptr():  # FSDP gathers in place: usually a view
            mine.copy_(input_tensor)
        output_tensor.narrow(0, 0, rank * n).zero_()
        output_tensor.narrow(0, (rank + 1) * n, output_tensor.numel() - (rank + 1) * n).zero_()
        return dist.all_reduce(output_tensor, group=group, async_op=async_op)


class ReduceScatterByAllReduce(ReduceScatter):
    """FSDP's gradient reduce-scatter as an in-place all-reduce of its (temporary) input
    buffer, keeping this rank's slice (gloo only: 1.45 s against 0.50 s for 128 MiB here).
    The sums are the same numbers: on each element every rank's value is added the same way."""

    def allocate(self, size: Sequence[int], *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return torch.empty(size, dtype=dtype, device=device)

    def __call__(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor, group: dist.ProcessGroup,
                 op: Any, async_op: bool = False) -> dist.Work | None:
        dist.all_reduce(input_tensor, op=op, group=group)
        n = output_tensor.numel()
        output_tensor.copy_(input_tensor.narrow(0, group.rank() * n, n))
        return None


def mixed_precision(cfg: Config, info: DistInfo) -> MixedPrecisionPolicy:
    """bf16 compute with fp32 gradient reduction on a GPU (precision auto/bf16); fp32 else."""
    if info.device.type == "cuda" and cfg.trainer.precision in ("auto", "bf16") and torch.cuda.is_bf16_supported():
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


# --------------------------------------------------------------------------- absent tasks
def local_part(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor; a plain tensor as it is."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def shard_rows(param: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(this rank's local tensor of `param`, the global index of its first row along dim 0)."""
    if not isinstance(param, DTensor):
        return param.data, 0
    local = param.to_local()
    mesh = param.device_mesh
    # fully_shard splits dim 0 as torch.chunk does: ceil(n / world) rows per rank
    rows = math.ceil(param.shape[0] / mesh.size())
    return local, rows * mesh.get_local_rank()


class ShardedAbsentSnapshot:
    """What an absent task's parameters (whole, or its slice of a stacked tensor) and their
    optimizer state hold on this rank before the step, put back after it (engines module
    docstring: absent tasks must not drift). Each rank handles the rows it holds."""

    def __init__(self, optimizer: torch.optim.Optimizer, slices: list[tuple[nn.Parameter, int | None]]):
        self.items: list[tuple[torch.Tensor, int, torch.Tensor, dict[str, tuple[torch.Tensor, torch.Tensor]]]] = []
        for param, idx in slices:
            if idx is None:
                param.grad = None  # the optimizer skips it on every rank: no decay, no momentum
                continue
            local, first = shard_rows(param)
            row = idx - first
            if not 0 <= row < local.shape[0]:
                continue  # another rank holds this slice
            saved = {}
            for key, value in optimizer.state.get(param, {}).items():
                if torch.is_tensor(value) and value.dim() > 0 and value.shape == param.shape:
                    state_local = local_part(value)
                    saved[key] = (state_local, state_local[row].clone())
            self.items.append((local, row, local[row].clone(), saved))

    @torch.no_grad()
    def restore(self) -> None:
        for local, row, value, saved in self.items:
            local[row] = value
            for state_local, old in saved.values():
                state_local[row] = old


# --------------------------------------------------------------------------- checkpoint state
class ShardedTrainingState:
    """Model and optimizer state as one `Stateful` for `torch.distributed.checkpoint`: sharded
    tensors (DTensor) that DCP writes rank by rank and reshards on load."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict[str, Any]:
        model_state, optim_state = get_state_dict(self.model, self.optimizer)
        return {"model": model_state, "optim": optim_state}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        set_state_dict(self.model, self.optimizer, model_state_dict=state_dict["model"],
                       optim_state_dict=state_dict["optim"])


def read_full_model_state(directory: Path) -> dict[str, torch.Tensor]:
    """The full (unsharded) model state dict of an fsdp checkpoint part's DCP directory, on
    CPU, read in this process alone (no process group): what `read_model_state` returns for
    export, evaluation and prediction."""
    reader = dcp.FileSystemReader(str(directory))
    prefix = f"{DCP_KEY}.model."
    template = {
        key[len(prefix):]: torch.empty(meta.size, dtype=meta.properties.dtype)
        for key, meta in reader.read_metadata().state_dict_metadata.items()
        if key.startswith(prefix) and hasattr(meta, "size")
    }
    state = {DCP_KEY: {"model": template}}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(state, storage_reader=reader, no_dist=True)
    return state[DCP_KEY]["model"]


# --------------------------------------------------------------------------- the engine
class FSDPEngine:
    """FSDP2 training with a torch optimizer and LR schedule (the surface of engines.TorchEngine)."""

    kind = "fsdp"
    lockstep_eval = True  # every forward gathers parameters: ranks must make the same number

    def __init__(self, cfg: Config, model: nn.Module, info: DistInfo):
        self.cfg, self.info = cfg, info
        ensure_process_group(info)
        mesh = init_device_mesh(info.device.type, (dist.get_world_size(),))
        on_meta = any(p.device.type == "meta" for p in model.parameters())
        if not on_meta:
            model = model.to(info.device)
        policy = mixed_precision(cfg, info)
        units = [*shard_units(model, cfg.engine.fsdp.min_unit_params), model]
        for unit in units:
            fully_shard(unit, mesh=mesh, mp_policy=policy, reshard_after_forward=cfg.engine.fsdp.reshard_after_forward)
            if dist.get_backend() == "gloo" and CUSTOM_COMMS:
                unit.set_custom_all_gather(AllGatherByAllReduce())
                unit.set_custom_reduce_scatter(ReduceScatterByAllReduce())
        if on_meta:
            materialize(model, info.device, cfg.run.seed)
        self.module = self.model = model
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(cfg, self.params)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg))
        self.grad_accum = cfg.trainer.grad_accum
        self.task_slices = task_slices_of(model)  # the sharded parameters (fully_shard replaced them)
        self.training_state = ShardedTrainingState(model, self.optimizer)

    @contextlib.contextmanager
    def accumulating(self, last: bool) -> Iterator[None]:
        """Reduce-scatter gradients only on the step's last micro-batch."""
        self.model.set_requires_gradient_sync(last)
        try:
            yield
        finally:
            self.model.set_requires_gradient_sync(True)

    def agree(self, local: torch.Tensor) -> D.PendingSum:
        return D.all_reduce_sum_async(local)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.grad_accum if self.grad_accum > 1 else loss).backward()

    def step(self, absent_tasks: list[str]) -> float:
        """Clip, step optimizer and LR schedule, zero grads; returns the pre-clip grad norm."""
        norm = optimizer_step(self, absent_tasks, ShardedAbsentSnapshot)
        return float(norm.full_tensor() if isinstance(norm, DTensor) else norm)

    def skip_step(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    # The checkpoint interface: the LR schedule is replicated (common.pt); model and optimizer
    # are sharded and written by every rank through DCP (`save_files` / `load_files`).
    def state_dict(self) -> dict[str, Any]:
        return {"scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scheduler.load_state_dict(state["scheduler"])

    def save_files(self, directory: Path) -> None:
        # no fsync per file: COMPLETE's checksums catch a file the OS lost (checkpoint.py)
        writer = dcp.FileSystemWriter(str(directory / DCP_DIR), sync_files=False)
        dcp.save({DCP_KEY: self.training_state}, storage_writer=writer)

    def load_files(self, directory: Path) -> None:
        dcp.load({DCP_KEY: self.training_state}, checkpoint_id=str(directory / DCP_DIR))

    def finite_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """What must be finite before a checkpoint: this rank's shards of the parameters and of
        the optimizer state."""
        yield from ((f"model.{n}", local_part(p.data)) for n, p in self.module.named_parameters())
        for i, state in enumerate(self.optimizer.state.values()):
            for key, value in state.items():
                if torch.is_tensor(value):
                    yield f"optimizer.state.{i}.{key}", local_part(value)


__all__ = ["FSDPEngine", "builds_on_meta", "materialize", "parameters_on_meta",
           "read_full_model_state", "shard_units"]
