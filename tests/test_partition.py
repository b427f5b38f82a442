"""Partition by sample: one global order per epoch whatever the number of readers; readers'
slices are disjoint, balanced to one sample, cover the epoch and open only the shards they
need — also for a source written as a single shard, and for 8,192 readers on paper."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from manytask.data_pipeline import stream as stream_module
from manytask.data_pipeline.manifest import FieldInfo, Manifest, ShardInfo, load_manifest
from manytask.data_pipeline.partition import (
    EpochOrder,
    SourceLayout,
    balanced_bounds,
    block_end,
    length,
    merge,
    plan_readers,
    reader_part,
)
from manytask.data_pipeline.shard_writer import write_shards
from manytask.data_pipeline.stream import ShardStream


@pytest.fixture(scope="module", params=["chunk", "sample"])
def source(request, tmp_path_factory):
    n = 500 if request.param == "chunk" else 230
    root = tmp_path_factory.mktemp(f"part_{request.param}")
    write_shards(root, {"id": np.arange(n), "x": np.ones((n, 2), np.float32)},
                 samples_per_shard=n // 5 + 3, chunk_size=8, layout=request.param)
    return load_manifest(root), n


def read_epoch(m: Manifest, rank: int, world: int, workers: int, epoch: int = 0) -> list[list[int]]:
    """Ids of each of this rank's readers' parts of `epoch`, in reading order."""
    s = ShardStream(m, rank, world, seed=5, shuffle_buffer=24, fields=["id"], splits_per_rank=workers, block_size=7)
    out = []
    for w in range(s.splits_per_rank):
        ids: list[int] = []
        for block in s.blocks(w, start=(epoch, 0, 0)):
            if block.before.epoch != epoch:
                break
            ids += block.data["id"].tolist()
        out.append(ids)
    return out


def test_the_order_does_not_depend_on_the_number_of_readers(source):
    m, n = source
    (whole,) = read_epoch(m, 0, 1, 1)
    assert sorted(whole) == list(range(n)) and whole != sorted(whole)
    for world, workers in ((2, 1), (3, 2), (1, 7), (16, 4)):
        parts = [p for r in range(world) for p in read_epoch(m, r, world, workers)]
        assert [i for p in parts for i in p] == whole  # readers' slices, in order, are the order
        sizes = [len(p) for p in parts]
        assert max(sizes) - min(sizes) <= 1
    assert read_epoch(m, 0, 1, 1, epoch=1)[0] != whole  # a new order each epoch


def test_one_shard_feeds_many_readers(tmp_path):
    write_shards(tmp_path, {"id": np.arange(100)}, chunk_size=16)  # the writer's default: one shard
    m = load_manifest(tmp_path)
    assert len(m.shards) == 1
    parts = [p for r in range(4) for p in read_epoch(m, r, 4, 3)]
    assert len(parts) == 12 and sorted(i for p in parts for i in p) == list(range(100))
    assert {len(p) for p in parts} == {8, 9}


def test_a_reader_opens_only_the_keys_it_needs(source, monkeypatch):
    m, n = source
    opened: list[tuple[str, int, int]] = []
    real = stream_module.read_shard

    def spy(url, *args, start=0, stop=None, **kw):
        opened.append((url, start, stop))
        return real(url, *args, start=start, stop=stop, **kw)

    monkeypatch.setattr(stream_module, "read_shard", spy)
    world = 8
    for rank in range(world):
        opened.clear()
        s = ShardStream(m, rank, world, seed=5, shuffle_buffer=24, fields=["id"], block_size=7)
        order = s.order(0)
        part = s.part(0, 0)
        got: list[int] = []
        for block in s.blocks(0):
            got += block.data["id"].tolist()
            if block.after.epoch:  # the part's last block: nothing of epoch 1 read yet
                break
        assert len(got) == length(part)
        wanted = {m.shard_url(i) for i in order.shards_of(part)}
        assert {u for u, _, _ in opened} == wanted
        keys = sum(b - a for _, a, b in opened)
        # whole windows only: at most the part's keys plus one window at each end
        per_key = 1 if m.layout == "sample" else m.chunk_size
        assert keys <= length(part) / per_key + 2 * order.layout.window_members + 2


def test_balanced_bounds_and_elastic_parts():
    assert [balanced_bounds(10, 4, i) for i in range(4)] == [(0, 3), (3, 6), (6, 8), (8, 10)]
    remaining = [(3, 10), (20, 25), (40, 41)]
    parts = [reader_part(remaining, 3, i) for i in range(3)]
    assert merge(p for part in parts for p in part) == remaining
    assert [length(p) for p in parts] == [5, 4, 4]


@pytest.mark.parametrize("total,block", [(1, 4), (7, 7), (8, 7), (5000, 4096), (8193, 4096), (12_288, 4096), (100, 3)])
def test_block_ends_cut_a_part_into_equal_blocks(total, block):
    """A reader's part is cut into ceil(total / block) blocks of at most `block`, equal to one
    sample (no short tail), and every position of a block names that block's end (a reader
    resumed inside a block ends it where an uninterrupted one does)."""
    ends, at = [], 0
    while at < total:
        ends.append(block_end(at, total, block))
        at = ends[-1]
    sizes = np.diff([0, *ends])
    assert len(ends) == -(-total // block) and ends[-1] == total
    assert sizes.max() <= block and sizes.max() - sizes.min() <= 1
    for start, end in zip([0, *ends], ends):
        assert {block_end(i, total, block) for i in range(start, end)} == {end}


def synthetic_manifest(rng: np.random.Generator, shards: int, chunk: int = 1024) -> Manifest:
    sizes = rng.integers(100, 2000, shards)
    infos = [ShardInfo(f"s{i}.tar", int(s), [chunk] * (int(s) // chunk) + ([int(s) % chunk] if s % chunk else []))
             for i, s in enumerate(sizes)]
    return Manifest("chunk", chunk, {"x": FieldInfo("float32", (4,))}, infos)


def test_plan_at_scale_1024_ranks_x_8_workers():
    """1,000 sources, 100,000 shards, 8,192 readers: the plan only (no data)."""
    rng = np.random.default_rng(0)
    readers = 1024 * 8
    opens = groups = 0
    for source in range(1000):
        m = synthetic_manifest(rng, 100)
        order = EpochOrder(SourceLayout.of(m, 8192), seed=1, salt=source, epoch=3)
        plan = plan_readers(order, readers)
        sizes = np.diff(plan.bounds)
        assert plan.bounds[0] == 0 and plan.bounds[-1] == m.total_samples  # coverage, no overlap
        assert sizes.min() >= 1 and sizes.max() - sizes.min() <= 1  # balance
        assert np.all(plan.first_shard <= plan.last_shard)
        starts = np.bincount(plan.first_shard, minlength=len(m.shards) + 1)
        ends = np.bincount(plan.last_shard + 1, minlength=len(m.shards) + 1)
        assert np.all(np.cumsum(starts - ends)[:-1] > 0)  # every shard has a reader
        opens += int((plan.last_shard - plan.first_shard + 1).sum())
        group_sizes = np.diff(order.group_shard)
        # A reader opens the shards of at most two windows' groups, not the source's 100.
        assert np.all(plan.last_shard - plan.first_shard + 1 <= 2 * group_sizes.max())
        groups += len(group_sizes)
        if source < 3:  # the vectorised plan agrees with one reader's own computation
            for r in rng.integers(0, readers, 20):
                part = reader_part([(0, m.total_samples)], readers, int(r))
                assert part == [(int(plan.bounds[r]), int(plan.bounds[r + 1]))]
                shards = {order.shard_at(i) for i in range(int(plan.first_shard[r]), int(plan.last_shard[r]) + 1)}
                assert set(order.shards_of(part)) <= shards
    # With ~13 samples per reader a reader reads its window's group (the shuffle needs it).
    assert opens / (1000 * readers) <= 2 * 100_000 / groups


def test_manifests_without_offsets_read_the_same_order(source):
    """Shards indexed before key offsets were recorded (or `pipe:` urls) are streamed through
    whole windows instead of read key by key: the samples and their order are the same."""
    import copy

    m, _ = source
    bare = copy.deepcopy(m)
    for shard in bare.shards:
        shard.offsets = []
    assert ShardStream(m, fields=["id"]).indexed and not ShardStream(bare, fields=["id"]).indexed
    for world, workers in ((1, 1), (3, 2)):
        got = [read_epoch(bare, r, world, workers) for r in range(world)]
        assert got == [read_epoch(m, r, world, workers) for r in range(world)]


def test_window_permutation_is_a_pure_function_of_its_key():
    from manytask.data_pipeline.partition import philox_permutation as window_permutation

    key = (5, 2**40 + 3, 7, 11)
    first = window_permutation(key, 1000)
    assert sorted(first.tolist()) == list(range(1000)) and first.tolist() != list(range(1000))
    window_permutation((1, 2, 3, 4), 77)  # other draws in between change nothing
    assert np.array_equal(window_permutation(key, 1000), first)
    for changed in ((6, *key[1:]), (key[0], key[1] + 1, *key[2:]), (*key[:2], 8, key[3]), (*key[:3], 12)):
        assert not np.array_equal(window_permutation(changed, 1000), first), changed
    # the same draws as a Philox generator built for the key, and from any thread
    bits = np.random.Philox(counter=np.array([0, 0, key[2], key[3]], np.uint64), key=np.array(key[:2], np.uint64))
    assert np.array_equal(np.random.Generator(bits).permutation(1000), first)
    with ThreadPoolExecutor(2) as pool:
        assert all(np.array_equal(p, first) for p in pool.map(lambda _: window_permutation(key, 1000), range(8)))


def test_both_window_generators_give_an_order_of_every_sample(source):
    m, n = source
    layout = SourceLayout.of(m, 24)
    orders = {rng: EpochOrder(layout, seed=5, salt=1, epoch=2, window_rng=rng) for rng in ("philox", "seed_sequence")}
    perms = {rng: [o.window_permutation(w, b - a).tolist() for w in range(o.n_windows) for a, b in [o.window_positions(w)]]
             for rng, o in orders.items()}
    for rng, windows in perms.items():
        assert all(sorted(p) == list(range(len(p))) for p in windows), rng
    assert perms["philox"] != perms["seed_sequence"]  # a checkpoint must say which one it used
    with pytest.raises(ValueError, match="window_rng"):
        EpochOrder(layout, 5, 1, 2, window_rng="mt19937")


def test_a_worker_keeping_shards_open_reads_the_same_order(source):
    """In a worker, shards stay open between windows (OpenFiles) and whole windows are streamed:
    each reader still reads exactly its part, also when readers interleave block by block and
    only one file may stay open (every switch closes the other reader's shard under it)."""
    from manytask.data_pipeline.remote import OpenFiles

    m, n = source
    world, workers = 2, 3
    alone = [p for r in range(world) for p in read_epoch(m, r, world, workers)]
    files = OpenFiles(limit=1)
    streams = [ShardStream(m, r, world, seed=5, shuffle_buffer=24, fields=["id"], splits_per_rank=workers, block_size=7)
               for r in range(world)]
    for s in streams:
        s.files = files
    gens = [s.blocks(w) for s in streams for w in range(workers)]
    got: list[list[int]] = [[] for _ in gens]
    live = set(range(len(gens)))
    while live:
        for k in sorted(live):
            block = next(gens[k])
            if block.before.epoch != 0:
                live.discard(k)
                continue
            got[k] += block.data["id"].tolist()
    assert got == alone
