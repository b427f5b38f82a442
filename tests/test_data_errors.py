"""Bad data fails loudly (naming shard and sample key) or, with skip_corrupt, is counted."""

from __future__ import annotations

import tarfile

import numpy as np
import pytest
import torch
from conftest import read_epoch as read_epoch_of
from webdataset import TarWriter

from manytask.config import config_from_dict
from manytask.data_pipeline.loader import MultiSourceLoader
from manytask.data_pipeline.manifest import (
    FieldInfo,
    Manifest,
    ShardInfo,
    load_manifest,
    write_manifest,
)
from manytask.data_pipeline.shard_reader import ShardError
from manytask.data_pipeline.shard_writer import TAR_MTIME, npy_bytes, write_shards
from manytask.schema import ConfigError

N = 192  # 3 shards x 64 samples, chunks of 16


def chunk_data(path, checksums=False):
    """Shards whose manifest lacks sizes and checksums (as for foreign shards) unless asked:
    these tests are about what the reader finds by itself; tests/test_shard_integrity.py
    covers the checksummed path."""
    rng = np.random.default_rng(0)
    write_shards(path, {"id": np.arange(N), "x": rng.standard_normal((N, 3)).astype(np.float32)},
                 samples_per_shard=64, chunk_size=16)
    m = load_manifest(path)
    if not checksums:
        for shard in m.shards:
            shard.bytes, shard.xxh3, shard.member_xxh3 = 0, "", []
    return m


def read_epoch(m: Manifest, skip: bool = False) -> tuple[list[int], int]:
    return read_epoch_of(m, skip, fields=["id", "x"])


def check_skip(m: Manifest) -> tuple[list[int], int]:
    got, skipped = read_epoch(m, skip=True)
    assert skipped > 0 and len(got) + skipped == m.total_samples
    assert len(set(got)) == len(got) and set(got) <= set(range(m.total_samples))
    return got, skipped


def test_truncated_tar(tmp_path):
    m = chunk_data(tmp_path)
    shard = tmp_path / "shard-000001.tar"
    whole = shard.read_bytes()
    cut = _member(shard, 5).offset_data + 100  # inside x.npy of the third key
    between = _member(shard, 4).offset  # between the second and the third key
    shard.write_bytes(whole[:cut])
    with pytest.raises(ShardError, match=r"shard-000001\.tar.*truncated tar at sample '0000000096'"):
        read_epoch(m)
    _, skipped = check_skip(m)
    assert skipped == 32  # the third 16-sample chunk and the fourth
    shard.write_bytes(whole[:between])
    # keys are read by their manifest offsets: the third is missing where the manifest puts it
    with pytest.raises(ShardError, match=r"ends after 2 of the 4 keys.*no key at byte \d+, where the manifest puts key 2"):
        read_epoch(m)


def _member(path, index):
    with tarfile.open(path) as tar:
        return tar.getmembers()[index]


def test_corrupt_tar_header(tmp_path):
    m = chunk_data(tmp_path)
    shard = tmp_path / "shard-000002.tar"
    info = _member(shard, 4)  # first member of the third key
    data = bytearray(shard.read_bytes())
    data[info.offset : info.offset + 512] = b"\xff" * 512
    shard.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=r"shard-000002\.tar.*corrupt or truncated tar at key 2 \(byte \d+; ReadError: not a tar header"):
        read_epoch(m)
    _, skipped = check_skip(m)
    assert skipped == 16  # only the broken key: the fourth is found at its manifest offset


def test_corrupt_npy_bytes(tmp_path):
    m = chunk_data(tmp_path)
    shard = tmp_path / "shard-000000.tar"
    info = _member(shard, 3)  # x.npy of the second key
    data = bytearray(shard.read_bytes())
    data[info.offset_data : info.offset_data + 6] = b"garbag"
    shard.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=r"shard-000000\.tar.*sample '0000000016'.*field 'x'.*unreadable \.npy"):
        read_epoch(m)
    _, skipped = check_skip(m)
    assert skipped == 16


def test_missing_shard(tmp_path):
    m = chunk_data(tmp_path)
    (tmp_path / "shard-000001.tar").unlink()
    with pytest.raises(ShardError, match=r"shard-000001\.tar.*cannot open shard.*no sample key"):
        read_epoch(m)
    _, skipped = check_skip(m)
    assert skipped == 64


def test_loader_counts_skipped_samples(tmp_path):
    chunk_data(tmp_path / "a")
    (tmp_path / "a" / "shard-000001.tar").unlink()
    cfg = config_from_dict({
        "data": {"batch_size": 32, "skip_corrupt": True,
                 "sources": [{"name": "a", "train": str(tmp_path / "a"), "inputs": ["x"], "labels": {"t": "id"}}]},
        "tasks": {"t": {"type": "multiclass"}},
    })
    with MultiSourceLoader(cfg) as loader:
        for _ in range(5):
            loader.next_batch([26])  # 130 = the 128 readable samples of epoch 0, and one more
        assert loader.skipped()["a"] in (64, 128)
        assert loader.state_dict()["sources"]["a"]["positions"][0][2] == loader.skipped()["a"]


