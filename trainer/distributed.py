"""Every piece of rank logic in one place: process group, device, collectives, rank-0 output.

Distributed mode is switched on by torchrun's environment (`RANK`, `WORLD_SIZE`), as in
nanoGPT; the device is CUDA (bound to LOCAL_RANK, backend nccl) when a GPU is present and CPU
(backend gloo) otherwise.
"""

from __future__ import annotations

import atexit
import datetime
import logging
import os
import random
import sys
from dataclasses import dataclass
from typing import Any, NoReturn

import numpy as np
import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None

    @property
    def is_rank0(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def pick_device(local_rank: int = 0) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def init_distributed(backend: str = "auto", deepspeed: bool = False) -> DistInfo:
    """Join the process group torchrun set up (no-op for a single process).

    backend: "auto" picks nccl when CUDA is available and gloo otherwise.
    deepspeed: initialise through `deepspeed.init_distributed` so DeepSpeed's own comm layer
    is ready too.
    """
    if not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) == 1 and not deepspeed:
        return DistInfo(device=pick_device(0))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = pick_device(local_rank)
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=int(os.environ.get("MANYTASK_DIST_TIMEOUT", 1800)))
        dist.init_process_group(backend=backend, timeout=timeout, store=_restart_safe_store(world, timeout),
                                 rank=rank, world_size=world)
        if deepspeed:
            import deepspeed as ds

            ds.init_distributed(dist_backend=backend, timeout=timeout)  # adopts the group above
    return DistInfo(rank, world, local_rank, device, backend)


def _restart_safe_store(world: int, timeout: datetime.timedelta) -> dist.Store | None:
    """The rendezvous store, with a key prefix per torchrun restart round.

    After `--max-restarts` restarts the workers, the agent's store still holds the previous
    round's process-group keys; without a fresh prefix a new rank can read a dead rank's
    address and fail to connect.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    base = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                         is_master=False, timeout=timeout)
    round_id = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dist.PrefixStore(f"manytask/round_{round_id}", base)


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def exit_worker(code: int) -> NoReturn:
    """End this torchrun worker process now, with exit status `code`, skipping interpreter
    finalization.

    Gloo's C++ worker threads can outlive `destroy_process_group` when a library still holds
    a process group (DeepSpeed keeps its data-parallel group). If such a thread releases a
    tensor while the interpreter is finalizing, it takes the GIL, glibc unwinds it through a
    noexcept frame and the rank dies with SIGABRT ("terminate called without an active
    exception") after the run has finished, and torchrun reports the job as failed. See
    pytorch/pytorch#179291. So: run the atexit hooks (W&B, multiprocessing, the loaders')
    while the interpreter is whole, flush, and leave.
    """
    atexit._run_exitfuncs()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more can be written anyway
            pass
    os._exit(code)


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (in place, returned); identity in a single process."""
    if is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


class PendingSum:
    """An all-reduce in flight; `result()` waits for it (once) and returns the sum on CPU."""

    def __init__(self, tensor: torch.Tensor, work: Any = None):
        self.tensor, self.work = tensor, work

    def result(self) -> torch.Tensor:
        if self.work is not None:
            self.work.wait()
            self.work = None
        return self.tensor.cpu()


def all_reduce_sum_async(t: torch.Tensor) -> PendingSum:
    """Start summing `t` over ranks without waiting (a finished sum in a single process)."""
    if not is_initialized():
        return PendingSum(t)
    if dist.get_backend() == "nccl" and torch.cuda.is_available():
        t = t.cuda()
    return PendingSum(t, dist.all_reduce(t, op=dist.ReduceOp.SUM, async_op=True))


class PiggybackSum:
    """A small vector summed over ranks inside DDP's gradient all-reduce: one collective per
    step instead of two (on gloo each collective costs a few ms of latency, whatever its size).

    Register `hook` with `DistributedDataParallel.register_comm_hook(None, hook)`; `submit(v)`
    before a backward that synchronises gradients; `result()` after it. The vector rides on the
    last bucket of that backward, sent as the bucket's dtype (float32 counts are exact to 2^24;
    a half-precision bucket does not carry it).
    `hook` otherwise does what DDP's default does: sum the bucket and divide by the world size.
    """

    def __init__(self, world_size: int):
        self.world_size = world_size
        self.payload: torch.Tensor | None = None
        self.sum: torch.Tensor | None = None

    def submit(self, t: torch.Tensor) -> PiggybackSum:
        self.payload, self.sum = t, None
        return self

    # (bucket: dist.GradBucket) -> Future[Tensor]; unannotated because DDP checks annotations
    # by identity and `from __future__ import annotations` makes them strings.
    def hook(self, _state, bucket):  # noqa: ANN001, ANN201
        grads = bucket.buffer()
        # Only in a float32/64 bucket: a bf16 one would round counts above 256 (then the
        # vector is sent alone by result()).
        exact = grads.dtype in (torch.float32, torch.float64)
        extra = self.payload if bucket.is_last() and exact else None
        n = grads.numel()
        if extra is not None:
            self.payload = None
            flat = torch.cat([grads, extra.to(grads.device, grads.dtype)])
        else:
            flat = grads
        fut = dist.all_reduce(flat, op=dist.ReduceOp.SUM, async_op=True).get_future()

        def finish(done: torch.futures.Future) -> torch.Tensor:
            out = done.value()[0]
            if extra is not None:
                self.sum = out[n:].to(torch.float64)
            return out[:n].div_(self.world_size)

        return fut.then(finish)

    def result(self) -> torch.Tensor:
        """The summed vector on CPU. If no bucket carried it (every rank alike), it is sent alone."""
        if self.sum is None and self.payload is not None:
            self.sum, self.payload = all_reduce_sum(self.payload.clone()), None
        if self.sum is None:
            raise RuntimeError("PiggybackSum.result() before submit()")
        return self.sum.cpu()


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean over ranks of a tensor, out of place; differentiable-free (use on detached values)."""
    if not is_initialized():
        return t
    out = t.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / dist.get_world_size()


def any_rank(flag: bool, device: torch.device | str = "cpu") -> bool:
    """True on every rank when `flag` is true on at least one: one collective."""
    if not is_initialized():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if not is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    if not is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def seed_everything(seed: int, rank: int = 0) -> None:
    """Seed python, numpy and torch from (seed, rank) — never from time or pid."""
    random.seed(seed * 1000003 + rank)
    np.random.seed((seed * 1000003 + rank) % 2**32)
    torch.manual_seed(seed * 1000003 + rank)


def rng_state() -> dict[str, Any]:
    """This rank's RNG states as plain values / tensors (loadable with weights_only=True)."""
    py = random.getstate()
    np_state = np.random.get_state()
    state = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def load_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    np_state = state["numpy"]
    np.random.set_state((np_state[0], np_state[1].numpy(), *np_state[2:]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def rank0_print(info: DistInfo, *args: Any, **kwargs: Any) -> None:
    if info.is_rank0:
        print(*args, **kwargs, flush=True)
