"""Elastic resume: a run checkpointed with N ranks x W workers resumes with N' x W' and goes on
with the same epoch — every sample read exactly once per epoch over the whole run.

The check: the recorded sample ids of every rank of every phase, counted, equal every finished
epoch once plus exactly the positions the final state says were consumed of the later epochs
(looked up in the epoch's global order, read by a single reader).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from conftest import free_port
from test_data_stream import expected_reads, make_cfg, make_data

from manytask.data_pipeline.cursor import Consumed
from manytask.data_pipeline.loader import MultiSourceLoader


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    path = tmp_path_factory.mktemp("elastic")
    make_data(path)
    return path


def schedule(steps: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [[int(rng.integers(0, 40)), int(rng.integers(0, 20))] for _ in range(steps)]


def check_run(root: Path, reads: list[list[int]], final_state: dict) -> None:
    got = Counter(i for r in reads for i in r)
    for name, offset in (("a", 0), ("b", 10_000)):
        consumed = Consumed.from_state(final_state["sources"][name]["consumed"])
        want = expected_reads(root, 0 if name == "a" else 1, consumed)
        mine = Counter({i: n for i, n in got.items() if (i >= 10_000) == (offset > 0)})
        assert mine == want, f"source {name}: reads differ from the epochs consumed"
        assert consumed.epoch >= 1 or consumed.intervals  # the run got somewhere


def ids(batch) -> list[int]:
    return batch.inputs["id"].tolist()


def test_workers_change_continues_the_epoch(root, tmp_path):
    """One rank: 0 workers (in-process) -> 2 workers -> 0 workers, epochs continue exactly."""
    reads: list[list[int]] = []
    state = None
    for phase, workers in enumerate((0, 2, 0)):
        loader = MultiSourceLoader(make_cfg(root, num_workers=workers), block_size=16)
        if state is not None:
            loader.load_state_dict(state)
        reads.append([i for counts in schedule(13, phase) for i in ids(loader.next_batch(counts))])
        path = tmp_path / f"phase{phase}.pt"
        torch.save(loader.state_dict(), path)
        loader.close()
        state = torch.load(path, weights_only=True)
    assert sum(map(len, reads)) > 600  # into the second epoch of source a
    check_run(root, reads, state)


def _rank(rank: int, world: int, port: int, root: str, workers: int, steps: int, phase: int,
          load: str | None, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        loader = MultiSourceLoader(make_cfg(Path(root), num_workers=workers), rank, world, block_size=16)
        if load is not None:  # the checkpointer's rule: own file with the same world, else rank 0's
            own = Path(load) / f"rank{rank}.pt"
            loader.load_state_dict(torch.load(own if own.exists() and _saved_world(load) == world
                                              else Path(load) / "rank0.pt", weights_only=True))
        got = [i for counts in schedule(steps, phase) for i in ids(loader.next_batch(counts))]
        state = loader.state_dict()  # every rank at once: gathers the job's progress
        loader.close()
        torch.save(state, Path(out) / f"rank{rank}.pt")
        np.save(Path(out) / f"ids{rank}.npy", np.array(got, dtype=np.int64))
    finally:
        dist.destroy_process_group()


def _saved_world(path: str) -> int:
    return len(list(Path(path).glob("rank*.pt")))


def run_phase(root: Path, out: Path, world: int, workers: int, steps: int, phase: int, load: Path | None) -> list[list[int]]:
    out.mkdir()
    ctx = torch.multiprocessing.get_context("fork")  # spawn would re-import torch per rank
    port = free_port()
    procs = [ctx.Process(target=_rank, args=(r, world, port, str(root), workers, steps, phase,
                                              None if load is None else str(load), str(out)))
             for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=180)
    assert [p.exitcode for p in procs] == [0] * world
    return [np.load(out / f"ids{r}.npy").tolist() for r in range(world)]


@pytest.mark.slow
def test_two_ranks_then_one_then_three(root, tmp_path):
    """Real processes (gloo): 2 ranks -> 1 rank with 2 workers -> 3 ranks; every sample of every
    epoch is read exactly once, and the final state of every rank agrees."""
    reads: list[list[int]] = []
    load = None
    for phase, (world, workers, steps) in enumerate(((2, 0, 9), (1, 2, 7), (3, 0, 9))):
        out = tmp_path / f"phase{phase}"
        reads += run_phase(root, out, world, workers, steps, phase, load)
        load = out
    states = [torch.load(load / f"rank{r}.pt", weights_only=True) for r in range(3)]
    assert all(s["sources"]["a"]["consumed"] == states[0]["sources"]["a"]["consumed"] for s in states)
    assert sum(map(len, reads)) > 600 + 240  # more than an epoch of both sources
    check_run(root, reads, states[0])


def test_more_readers_than_positions_left(root, tmp_path):
    """599 of 600 positions consumed in-process, resumed with 3 workers: one reader gets the
    last position, two get nothing of that epoch (an empty block each) and all go on."""
    loader = MultiSourceLoader(make_cfg(root, num_workers=0), block_size=16)
    reads = [ids(loader.next_batch([599, 10]))]
    torch.save(loader.state_dict(), tmp_path / "s.pt")
    loader.close()
    loader = MultiSourceLoader(make_cfg(root, num_workers=3), block_size=16)
    loader.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))
    reads.append([i for _ in range(3) for i in ids(loader.next_batch([200, 10]))])
    state = loader.state_dict()
    loader.close()
    check_run(root, reads, state)
