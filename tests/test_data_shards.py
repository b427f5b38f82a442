"""Writing, indexing, inspecting and converting shards; manifests; synthetic data."""

from __future__ import annotations

import json
import tarfile

import numpy as np
import pandas as pd
import pytest
import webdataset as wds

from manytask.data_pipeline.manifest import ManifestError, load_manifest, manifest_from_dict
from manytask.data_pipeline.shard_reader import read_shard
from manytask.data_pipeline.shard_tools import convert_table, index_shards, inspect
from manytask.data_pipeline.shard_writer import write_shards
from manytask.data_pipeline.stream import ShardStream, stack_members
from manytask.data_pipeline.synthetic import mmoe_pair, prepare_demo, timeseries


def arrays(n=50, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "id": np.arange(n),
        "x": rng.standard_normal((n, 2, 3)).astype(np.float32),
        "y": rng.standard_normal(n).astype(np.float32),
        "tags": rng.integers(0, 2, (n, 4)).astype(np.int64),
    }


def read_all(m) -> dict[str, np.ndarray]:
    parts = []
    for s, shard in enumerate(m.shards):
        parts += [d for _, _, d in read_shard(m.shard_url(s), m.fields, m.layout, shard.members)]
    return stack_members(parts, m.fields, m.layout)


@pytest.mark.parametrize("layout", ["chunk", "sample"])
def test_write_read_roundtrip(tmp_path, layout):
    data = arrays()
    written = write_shards(tmp_path, data, samples_per_shard=20, chunk_size=8, layout=layout,
                           exts={"tags": "json"} if layout == "sample" else None)
    m = load_manifest(tmp_path)
    assert m.to_json() == written.to_json()
    assert m.layout == layout and m.total_samples == 50 and len(m.shards) == 3
    assert m.shards[0].members == ([8, 8, 4] if layout == "chunk" else [1] * 20)
    assert m.fields["x"].shape == (2, 3) and m.fields["id"].vocab == 50
    assert m.fields["id"].ext == ("cls" if layout == "sample" else "npy")
    back = read_all(m)
    for k, v in data.items():
        np.testing.assert_array_equal(back[k], v)
    with tarfile.open(tmp_path / "shard-000000.tar") as tar:  # integer mtime: no PAX headers
        assert all(not t.pax_headers and t.mtime == 0 for t in tar.getmembers())


@pytest.mark.parametrize("batches", [[250], [3, 100, 1, 146], [17] * 14 + [12]])
def test_sink_writes_the_bytes_webdataset_writes(tmp_path, batches, monkeypatch):
    """ShardSink lays full keys out with numpy in blocks (and single keys, keys straddling two
    `add` calls, short last keys one by one): every shard must be the tar webdataset's
    TarWriter writes for the same samples, and the manifest's size, whole-file and per-key xxh3
    and key offsets must describe those bytes."""
    import io

    from manytask.data_pipeline import shard_writer
    from manytask.data_pipeline.integrity import file_digest, member_digests
    from manytask.data_pipeline.shard_writer import TAR_MTIME, ShardSink, infer_fields, npy_bytes

    monkeypatch.setattr(shard_writer, "BLOCK_BYTES", 2000)  # several blocks per add
    data = arrays(250)
    sink = ShardSink(tmp_path, infer_fields(data, "chunk"), samples_per_shard=90, chunk_size=8)
    lo = 0
    for n in batches:
        sink.add({k: v[lo : lo + n] for k, v in data.items()})
        lo += n
    m = sink.close()
    assert [s.members for s in m.shards] == [[8] * 11 + [2], [8] * 11 + [2], [8] * 8 + [6]]
    start = 0
    for shard in m.shards:
        expected = io.BytesIO()
        writer = wds.TarWriter(expected, mtime=TAR_MTIME, encoder=False)
        for rows in shard.members:
            writer.write({"__key__": f"{start:010d}", **{
                f"{k}.npy": npy_bytes(v[start : start + rows]) for k, v in data.items()}})
            start += rows
        writer.close()
        path = tmp_path / shard.url
        assert path.read_bytes() == expected.getvalue(), shard.url
        assert (shard.bytes, shard.xxh3) == file_digest(path)
        assert shard.member_xxh3 == [d for _, d in member_digests(path)]
        with tarfile.open(path) as tar:  # where each key's first header starts
            firsts = {}
            for info in tar.getmembers():
                firsts.setdefault(info.name.split(".")[0], info.offset)
        assert shard.offsets == list(firsts.values())
    back = read_all(load_manifest(tmp_path))
    for k, v in data.items():
        np.testing.assert_array_equal(back[k], v)


def test_manifest_urls_brace_and_pipe(tmp_path):
    write_shards(tmp_path, arrays(), samples_per_shard=20, chunk_size=8)
    doc = json.loads((tmp_path / "manifest.json").read_text())
    shards = doc["shards"]
    doc["shards"] = [
        {"url": "shard-{000000..000001}.tar", "samples": [s["samples"] for s in shards[:2]],
         "members": [s["members"] for s in shards[:2]]},
        {"url": f"pipe:cat {tmp_path / 'shard-000002.tar'}", "samples": 10, "members": [8, 2]},
    ]
    m = manifest_from_dict(doc, str(tmp_path / "manifest.json"))
    assert [s.url for s in m.shards][:2] == ["shard-000000.tar", "shard-000001.tar"]
    np.testing.assert_array_equal(read_all(m)["id"], np.arange(50))


