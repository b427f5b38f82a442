"""The step's agreement vector rides on DDP's gradient all-reduce (trainer/distributed.py
PiggybackSum): on 2 real gloo ranks it is summed exactly, gradients are the same average as
DDP's default hook, micro-batches under no_sync carry nothing, and a vector submitted before a
backward that synchronises nothing is still summed (sent alone)."""

from __future__ import annotations

import os

import torch
from conftest import spawn_ranks
from torch import nn

from manytask.trainer import distributed as D


def _worker(rank: int, port: int, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    D.init_distributed("gloo")
    torch.manual_seed(0)
    # Buckets of 1 MB: after DDP's first iteration the gradients travel in two buckets, and the
    # vector must go with the last one.
    plain = nn.Sequential(nn.Linear(300, 1000), nn.Linear(1000, 1000), nn.Linear(1000, 1))
    hooked = nn.Sequential(nn.Linear(300, 1000), nn.Linear(1000, 1000), nn.Linear(1000, 1))
    hooked.load_state_dict(plain.state_dict())
    ddp_plain = nn.parallel.DistributedDataParallel(plain, bucket_cap_mb=1)
    ddp_hooked = nn.parallel.DistributedDataParallel(hooked, bucket_cap_mb=1)
    piggyback = D.PiggybackSum(2)
    calls: list[bool] = []

    def counting(state, bucket):  # which buckets this backward all-reduced (is_last per call)
        calls.append(bucket.is_last())
        return piggyback.hook(state, bucket)

    ddp_hooked.register_comm_hook(None, counting)
    x = torch.randn(8, 300, generator=torch.Generator().manual_seed(rank))

    # first iteration: DDP still has one bucket, then rebuilds them
    first = piggyback.submit(torch.tensor([float(rank)], dtype=torch.float64))
    ddp_plain(x).sum().backward()
    ddp_hooked(x).sum().backward()
    first_sum = first.result().tolist()
    calls.clear()

    # grad accumulation: micro-batch 1 under no_sync (no hook), micro-batch 2 synchronises
    for model in (ddp_plain, ddp_hooked):
        with model.no_sync():
            model(x).pow(2).mean().backward()
    local = torch.tensor([3.0 + rank, 1.0 * rank, 0.25], dtype=torch.float64)
    pending = piggyback.submit(local)
    ddp_plain(x).sum().backward()
    ddp_hooked(x).sum().backward()
    summed = pending.result()
    grads_equal = all(torch.allclose(a.grad, b.grad, rtol=1e-6, atol=1e-7)
                      for a, b in zip(plain.parameters(), hooked.parameters()))

    # a vector submitted before a backward that synchronises nothing goes alone
    with ddp_hooked.no_sync():
        late = piggyback.submit(torch.tensor([float(rank + 1)], dtype=torch.float64))
        ddp_hooked(x).sum().backward()
    # a bfloat16 bucket would round the counts: the vector goes alone, exactly
    half = nn.parallel.DistributedDataParallel(nn.Linear(4, 1).to(torch.bfloat16))
    half_sum = D.PiggybackSum(2)
    half.register_comm_hook(None, half_sum.hook)
    big = half_sum.submit(torch.tensor([1001.0 + rank], dtype=torch.float64))
    half(torch.ones(2, 4, dtype=torch.bfloat16)).sum().backward()
    out[rank] = {
        "bf16": big.result().tolist(),
        "first": first_sum,
        "summed": summed.tolist(),
        "late": late.result().tolist(),
        "grads_equal": grads_equal,
        "calls": list(calls),
    }
    D.shutdown()


def test_agreement_vector_rides_on_the_gradient_all_reduce():
    out = spawn_ranks(_worker)
    for rank in (0, 1):
        assert out[rank]["calls"] == [False, True]  # two buckets in one synchronised backward
        assert out[rank]["first"] == [1.0]
        assert out[rank]["summed"] == [7.0, 1.0, 0.5]
        assert out[rank]["late"] == [3.0]
        assert out[rank]["bf16"] == [2003.0]  # bf16 would have given 2000
        assert out[rank]["grads_equal"]
