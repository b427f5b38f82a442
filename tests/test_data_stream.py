"""Streams and the multi-source loader: write shards, read, stop, resume, compare."""

from __future__ import annotations

import os
from collections import Counter

import numpy as np
import pytest
import torch

from manytask.config import config_from_dict
from manytask.data_pipeline.cursor import Consumed, consumed_of
from manytask.data_pipeline.loader import (
    MIN_BLOCK,
    MIN_SOURCE_BLOCK,
    READ_AHEAD_BYTES,
    MultiSourceLoader,
    default_block_size,
)
from manytask.data_pipeline.manifest import load_manifest
from manytask.data_pipeline.shard_writer import write_shards
from manytask.data_pipeline.sources import label_specs, model_inputs, source_sizes, task_out_dims
from manytask.data_pipeline.stream import ShardStream
from manytask.data_pipeline.validation import val_batches

N_A, N_B = 600, 240  # source A: chunk layout; source B: sample layout
B_OFFSET = 10_000  # B's sample ids start here so ids identify the source


def make_data(root) -> None:
    rng = np.random.default_rng(0)
    y = rng.standard_normal(N_A).astype(np.float32)
    y[::9] = np.nan  # missing labels
    write_shards(root / "a", {
        "id": np.arange(N_A), "x": rng.standard_normal((N_A, 3)).astype(np.float32),
        "y": y, "cls": rng.integers(0, 4, N_A),
    }, samples_per_shard=100, chunk_size=16, layout="chunk")
    write_shards(root / "b", {
        "id": np.arange(N_B) + B_OFFSET, "x": rng.standard_normal((N_B, 3)).astype(np.float32),
        "z": rng.standard_normal((N_B, 2)).astype(np.float32),
        "t": rng.standard_normal(N_B).astype(np.float32),
    }, samples_per_shard=40, layout="sample")
    write_shards(root / "a_val", {
        "id": np.arange(100) + 50_000, "x": np.zeros((100, 3), np.float32),
        "y": np.ones(100, np.float32), "cls": np.ones(100, np.int64),
    }, samples_per_shard=100, chunk_size=16)


def make_cfg(root, num_workers=0, seed=0, **data):
    return config_from_dict({
        "run": {"seed": seed},
        "data": {
            "batch_size": 24, "shuffle_buffer": 40, "num_workers": num_workers, **data,
            "sources": [
                {"name": "a", "train": str(root / "a"), "val": str(root / "a_val"),
                 "inputs": ["id", "x"], "labels": {"ta": "y", "tc": "cls"}},
                {"name": "b", "train": str(root / "b"), "inputs": ["id", "x", "z"],
                 "labels": {"tb": "t"}},
            ],
        },
        "tasks": {"ta": {"type": "regression"}, "tc": {"type": "multiclass"},
                  "tb": {"type": "regression"}},
    })


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    path = tmp_path_factory.mktemp("streams")
    make_data(path)
    return path