GOOD = np.arange(3, dtype=np.float32)
BAD_SAMPLES = {
    "unreadable": ({"x.npy": b"\x93NUMPY not really"}, r"field 'x': unreadable \.npy"),
    "missing": ({}, r"missing field 'x'"),
    "dtype": ({"x.npy": npy_bytes(GOOD.astype(np.float64))}, r"field 'x': got float64 \[3\], manifest says float32 \[3\]"),
    "shape": ({"x.npy": npy_bytes(np.zeros(4, np.float32))}, r"field 'x': got float32 \[4\], manifest says float32 \[3\]"),
}


@pytest.mark.parametrize("case", list(BAD_SAMPLES))
def test_bad_sample(tmp_path, case):
    members, message = BAD_SAMPLES[case]
    with open(tmp_path / "s.tar", "wb") as f, TarWriter(f, encoder=False, mtime=TAR_MTIME) as tw:
        for i in range(10):
            sample = {"__key__": f"k{i:03d}", "id.cls": str(i).encode(), "x.npy": npy_bytes(GOOD)}
            if i == 3:
                sample = {"__key__": "k003", "id.cls": b"3", **members}
            tw.write(sample)
    fields = {"id": FieldInfo("int64", (), "cls"), "x": FieldInfo("float32", (3,))}
    m = Manifest("sample", 1, fields, [ShardInfo("s.tar", 10, [1] * 10)])
    write_manifest(m, tmp_path)
    with pytest.raises(ShardError, match=rf"s\.tar.*sample 'k003'.*{message}"):
        read_epoch(m)
    got, skipped = check_skip(m)
    assert skipped == 1 and 3 not in got


def cfg_for(sources, tasks=None, **data):
    return config_from_dict({"data": {"sources": sources, **data}, "tasks": tasks or {"t": {"type": "regression"}}})


def test_empty_source(tmp_path):
    write_shards(tmp_path / "e", {"x": np.zeros((0, 3), np.float32), "y": np.zeros(0, np.float32)})
    cfg = cfg_for([{"name": "empty", "train": str(tmp_path / "e"), "inputs": ["x"], "labels": {"t": "y"}}])
    with pytest.raises(ConfigError, match=r"data\.sources\.empty\.train: .*manifest\.json lists no samples"):
        MultiSourceLoader(cfg)


def test_config_checks_against_manifests(tmp_path):
    write_shards(tmp_path / "a", {"x": np.zeros((40, 3), np.float32), "y": np.zeros(40, np.float32)}, 20, 8)
    write_shards(tmp_path / "b", {"x": np.zeros((40, 5), np.float32), "y": np.zeros(40, np.float32)}, 20, 8)
    a = {"name": "a", "train": str(tmp_path / "a"), "inputs": ["x"], "labels": {"t": "y"}}
    b = {"name": "b", "train": str(tmp_path / "b"), "inputs": ["x"], "labels": {"t": "y"}}
    with pytest.raises(ConfigError, match=r"data\.sources\.a\.inputs: field 'z' is not in .*a/manifest\.json"):
        MultiSourceLoader(cfg_for([{**a, "inputs": ["z"]}]))
    with pytest.raises(ConfigError, match=r"input field 'x': float32 \[3\] in source 'a'.*float32 \[5\] in source 'b'"):
        MultiSourceLoader(cfg_for([a, b]))
    with pytest.raises(ConfigError, match=r"source 'a' .*40 samples cannot feed 64 readers.*Fix"):
        MultiSourceLoader(cfg_for([a], num_workers=2), rank=0, world_size=32)
    with pytest.raises(ConfigError, match=r"data\.sources\.a\.train: .*nowhere.*no manifest found"):
        MultiSourceLoader(cfg_for([{**a, "train": str(tmp_path / "nowhere")}]))


def test_state_loads_with_weights_only(tmp_path):
    write_shards(tmp_path / "a", {"x": np.zeros((40, 3), np.float32), "y": np.zeros(40, np.float32)}, 20, 8)
    cfg = cfg_for([{"name": "a", "train": str(tmp_path / "a"), "inputs": ["x"], "labels": {"t": "y"}}])
    with MultiSourceLoader(cfg) as loader:
        loader.next_batch([7])
        torch.save(loader.state_dict(), tmp_path / "s.pt")
    state = torch.load(tmp_path / "s.pt", weights_only=True)
    assert state["sources"]["a"]["drop"] == 7
