"""ZeRO-3 gathers each layer's parameters inside the forward, a collective: validation must
make the same number of forwards on every rank, even when the ranks' shares of the validation
split differ (a split of one tar member is read by rank 0 alone). Real processes, gloo."""

from __future__ import annotations

import os

import torch
from conftest import spawn_ranks

from manytask.trainer import distributed as D
from manytask.trainer.evaluate import in_lockstep

SHARES = {0: ["r0-a", "r0-b", "r0-c"], 1: []}  # rank 1 has no validation batch at all
SHARES_UNEVEN = {0: ["r0-a"], 1: ["r1-a", "r1-b"]}


def _worker(rank: int, port: int, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    D.init_distributed("gloo")
    out[rank] = (list(in_lockstep(SHARES[rank])), list(in_lockstep(SHARES_UNEVEN[rank])))


def test_every_rank_makes_the_same_number_of_forwards_and_counts_only_its_own():
    out = spawn_ranks(_worker)
    assert out[0][0] == [("r0-a", True), ("r0-b", True), ("r0-c", True)]
    # rank 1 borrows rank 0's first batch and repeats it, never counting it
    assert out[1][0] == [("r0-a", False)] * 3
    assert out[0][1] == [("r0-a", True), ("r0-a", False)]  # its last batch again, not counted
    assert out[1][1] == [("r1-a", True), ("r1-b", True)]