def counts_schedule(steps: int, seed: int = 1) -> list[list[int]]:
    """Mixed steps, single-source steps and odd sizes that straddle block boundaries."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(steps):
        kind = rng.integers(3)
        a, b = int(rng.integers(1, 50)), int(rng.integers(1, 30))
        out.append([a, b] if kind == 0 else [a, 0] if kind == 1 else [0, b])
    return out


def run(cfg, schedule, stops=(), tmp=None, block=16):
    """Read the schedule; at each step in `stops`, save state, rebuild everything, load.

    Blocks of 16 in windows of 40 samples: blocks end early at window ends, and steps
    straddle blocks, workers and epochs.
    """
    loader = MultiSourceLoader(cfg, block_size=block)
    seen = []
    for step, counts in enumerate(schedule):
        if step in stops:
            path = os.path.join(tmp, f"state{step}.pt")
            torch.save(loader.state_dict(), path)
            loader.close()
            loader = MultiSourceLoader(cfg, block_size=block + 7)  # the saved block size wins
            loader.load_state_dict(torch.load(path, weights_only=True))
        batch = loader.next_batch(counts)
        seen.append(batch)
    loader.close()
    return seen


def ids(batches) -> list[int]:
    return [int(i) for b in batches for i in b.inputs["id"]]


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_is_exact(root, tmp_path, workers):
    torch.set_num_threads(1)
    cfg = make_cfg(root, num_workers=workers)
    schedule = counts_schedule(40)
    assert sum(c[0] for c in schedule) > N_A  # crosses an epoch of source A
    full = run(cfg, schedule)
    resumed = run(cfg, schedule, stops=(3, 7, 23), tmp=tmp_path)
    assert ids(full) == ids(resumed)
    for f, r in zip(full, resumed):
        assert torch.equal(f.source_id, r.source_id)
        for task in f.labels:
            assert torch.equal(f.labels[task], r.labels[task])
            assert torch.equal(f.masks[task], r.masks[task])
    assert [len(b) for b in full] == [sum(c) for c in schedule]


def read_epoch(stream: ShardStream, worker: int, epoch: int) -> list[int]:
    out = []
    for block in stream.blocks(worker, start=(epoch, 0, 0)):
        if block.before.epoch != epoch:
            break
        out += block.data["id"].tolist()
    return out


def test_splits_cover_epoch_once_and_shuffle_by_epoch(root):
    m = load_manifest(root / "a")
    streams = [ShardStream(m, r, 2, seed=3, shuffle_buffer=40, fields=["id"], splits_per_rank=3) for r in range(2)]
    epoch0 = [read_epoch(s, w, 0) for s in streams for w in range(3)]
    flat = [i for part in epoch0 for i in part]
    assert sorted(flat) == list(range(N_A))  # no overlap, no loss over 2 ranks x 3 workers
    again = read_epoch(ShardStream(m, 0, 2, seed=3, shuffle_buffer=40, fields=["id"], splits_per_rank=3), 0, 0)
    assert again == epoch0[0]  # reproducible
    assert read_epoch(streams[0], 0, 1) != epoch0[0]  # a new order each epoch
    other_seed = ShardStream(m, 0, 2, seed=4, shuffle_buffer=40, fields=["id"], splits_per_rank=3)
    assert read_epoch(other_seed, 0, 0) != epoch0[0]
    no_shuffle = ShardStream(m, 0, 1, shuffle_buffer=0, fields=["id"])
    ordered = read_epoch(no_shuffle, 0, 0)
    assert sorted(ordered) == list(range(N_A)) and ordered != sorted(ordered)  # shard order only


def test_window_shuffle_stays_local(root):
    m = load_manifest(root / "a")
    s = ShardStream(m, 0, 1, seed=0, shuffle_buffer=16, fields=["id"], block_size=16, block_layout="window")
    for block in s.blocks(0):  # window = one chunk: each block is one permuted chunk
        ids_ = np.sort(block.data["id"])
        assert ids_[-1] - ids_[0] == len(ids_) - 1
        if block.after.epoch:
            break


@pytest.mark.parametrize("block", [16, 50])
def test_span_blocks_hold_the_same_samples_as_window_blocks(root, block):
    """Blocks spanning windows ("span", today's layout) cut each reader's samples differently
    from blocks ending with their window ("window", recorded states before it), never reorder
    them: per reader and epoch the same ids in the same order. Span blocks cut the reader's
    part of an epoch into equal blocks of at most block_size, each following on from the last."""
    m = load_manifest(root / "a")

    def blocks_of(layout, worker, epoch):
        s = ShardStream(m, 1, 2, seed=3, shuffle_buffer=40, fields=["id"], splits_per_rank=2,
                        block_size=block, block_layout=layout)
        out = []
        for b in s.blocks(worker, start=(epoch, 0, 0)):
            if b.before.epoch != epoch:
                return s, out
            out.append(b)
        raise AssertionError("unreachable")

    for worker in range(2):
        for epoch in range(2):
            stream, span = blocks_of("span", worker, epoch)
            _, window = blocks_of("window", worker, epoch)
            ids_span = [i for b in span for i in b.data["id"].tolist()]
            assert ids_span == [i for b in window for i in b.data["id"].tolist()]
            n = stream.epoch_size(epoch, worker)
            sizes = [b.size for b in span]  # ceil(n / block) blocks of equal size, no short tail
            assert len(sizes) == -(-n // block) and max(sizes) <= block and max(sizes) - min(sizes) <= 1
            assert len(window) > len(span)  # windows of 48 samples cut the window layout's blocks more often
            assert [b.before.index for b in span] == np.cumsum([0] + sizes[:-1]).tolist()
            assert all(a.after == b.before for a, b in zip(span, span[1:])) and span[-1].after == (epoch + 1, 0, 0)
    with pytest.raises(ValueError, match="block_layout"):
        ShardStream(m, block_layout="chunk")


def global_order(root, source: int, epoch: int) -> list[int]:
    """Source `source`'s ids in epoch `epoch`'s global order (one reader reads it all in order),
    with the stream settings MultiSourceLoader uses for make_cfg's recipe."""
    with MultiSourceLoader(make_cfg(root)) as loader:
        ref = loader.cursors[source].stream
    stream = ShardStream(ref.manifest, 0, 1, ref.seed, ref.shuffle_buffer, fields=["id"], block_size=1 << 20, salt=ref.salt)
    out: list[int] = []
    for block in stream.blocks(0, start=(epoch, 0, 0)):
        if block.before.epoch != epoch:
            break
        out += block.data["id"].tolist()
    return out


def expected_reads(root, source: int, consumed: Consumed) -> Counter:
    """Every finished epoch once, and the consumed positions of later ones, as ids."""
    want: Counter = Counter()
    for e in range(consumed.epoch):
        want.update(global_order(root, source, e))
    for e, intervals in consumed.intervals.items():
        order = global_order(root, source, e)
        want.update(order[p] for s, t in intervals for p in range(s, t))
    return want


def _rank_main(rank: int, root: str, out: str) -> None:
    torch.set_num_threads(1)
    from pathlib import Path

    cfg = make_cfg(Path(root), num_workers=2)
    loader = MultiSourceLoader(cfg, rank, 2)
    got = ids([loader.next_batch([64, 0]) for _ in range(-(-N_A // 128))])  # about an epoch
    got += ids([loader.next_batch([0, 64]) for _ in range(-(-N_B // 128))])
    progress = [c.progress() for c in loader.cursors]
    loader.close()
    np.save(os.path.join(out, f"rank{rank}.npy"), np.array(got))
    torch.save(progress, os.path.join(out, f"progress{rank}.pt"))


@pytest.mark.slow
def test_two_rank_processes_split_an_epoch(root, tmp_path):
    """Two rank processes with 2 workers each read about an epoch: together they read each
    sample of the positions they consumed once. Forked (not spawned): a spawned child
    re-imports torch, which costs tens of seconds on a busy 2-core machine."""
    ctx = torch.multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_rank_main, args=(r, str(root), str(tmp_path))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0]
    got = Counter(i for r in range(2) for i in np.load(tmp_path / f"rank{r}.npy").tolist())
    progress = [torch.load(tmp_path / f"progress{r}.pt", weights_only=True) for r in range(2)]
    assert sum(got.values()) == 2 * (64 * -(-N_A // 128) + 64 * -(-N_B // 128))
    with MultiSourceLoader(make_cfg(root, num_workers=2), 0, 2) as loader:
        for i in range(2):
            consumed = consumed_of(loader.cursors[i].stream, progress[0][i] + progress[1][i], 0)
            mine = Counter({k: v for k, v in got.items() if (k >= B_OFFSET) == (i == 1)})
            assert mine == expected_reads(root, i, consumed)
            assert max(mine.values()) <= 2  # about an epoch: no sample a third time


def test_masks_and_zero_fill(root):
    cfg = make_cfg(root)
    with MultiSourceLoader(cfg) as loader:
        batch = loader.next_batch([60, 20])
    assert set(batch.labels) == set(batch.masks) == {"ta", "tc", "tb"}
    a, b = batch.source_id == 0, batch.source_id == 1
    assert int(a.sum()) == 60 and int(b.sum()) == 20
    assert not batch.masks["tb"][a].any() and not batch.masks["ta"][b].any()
    assert torch.all(batch.labels["tb"][a] == 0) and torch.all(batch.labels["tc"][b] == 0)
    nan_ids = batch.inputs["id"][a] % 9 == 0  # y[::9] is NaN
    assert nan_ids.any()
    assert torch.equal(batch.masks["ta"][a], ~nan_ids)
    assert not torch.isnan(batch.labels["ta"]).any()
    assert batch.masks["tc"][a].all() and batch.masks["tb"][b].all()
    assert torch.all(batch.inputs["z"][a] == 0) and batch.inputs["z"].shape == (80, 2)
    assert batch.labels["tc"].dtype == torch.int64 and batch.inputs["x"].dtype == torch.float32


def test_specs_from_manifests(root):
    cfg = make_cfg(root)
    assert source_sizes(cfg) == [N_A, N_B]
    inputs = model_inputs(cfg)
    assert list(inputs) == ["id", "x", "z"] and inputs["z"].shape == (2,)
    specs = label_specs(cfg)
    assert specs["tc"].vocab == 4 and specs["ta"].shape == ()
    assert task_out_dims(cfg) == {"ta": 1, "tc": 4, "tb": 1}


def test_val_split_covers_every_sample_once(root):
    cfg = make_cfg(root)
    per_rank = [ids(val_batches(cfg, r, 2, batch_size=16)) for r in range(2)]
    assert not set(per_rank[0]) & set(per_rank[1])
    assert sorted(per_rank[0] + per_rank[1]) == list(range(50_000, 50_100))
    assert per_rank[0] == sorted(per_rank[0])  # manifest order, no shuffle
    batches = list(val_batches(cfg, 0, 1, batch_size=30))
    assert [len(b) for b in batches] == [30, 30, 30, 10]
    assert list(val_batches(cfg, 0, 1, batch_size=30, max_batches=2)).__len__() == 2


def make_alike_sources(root, k: int = 4) -> list[str]:
    """k sources with the same fields (so the worker pool path gathers every field from the
    shared buffer); x rows are 12 bytes, not a divisor of the 64-byte slot alignment."""
    rng = np.random.default_rng(3)
    dirs = []
    for s in range(k):
        n = 150 + 37 * s
        write_shards(root / f"alike{s}", {
            "id": np.arange(n) + 1000 * s, "x": rng.standard_normal((n, 3)).astype(np.float32),
            "y": rng.standard_normal(n).astype(np.float32),
        }, samples_per_shard=80, chunk_size=16, layout="chunk")
        dirs.append(str(root / f"alike{s}"))
    return dirs


def alike_cfg(dirs, num_workers=2):
    return config_from_dict({
        "data": {"batch_size": 40, "shuffle_buffer": 64, "num_workers": num_workers,
                 "sources": [{"name": f"s{i}", "train": d, "inputs": ["id", "x"], "labels": {"t": "y"}}
                             for i, d in enumerate(dirs)]},
        "tasks": {"t": {"type": "regression"}},
    })


def alike_schedule(steps: int, k: int) -> list[list[int]]:
    """Uneven counts, zeros included, that cross block boundaries at different steps."""
    rng = np.random.default_rng(7)
    return [[int(c) if rng.random() > 0.2 else 0 for c in rng.integers(0, 30, k)] for _ in range(steps)]


def test_pool_gather_matches_piece_by_piece_and_resumes_exactly(tmp_path):
    """With a worker pool and sources alike, each field of a step is gathered from the shared
    buffer in one call. It yields exactly the batches the piece-by-piece join yields (steps
    crossing blocks and readers, rows copied out of a released block, 12-byte rows), and a
    stop-and-resume in between continues bit-exactly."""
    dirs = make_alike_sources(tmp_path)
    cfg = alike_cfg(dirs)
    schedule = alike_schedule(60, len(dirs))
    gathered = run(cfg, schedule)

    loader = MultiSourceLoader(cfg, block_size=16)
    assert loader._build.all_gatherable
    loader._build.all_gatherable = False  # the piece-by-piece join, as for unlike sources
    joined = [loader.next_batch(c) for c in schedule]
    loader.close()
    for step, (g, j) in enumerate(zip(gathered, joined)):
        for name in ("id", "x"):
            assert torch.equal(g.inputs[name], j.inputs[name]), (step, name)
        assert torch.equal(g.labels["t"], j.labels["t"]) and torch.equal(g.masks["t"], j.masks["t"])
        assert torch.equal(g.source_id, j.source_id)
        assert g.source_id.tolist() == [i for i, c in enumerate(schedule[step]) for _ in range(c)]
    # Every id comes from the source the batch says.
    got = ids(gathered)
    assert all(i // 1000 == s for i, s in zip(got, torch.cat([b.source_id for b in gathered]).tolist()))

    resumed = run(cfg, schedule, stops=(17, 41), tmp=str(tmp_path))
    for g, r in zip(gathered, resumed):
        assert torch.equal(g.inputs["x"], r.inputs["x"]) and torch.equal(g.inputs["id"], r.inputs["id"])


OLD_STATES = {
    # version 2: SeedSequence window shuffles, not today's Philox (same with 0 workers)
    "before philox": (2, ("window_rng", "block_layout"), "window_rng", "seed_sequence", 0, 3),
    # version 3: blocks ending at window ends; with 2 workers (2 readers per source, taken in
    # turn block by block) that interleaving differs from today's
    "before span blocks": (3, ("block_layout",), "block_layout", "window", 2, 4),
}


@pytest.mark.parametrize("case", list(OLD_STATES))
def test_a_state_recorded_by_an_older_version_resumes_in_its_order(root, tmp_path, case):
    """A checkpoint of an older state version resumes in the order it was recorded with (the
    same samples an uninterrupted old run reads), not in today's, and keeps that order in the
    states it writes."""
    version, dropped, key, old_value, workers, seed = OLD_STATES[case]
    cfg = make_cfg(root, num_workers=workers)
    schedule = counts_schedule(30, seed=seed)

    def as_old(state):
        for st in state["sources"].values():
            for k in dropped:
                assert st.pop(k) in {"window_rng": ("seed_sequence", "philox"), "block_layout": ("span", "window")}[k]
        return {**state, "version": version}

    def loader_at(state):
        loader = MultiSourceLoader(cfg, block_size=16)
        loader.load_state_dict(torch.load(state, weights_only=True))
        return loader

    fresh = MultiSourceLoader(cfg, block_size=16)
    torch.save(as_old(fresh.state_dict()), tmp_path / "start.pt")
    new_order = ids(fresh.next_batch(c) for c in schedule)
    fresh.close()
    old = loader_at(tmp_path / "start.pt")  # an old run from its first step
    assert all(getattr(c.stream, key) == old_value for c in old.cursors)
    before = [old.next_batch(c) for c in schedule[:12]]
    torch.save(as_old(old.state_dict()), tmp_path / "mid.pt")
    after = [old.next_batch(c) for c in schedule[12:]]
    old.close()
    assert ids(before + after) != new_order  # the old and new orders differ: the test can tell
    with loader_at(tmp_path / "mid.pt") as resumed:
        assert ids(resumed.next_batch(c) for c in schedule[12:]) == ids(after)
        assert resumed.state_dict()["sources"]["a"][key] == old_value  # and keeps it
    # At another worker count the rest of the epoch is split anew, in the old layout and with
    # the old run's block size (the block-size rule changed with the layout).
    with MultiSourceLoader(make_cfg(root, num_workers=1), block_size=23) as elastic:
        elastic.load_state_dict(torch.load(tmp_path / "mid.pt", weights_only=True))
        assert all((c.stream.block_layout, c.stream.block_size) == ("window", 16) for c in elastic.cursors)
    bad = torch.load(tmp_path / "mid.pt", weights_only=True)
    bad["sources"]["a"]["block_layout"] = "chunked"
    with pytest.raises(ValueError, match="'a'.*block_layout 'chunked'"):
        MultiSourceLoader(cfg, block_size=16).load_state_dict(bad)


NAN_IDS = [3, 17, 18, 100, 101, 102, 150, 299]  # of 300: samples with a NaN input


def nan_source_cfg(tmp_path, workers: int):
    """One chunk-layout source (chunks of 8, windows of 16) whose NAN_IDS samples are skipped."""
    if not (tmp_path / "nan").exists():
        x = np.random.default_rng(5).standard_normal((300, 2)).astype(np.float32)
        x[NAN_IDS, 1] = np.nan
        write_shards(tmp_path / "nan", {"id": np.arange(300), "x": x, "y": np.ones(300, np.float32)},
                     samples_per_shard=70, chunk_size=8, layout="chunk")
    return config_from_dict({
        "data": {"batch_size": 16, "shuffle_buffer": 16, "num_workers": workers, "on_nonfinite_input": "skip",
                 "sources": [{"name": "nan", "train": str(tmp_path / "nan"), "inputs": ["id", "x"], "labels": {"t": "y"}}]},
        "tasks": {"t": {"type": "regression"}},
    })


def read_with_stops(tmp_path, schedule, phases):
    """Read `schedule`; phases: (first step, workers): at each, save the state and go on with a
    new loader of that many workers. Blocks of ~37 positions span windows of 16. Returns the
    ids read, the skipped count and the final state."""
    loader, got = None, []
    starts = dict(phases)
    for step, counts in enumerate(schedule):
        if step in starts:
            state = loader.state_dict() if loader is not None else None
            if loader is not None:
                loader.close()
            loader = MultiSourceLoader(nan_source_cfg(tmp_path, starts[step]), block_size=37)
            if state is not None:
                loader.load_state_dict(state)
        got += ids([loader.next_batch(counts)])
    out = got, loader.skipped()["nan"], loader.state_dict()
    loader.close()
    return out


@pytest.mark.parametrize("workers", [0, 2])
def test_skipped_samples_inside_blocks_spanning_windows_resume_exactly(tmp_path, workers):
    """Samples skipped for a non-finite input inside blocks that span several windows: stops
    at many steps resume with the same samples and skipped count as the uninterrupted run."""
    schedule = [[int(c)] for c in np.random.default_rng(2).integers(1, 30, 40)]
    assert sum(c[0] for c in schedule) > 300  # into the second epoch
    full, skipped, _ = read_with_stops(tmp_path, schedule, [(0, workers)])
    assert not set(full) & set(NAN_IDS) and skipped >= len(NAN_IDS)
    for stops in [(1, 2, 3), tuple(range(4, 40, 5))]:
        got, again, _ = read_with_stops(tmp_path, schedule, [(0, workers)] + [(s, workers) for s in stops])
        assert (got, again) == (full, skipped)


def test_skipped_samples_resume_elastically(tmp_path):
    """0 workers -> 2 -> 0, stopping inside blocks that span windows and hold skipped samples:
    the run reads every good sample of each finished epoch once and exactly the good samples
    of the positions the final state says were consumed (a skipped position counts as
    consumed, so the next readers neither repeat nor lose the samples around it)."""
    schedule = [[int(c)] for c in np.random.default_rng(4).integers(1, 30, 36)]
    got, _, state = read_with_stops(tmp_path, schedule, [(0, 0), (11, 2), (23, 0)])
    with MultiSourceLoader(nan_source_cfg(tmp_path, 0)) as loader:
        ref = loader.cursors[0].stream
    consumed = Consumed.from_state(state["sources"]["nan"]["consumed"])
    assert consumed.epoch >= 1  # an epoch finished, another begun

    def order(epoch):  # the epoch's global order, NaN samples included, read by one reader
        one = ShardStream(ref.manifest, 0, 1, ref.seed, ref.shuffle_buffer, fields=["id"], block_size=1 << 20, salt=ref.salt)
        return next(iter(one.blocks(0, start=(epoch, 0, 0)))).data["id"].tolist()

    want = Counter(i for e in range(consumed.epoch) for i in order(e))
    for e, intervals in consumed.intervals.items():
        want.update(order(e)[p] for a, b in intervals for p in range(a, b))
    for i in NAN_IDS:
        del want[i]
    assert Counter(got) == want


def test_many_sources_with_one_hot_source_read_their_order(tmp_path):
    """12 sources share 2 workers, one slot per source and reader, freed slots going back in
    batches (at once for a source about to run dry, as the one the sampler takes almost every
    row from here). Whatever the timing, over its many epochs that source reads exactly its
    readers' blocks in turn, as its stream gives them in this process, and the pool's gather
    equals the piece-by-piece join."""
    dirs = make_alike_sources(tmp_path, k=12)
    cfg = alike_cfg(dirs)
    rng = np.random.default_rng(11)
    schedule = [[37] + [int(c) for c in rng.integers(0, 3, 11)] for _ in range(40)]
    with MultiSourceLoader(cfg, block_size=16) as loader:
        gathered = [loader.next_batch(c) for c in schedule]
        assert loader._blocks._credit_batch == [3, 3]  # 12 slots per worker: credits go back 3 at a time
        stream = loader.cursors[0].stream
    with MultiSourceLoader(cfg, block_size=16) as loader:
        loader._build.all_gatherable = False
        joined = [loader.next_batch(c) for c in schedule]
    assert ids(gathered) == ids(joined)
    hot = [i for i in ids(gathered) if i < 1000]
    assert len(hot) == 37 * 40 > 9 * 150  # source 0 (150 samples): nine epochs and more
    readers = [stream.blocks(w) for w in range(2)]
    expected: list[int] = []
    while len(expected) < len(hot):
        for blocks in readers:
            expected += next(blocks).data["id"].tolist()
    assert hot == expected[: len(hot)]


def test_default_block_size_keeps_read_ahead_within_its_budget(tmp_path):
    """Blocks are MIN_BLOCK samples (or a source's share of a bigger batch) while a block of
    every source fits the per-reader read-ahead budget in bytes; beyond (many sources, wide
    samples), they shrink to what fits, never below MIN_SOURCE_BLOCK."""
    assert default_block_size(1024, 1, 140) == default_block_size(1024, 64, 140) == MIN_BLOCK
    assert default_block_size(65_536, 4, 140) == 16_384  # a source's share of a big batch
    assert default_block_size(1024, 64, 4096) == MIN_SOURCE_BLOCK  # 64 sources of 4 KiB samples
    for batch in (16, 1024, 65_536):
        for sources in (1, 8, 64, 100, 1000, 5000):
            for row in (4, 140, 4096, 1 << 20):
                block = default_block_size(batch, sources, row)
                assert block >= MIN_SOURCE_BLOCK
                assert block * sources * row <= READ_AHEAD_BYTES or block == MIN_SOURCE_BLOCK
    with MultiSourceLoader(alike_cfg(make_alike_sources(tmp_path), num_workers=0)) as loader:
        row = 8 + 12 + 4  # id int64, x float32 [3], y float32
        assert loader.block_size == default_block_size(40, 4, row)