def test_manifest_errors_name_file_and_key(tmp_path):
    with pytest.raises(ManifestError, match=r"nothing.*no manifest found"):
        load_manifest(tmp_path / "nothing")
    (tmp_path / "manifest.json").write_text(json.dumps({
        "version": 1, "layout": "chunk", "chunk_size": 8,
        "fields": {"x": {"dtype": "float32", "shape": [3]}},
        "shards": [{"url": "a.tar", "samples": 10, "members": [8, 1]}],
    }))
    with pytest.raises(ManifestError, match=r"manifest\.json: 'shards\[0\]\.members' sums to 9 but 'samples' is 10"):
        load_manifest(tmp_path)


def test_foreign_sample_shards_are_indexed_and_read(tmp_path):
    with wds.ShardWriter(str(tmp_path / "f-%06d.tar"), maxcount=30, verbose=0) as w:
        for i in range(100):
            w.write({"__key__": f"s{i:05d}", "x.npy": np.full(4, i, np.float32), "label.cls": i % 3})
    m = index_shards(tmp_path)
    assert m.layout == "sample" and [s.samples for s in m.shards] == [30, 30, 30, 10]
    assert m.fields["label"].ext == "cls" and m.fields["label"].vocab == 3
    assert m.fields["x"].shape == (4,)
    assert load_manifest(tmp_path).to_json() == m.to_json()
    stream = ShardStream(m, shuffle_buffer=16, fields=["x", "label"], block_size=7)
    got = []
    for block in stream.blocks():
        if block.before.epoch:
            break
        got += block.data["x"][:, 0].tolist()
        assert np.all(block.data["label"] == block.data["x"][:, 0].astype(int) % 3)
    assert sorted(got) == list(range(100))
    text = inspect(tmp_path)
    assert "layout:   sample" in text and "label  int64" in text and "sample 0 (key 's00000'" in text


def test_foreign_chunk_shards_need_the_layout_flag(tmp_path):
    with wds.ShardWriter(str(tmp_path / "c-%06d.tar"), maxcount=3, verbose=0) as w:
        for i in range(5):
            w.write({"__key__": f"k{i}", "x.npy": np.arange(i * 10, i * 10 + 10, dtype=np.float32)[:, None],
                     "y.npy": np.ones(10, np.int64)})
    m = index_shards(str(tmp_path / "c-{000000..000001}.tar"), layout="chunk")
    assert m.layout == "chunk" and m.chunk_size == 10 and m.total_samples == 50
    assert m.fields["x"].shape == (1,) and m.shards[0].members == [10, 10, 10]
    np.testing.assert_array_equal(read_all(m)["x"][:, 0], np.arange(50))


@pytest.mark.parametrize("fmt", ["csv", "parquet", "npz"])
def test_convert_table(tmp_path, fmt):
    n = 60
    rng = np.random.default_rng(0)
    cols = {"f1": rng.standard_normal(n), "f2": rng.standard_normal(n), "cat": rng.integers(0, 5, n),
            "y": np.where(np.arange(n) % 7 == 0, np.nan, rng.standard_normal(n)), "row": np.arange(n)}
    path = tmp_path / f"t.{fmt}"
    if fmt == "csv":
        pd.DataFrame(cols).to_csv(path, index=False)
    elif fmt == "parquet":
        pd.DataFrame(cols).to_parquet(path)
    else:
        np.savez(path, **cols)
    out = convert_table(path, tmp_path / "out", features=["x=f*", "cat", "row"], targets=["y"],
                        samples_per_shard=16, chunk_size=8, val_fraction=0.25, seed=1)
    train, val = out["train"], out["val"]
    assert (train.total_samples, val.total_samples) == (45, 15)
    assert train.fields["x"].shape == (2,) and train.fields["x"].dtype == "float32"
    assert train.fields["cat"].dtype == "int64" and train.fields["cat"].vocab == val.fields["cat"].vocab == 5
    got = {k: np.concatenate([read_all(load_manifest(tmp_path / "out" / s))[k] for s in ("train", "val")])
           for k in ("row", "x", "y")}
    order = np.argsort(got["row"])
    np.testing.assert_array_equal(got["row"][order], np.arange(n))
    np.testing.assert_allclose(got["x"][order], np.stack([cols["f1"], cols["f2"]], 1).astype(np.float32))
    np.testing.assert_array_equal(np.isnan(got["y"][order]), np.isnan(cols["y"]))


def test_synthetic_data(tmp_path):
    d = mmoe_pair(4000, dim=8, correlation=1.0, seed=0, noise=0.0)
    np.testing.assert_allclose(d["y_a"], d["y_b"], atol=1e-5)  # p = 1: identical tasks
    d = mmoe_pair(4000, dim=8, correlation=0.0, seed=0)
    assert abs(np.corrcoef(d["y_a"], d["y_b"])[0, 1]) < 0.2
    assert d["click"].mean() == pytest.approx(0.5, abs=0.01)
    ts = timeseries(64, length=32, channels=2, horizon=4, classes=4)
    assert ts["series"].shape == (64, 32, 2) and ts["forecast"].shape == (64, 4)
    assert set(np.unique(ts["label"])) <= {0, 1, 2, 3}
    out = prepare_demo(tmp_path / "demo", n_train=4000, n_val=400, shards=4, chunk_size=256)
    assert out["train"].total_samples == 4000 and len(out["train"].shards) == 4
    assert out["val"].total_samples == 400 and out["train"].fields["click"].vocab == 2
    assert set(out["train"].fields) == {"x", "y_a", "y_b", "click"}
