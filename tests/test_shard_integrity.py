"""Verified shards: the manifest records sizes and xxh3 checksums, and damage is named."""

from __future__ import annotations

import json
import logging
import re

import numpy as np
import pytest
import webdataset as wds
from conftest import read_epoch

from manytask.data_pipeline.manifest import load_manifest
from manytask.data_pipeline.prepare import prepare_hint
from manytask.data_pipeline.shard_reader import ShardError
from manytask.data_pipeline.shard_tools import index_shards, inspect, verify
from manytask.data_pipeline.shard_writer import write_shards
from manytask.data_pipeline.stream import ShardStream

N = 4096  # 2 shards x 2048 samples in chunks of 256: ~100 KiB per shard


def dataset(path):
    rng = np.random.default_rng(0)
    write_shards(path, {"id": np.arange(N), "x": rng.standard_normal((N, 8)).astype(np.float32)},
                 samples_per_shard=N // 2, chunk_size=256)
    return load_manifest(path)




def test_manifest_records_size_and_checksums(tmp_path):
    m = dataset(tmp_path)
    for shard in m.shards:
        path = tmp_path / shard.url
        assert shard.bytes == path.stat().st_size
        assert len(shard.xxh3) == 16 and len(shard.member_xxh3) == len(shard.members) == 8
    assert verify(tmp_path) == (2, [])


def test_random_bytes_in_the_middle_of_a_shard_are_named(tmp_path, caplog):
    m = dataset(tmp_path)
    shard = tmp_path / "shard-000001.tar"
    data = bytearray(shard.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 4096] = np.random.default_rng(1).bytes(4096)  # same size, new bytes
    shard.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=r"shard-000001\.tar.*(checksum mismatch|corrupt)"):
        read_epoch(m)
    with caplog.at_level(logging.WARNING):
        got, skipped = read_epoch(m, skip=True)
    assert skipped > 0 and len(got) + skipped == N
    assert set(got) >= set(range(N // 2))  # the intact shard is read whole
    assert any("shard-000001.tar" in r.getMessage() for r in caplog.records)
    count, problems = verify(tmp_path)
    assert count == 2 and problems and all("shard-000001.tar" in p for p in problems)


def test_truncated_shard_is_named_before_reading(tmp_path):
    m = dataset(tmp_path)
    shard = tmp_path / "shard-000000.tar"
    whole = shard.read_bytes()
    shard.write_bytes(whole[: len(whole) - 3000])
    with pytest.raises(ShardError, match=r"shard-000000\.tar.*manifest records \d+ \(truncated\)"):
        read_epoch(m)
    got, skipped = read_epoch(m, skip=True)
    assert skipped == N // 2 and sorted(got) == list(range(N // 2, N))
    with pytest.raises(ShardError, match=r"(?s)1 of 2 shards.*shard-000000\.tar.*truncated"):
        inspect(tmp_path)
    (tmp_path / "shard-000000.tar").unlink()
    with pytest.raises(ShardError, match=r"(?s)shard-000000\.tar.*no such file"):
        inspect(tmp_path)


def test_verify_command_exit_status(tmp_path, capsys):
    from manytask.launch.cli import main

    dataset(tmp_path)
    assert main(["shards", "verify", str(tmp_path)]) == 0
    assert "all verified" in capsys.readouterr().out
    shard = tmp_path / "shard-000001.tar"
    data = bytearray(shard.read_bytes())
    data[5000] ^= 0xFF  # flipped bits in a payload
    shard.write_bytes(bytes(data))
    assert main(["shards", "verify", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "shard-000001.tar" in out and "xxh3" in out


def test_index_records_checksums_of_foreign_shards(tmp_path):
    with wds.ShardWriter(str(tmp_path / "f-%06d.tar"), maxcount=50, verbose=0) as sink:
        for i in range(120):
            sink.write({"__key__": f"{i:06d}", "x.npy": np.full(3, i, np.float32), "y.cls": i % 2})
    m = index_shards(tmp_path)
    assert all(s.bytes and s.xxh3 and len(s.member_xxh3) == s.samples for s in m.shards)
    assert verify(tmp_path) == (3, [])
    data = bytearray((tmp_path / "f-000002.tar").read_bytes())
    data[len(data) // 3] ^= 0x01
    (tmp_path / "f-000002.tar").write_bytes(bytes(data))
    assert verify(tmp_path)[1] and "f-000002.tar" in verify(tmp_path)[1][0]


def test_missing_bundled_data_suggests_data_prepare():
    assert "manytask data prepare movielens" in prepare_hint("data/movielens/train")
    assert prepare_hint("/somewhere/else/train") == ""


def test_first_nonfinite_input_is_named_or_skipped_by_policy(tmp_path, caplog):
    x = np.random.default_rng(0).standard_normal((N, 8)).astype(np.float32)
    x[1000, 3] = np.inf
    x[3000, 0] = np.nan
    y = np.ones(N, np.float32)
    y[::5] = np.nan  # a missing label is not an input problem
    write_shards(tmp_path, {"id": np.arange(N), "x": x, "y": y}, samples_per_shard=N // 2, chunk_size=256)
    m = load_manifest(tmp_path)
    stream = ShardStream(m, shuffle_buffer=0, name="clicks", check_finite=["x", "id"])
    with pytest.raises(ShardError, match=r"source 'clicks': non-finite .* input field 'x' at sample key "
                                         r"'0000000768' row 232 .*shard-000000\.tar"):
        for _ in stream.blocks():
            pass
    skipping = ShardStream(m, shuffle_buffer=0, name="clicks", check_finite=["x"], on_nonfinite="skip")
    got, skipped = [], 0
    with caplog.at_level(logging.WARNING):
        for block in skipping.blocks():
            if block.before.epoch:
                break
            got += block.data["id"].tolist()
            skipped = block.after.skipped
    assert skipped == 2 and sorted(got) == sorted(set(range(N)) - {1000, 3000})
    assert any("input field 'x'" in r.getMessage() for r in caplog.records)


def test_training_loader_checks_inputs_not_labels(tmp_path):
    from manytask.config import load_config
    from manytask.data_pipeline.loader import MultiSourceLoader
    from manytask.data_pipeline.validation import val_batches
    from manytask.schema import ConfigError
    from tests.conftest import write_recipe

    rng = np.random.default_rng(0)
    data = {"x": rng.standard_normal((512, 4)).astype(np.float32), "y_a": rng.standard_normal(512).astype(np.float32),
            "y_b": np.full(512, np.nan, np.float32), "click": rng.integers(0, 2, 512)}
    for split in ("train", "val"):
        write_shards(tmp_path / "d" / split, data, 256, 64, prefix=split, vocab={"click": 2})
    recipe = write_recipe(tmp_path, tmp_path / "d")
    with MultiSourceLoader(load_config(recipe)) as loader:  # NaN labels only: masked, no error
        assert loader.next_batch([256]).masks["regress_b"].sum() == 0
    data["x"][7, 1] = np.nan
    write_shards(tmp_path / "d" / "train", data, 256, 64, prefix="train", vocab={"click": 2})
    with MultiSourceLoader(load_config(recipe)) as loader, pytest.raises(ShardError, match=r"input field 'x'"):
        for _ in range(4):
            loader.next_batch([256])
    with MultiSourceLoader(load_config(recipe, ["data.on_nonfinite_input=skip"])) as loader:
        for _ in range(4):
            loader.next_batch([256])
        assert sum(loader.skipped().values()) >= 1
    with MultiSourceLoader(load_config(recipe, ["data.on_nonfinite_input=allow"])) as loader:
        seen = [loader.next_batch([256]).inputs["x"] for _ in range(4)]
        assert any(bool(x.isnan().any()) for x in seen) and sum(loader.skipped().values()) == 0
    write_shards(tmp_path / "d" / "val", data, 256, 64, prefix="val", vocab={"click": 2})
    with pytest.raises(ShardError, match=r"source 'synthetic'.*input field 'x' at sample key '0000000000' row 7"):
        list(val_batches(load_config(recipe)))
    kept = list(val_batches(load_config(recipe, ["data.on_nonfinite_input=skip"])))
    assert sum(len(b) for b in kept) == 511
    with pytest.raises(ConfigError, match="on_nonfinite_input"):
        load_config(recipe, ["data.on_nonfinite_input=ignore"])


def test_a_corrupt_shard_skipped_in_training_is_named_in_train_log(tmp_path):
    from manytask.config import load_config
    from manytask.trainer.loop import train
    from tests.conftest import write_recipe

    rng = np.random.default_rng(0)
    data = {"x": rng.standard_normal((2048, 4)).astype(np.float32),
            "y_a": rng.standard_normal(2048).astype(np.float32),
            "y_b": rng.standard_normal(2048).astype(np.float32), "click": rng.integers(0, 2, 2048)}
    for split in ("train", "val"):
        write_shards(tmp_path / "d" / split, data, 512, 128, prefix=split, vocab={"click": 2})
    shard = tmp_path / "d/train/train-000002.tar"
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2 : len(raw) // 2 + 4096] = rng.bytes(4096)
    shard.write_bytes(bytes(raw))
    recipe = write_recipe(tmp_path, tmp_path / "d", logging={"wandb": False, "progress": False, "heatmap_every": 0})
    train(load_config(recipe, ["data.skip_corrupt=true", "trainer.max_steps=20", "trainer.log_every=10"]))
    log = (tmp_path / "run/train.log").read_text()
    # a damaged header loses its key (keys are read by their manifest offsets), a checksum
    # mismatch the rest of the shard: either way the warning names the shard
    assert re.search(r"train-000002\.tar.*skipping (that key|the rest of the shard)", log)
    rows = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert max(r.get("data/synthetic/skipped", 0) for r in rows) > 0
