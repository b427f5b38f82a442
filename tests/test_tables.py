"""Raw tables in: string categories, vocabularies, hashing, multi-valued columns, numeric
statistics and missing values, from real CSV and Parquet files to what the model sees."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from manytask.data_pipeline.manifest import load_manifest
from manytask.data_pipeline.preprocess import MissingValueError, Preprocessor, SpecError
from manytask.data_pipeline.shard_reader import read_shard
from manytask.data_pipeline.shard_tools import convert_table
from manytask.data_pipeline.stream import stack_members
from manytask.launch.cli import main

CITIES = ["paris", "lyon", "nice", "lille", "brest"]
GENRES = ["Action", "Comedy", "Drama", "Horror"]


def use_kernels(kind: str, monkeypatch) -> None:
    """shards write's compiled loops (data_pipeline/encode_kernels.c, built by `pip install -e .`)
    or the numpy code that stands in for them where they are not built."""
    from manytask.data_pipeline import compiled_kernels

    if kind == "numpy":
        monkeypatch.setenv("MANYTASK_NO_COMPILED_KERNELS", "1")
    else:
        monkeypatch.delenv("MANYTASK_NO_COMPILED_KERNELS", raising=False)
    compiled_kernels.library.cache_clear()
    if kind == "compiled" and compiled_kernels.library() is None:
        why = "data_pipeline/_encode_kernels*.so is not built, or stale: `pip install -e .` with a C compiler builds it"
        # The library is optional (no compiler: numpy); `make test` requires it, so CI runs it.
        assert os.environ.get("MANYTASK_REQUIRE_COMPILED_KERNELS") != "1", why
        pytest.skip(why)


@pytest.fixture(params=["compiled", "numpy"])
def kernels(request, monkeypatch):
    """The test runs with the compiled loops, then with numpy's."""
    from manytask.data_pipeline import compiled_kernels

    use_kernels(request.param, monkeypatch)
    yield request.param
    monkeypatch.undo()
    compiled_kernels.library.cache_clear()


def raw_table(n=400, seed=0) -> pd.DataFrame:
    """A recommender-style table: string categories (one rare), a delimited multi-valued column,
    an id column, numbers with gaps and labels with gaps."""
    rng = np.random.default_rng(seed)
    city = rng.choice(CITIES, n, p=[0.4, 0.3, 0.2, 0.09, 0.01]).astype(object)
    city[::37] = ""  # empty strings: the unseen/empty id
    genres = ["|".join(rng.choice(GENRES, rng.integers(0, 4), replace=False)) for _ in range(n)]
    income = rng.normal(50_000, 10_000, n)
    income[::11] = np.nan
    y = rng.normal(size=n)
    y[::13] = np.nan
    return pd.DataFrame({
        "row": np.arange(n), "city": city, "genres": genres,
        "user_id": [f"u{i % 97:05d}" for i in range(n)], "age": rng.integers(18, 80, n).astype(float),
        "income": income, "y": y, "click": rng.integers(0, 2, n),
    })


def read_split(folder) -> dict[str, np.ndarray]:
    m = load_manifest(folder)
    parts = []
    for s, shard in enumerate(m.shards):
        parts += [d for _, _, d in read_shard(m.shard_url(s), m.fields, m.layout, shard.members, shard=shard)]
    return stack_members(parts, m.fields, m.layout)


SPECS = ["row", "city:cat", "genres:multi:k=3:sep=|", "user=user_id:hash=64", "age:num",
         "income:num:fill=mean"]


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_csv_and_parquet_tables_become_fields_with_training_vocabularies(tmp_path, fmt, kernels):
    df = raw_table()
    path = tmp_path / f"t.{fmt}"
    if fmt == "csv":
        df.to_csv(path, index=False)
    else:  # Parquet keeps genres as a real list<string> column
        table = pa.Table.from_pandas(df.assign(genres=[g.split("|") if g else [] for g in df.genres]))
        pq.write_table(table, path)
    out = convert_table(path, tmp_path / "out", features=SPECS, targets=["y", "click"],
                        samples_per_shard=128, chunk_size=32, val_fraction=0.25, seed=3, batch_rows=100)
    train, val = out["train"], out["val"]
    assert (train.total_samples, val.total_samples) == (300, 100)
    prep = train.preprocessing
    # The vocabulary is the training split's, most frequent first, in a readable file
    vocab = (tmp_path / "out/train/vocab/city.txt").read_text().splitlines()
    assert set(vocab) <= set(CITIES) and "" not in vocab
    assert prep["city"]["size"] == len(vocab) + 1 and train.fields["city"].vocab == len(vocab) + 1
    assert val.fields["city"].vocab == train.fields["city"].vocab  # val uses train's vocabulary
    assert (tmp_path / "out/val/vocab/city.txt").read_text().splitlines() == vocab
    assert train.fields["genres"].shape == (3,) and prep["genres"]["pad"] == 0
    assert train.fields["user"].vocab == 64 and train.fields["income_missing"].dtype == "float32"
    got = {s: read_split(tmp_path / "out" / s) for s in ("train", "val")}
    rows = np.concatenate([got["train"]["row"], got["val"]["row"]])
    assert sorted(rows.tolist()) == list(range(400))
    # an int field without a vocabulary: max + 1 over every batch of both splits, in each
    assert {s: load_manifest(tmp_path / "out" / s).fields["row"].vocab for s in got} == {"train": 400, "val": 400}
    for split in ("train", "val"):
        g = got[split]
        src = df.iloc[g["row"]]
        ids = np.array([vocab.index(c) + 1 if c in vocab else 0 for c in src.city])
        np.testing.assert_array_equal(g["city"], ids)
        assert (g["city"][src.city.to_numpy() == ""] == 0).all()
        # genres: ids 2.. in a row, then padding 0; as many ids as the row had genres
        counts = [len(x.split("|")) if x else 0 for x in src.genres]
        np.testing.assert_array_equal((g["genres"] > 0).sum(1), counts)
        assert (g["genres"][np.array(counts) == 0] == 0).all()
        np.testing.assert_array_equal(np.isnan(g["y"]), np.isnan(src.y.to_numpy()))
        np.testing.assert_array_equal(g["income_missing"], np.isnan(src.income.to_numpy()))
    # numeric statistics come from the training split and standardise it
    train_src = df.iloc[got["train"]["row"]]
    assert prep["age"]["mean"][0] == pytest.approx(train_src.age.mean())
    assert prep["age"]["std"][0] == pytest.approx(train_src.age.std(ddof=0))
    assert got["train"]["age"].mean() == pytest.approx(0, abs=1e-5)
    filled = got["train"]["income"][got["train"]["income_missing"] == 1]
    assert np.allclose(filled, 0, atol=1e-5)  # fill=mean is 0 after standardising
    # the same users hash to the same ids in both splits, and the serving-side encoder agrees
    enc = Preprocessor.from_manifest(tmp_path / "out/train").encode(df.iloc[got["val"]["row"]])
    for name in ("city", "genres", "user", "age", "income", "income_missing", "y"):
        np.testing.assert_allclose(enc[name], got["val"][name], rtol=1e-6)


def test_unseen_values_at_validation_map_to_the_unseen_id(tmp_path):
    df = raw_table(200)
    df.loc[:, "city"] = "paris"
    df.loc[df.index % 4 == 0, "city"] = "atlantis"  # only in val: every 4th row is val below
    path = tmp_path / "t.csv"
    df.to_csv(path, index=False)
    out = convert_table(path, tmp_path / "out", ["city:cat", "row"], ["click"], val_fraction=0.25, seed=0)
    vocab = (tmp_path / "out/train/vocab/city.txt").read_text().splitlines()
    val = read_split(tmp_path / "out/val")
    atlantis = df.city.to_numpy()[val["row"]] == "atlantis"
    if "atlantis" in vocab:  # the split put some into train: then it is a known value
        assert (val["city"][atlantis] > 0).all()
    else:
        assert atlantis.any() and (val["city"][atlantis] == 0).all()
    assert out["val"].fields["city"].vocab == out["train"].fields["city"].vocab
    # an int field without a vocabulary: max + 1 over both splits, the same in each
    written = {s: load_manifest(tmp_path / "out" / s).fields["row"].vocab for s in ("train", "val")}
    assert written == {"train": df.row.max() + 1, "val": df.row.max() + 1}
    # a new raw value at serving time is the unseen id too, never an error
    prep = Preprocessor.from_manifest(tmp_path / "out/train")
    assert prep.encode({"city": np.array(["never-seen", "paris"])}, ["city"])["city"].tolist() == [0, 1]


def test_min_count_and_max_vocab_cut_the_vocabulary(tmp_path):
    df = raw_table(500)
    path = tmp_path / "t.parquet"
    df.to_parquet(path)
    convert_table(path, tmp_path / "a", ["city:cat:min_count=10"], ["click"], val_fraction=0)
    convert_table(path, tmp_path / "b", ["city:cat:max_vocab=2"], ["click"], val_fraction=0)
    counts = df.city[df.city != ""].value_counts()
    assert (tmp_path / "a/train/vocab/city.txt").read_text().splitlines() == list(counts[counts >= 10].index)
    assert (tmp_path / "b/train/vocab/city.txt").read_text().splitlines() == list(counts.index[:2])


def test_missing_numeric_input_is_refused_naming_column_and_row(tmp_path):
    df = raw_table(50)
    path = tmp_path / "t.csv"
    df.to_csv(path, index=False)
    with pytest.raises(MissingValueError, match=r"column 'income'.*row 0 .*fill=0"):
        convert_table(path, tmp_path / "out", ["income:num"], ["y"])


def test_bad_specs_are_named(tmp_path):
    path = tmp_path / "t.csv"
    raw_table(20).to_csv(path, index=False)
    with pytest.raises(SpecError, match=r"'town:cat'.*no column 'town'"):
        convert_table(path, tmp_path / "a", ["town:cat"], ["y"])
    with pytest.raises(SpecError, match=r"'city:num'.*numeric field needs numeric columns"):
        convert_table(path, tmp_path / "b", ["city:num"], ["y"])
    with pytest.raises(SpecError, match=r"'genres:multi'.*k=N"):
        convert_table(path, tmp_path / "c", ["genres:multi"], ["y"])
    with pytest.raises(SpecError, match=r"unknown option 'colour'"):
        convert_table(path, tmp_path / "d", ["city:cat:colour"], ["y"])


def test_write_refuses_a_non_empty_folder_without_force(tmp_path, capsys):
    path = tmp_path / "t.csv"
    raw_table(40).to_csv(path, index=False)
    args = ["shards", "write", str(path), str(tmp_path / "out"), "--features", "city", "age:num",
            "--targets", "y", "--val-fraction", "0.5"]
    assert main(args) == 0
    before = (tmp_path / "out/train/manifest.json").read_text()
    assert main(args[:-2]) == 2  # the same folder again (another split): refused, nothing changed
    assert "not empty" in capsys.readouterr().err
    assert (tmp_path / "out/train/manifest.json").read_text() == before
    assert main(args[:-2] + ["--force"]) == 0
    assert load_manifest(tmp_path / "out/train").total_samples == 36  # 10% val now


def test_string_target_gets_class_ids_and_eq_makes_a_binary_label(tmp_path):
    df = raw_table(100)
    path = tmp_path / "t.csv"
    df.to_csv(path, index=False)
    out = convert_table(path, tmp_path / "out", ["age:num", "row"], ["city", "is_paris=city:eq=paris"],
                        val_fraction=0)
    got = read_split(tmp_path / "out/train")
    vocab = (tmp_path / "out/train/vocab/city.txt").read_text().splitlines()
    assert out["train"].fields["city"].vocab == len(vocab)  # classes 0..C-1, no unseen slot
    src = df.city.to_numpy()[got["row"]]
    np.testing.assert_array_equal(got["city"], [vocab.index(c) if c else -1 for c in src])
    assert (got["city"] == -1).sum() == (df.city == "").sum()
    assert (got["is_paris"] == 1).sum() == (df.city == "paris").sum()
    assert (got["is_paris"] == -1).sum() == (df.city == "").sum()


def test_vocabulary_reaches_the_encoder_and_padding_is_ignored_by_pooling(tmp_path):
    from manytask.models.encoders import EncoderParams, InputEncoder
    from manytask.models.spec import FieldSpec

    df = raw_table()
    path = tmp_path / "t.csv"
    df.to_csv(path, index=False)
    out = convert_table(path, tmp_path / "out", ["city:cat", "genres:multi:k=3"], ["y"])
    f = out["train"].fields
    inputs = {n: FieldSpec(f[n].dtype, f[n].shape, f[n].vocab, f[n].pad) for n in ("city", "genres")}
    enc = InputEncoder(inputs, EncoderParams(embedding_dim=4))
    assert enc.embeddings[0].num_embeddings == f["city"].vocab
    assert enc.embeddings[1].num_embeddings == f["genres"].vocab
    with torch.no_grad():
        one = enc({"city": torch.tensor([1]), "genres": torch.tensor([[2, 0, 0]])})
        same = enc({"city": torch.tensor([1]), "genres": torch.tensor([[2, 0, 0]])})
        enc.embeddings[1].weight[0] += 100.0  # the padding row must not matter
        padded = enc({"city": torch.tensor([1]), "genres": torch.tensor([[2, 0, 0]])})
        two = enc({"city": torch.tensor([1]), "genres": torch.tensor([[2, 2, 0]])})
    torch.testing.assert_close(one, same)
    torch.testing.assert_close(one, padded)
    torch.testing.assert_close(one, two)  # mean over the real ids only


def test_csv_to_trained_multitask_model_keeps_its_preprocessing(tmp_path):
    """The README's story on a small table: string columns -> shards -> a 2-task MMoE run whose
    run directory can rebuild the model's inputs from raw values."""
    from manytask.config import load_config
    from manytask.trainer.loop import train
    from tests.conftest import write_recipe

    df = raw_table(1200)
    df["y"] = df.age / 40 + (df.city == "paris") + np.random.default_rng(1).normal(0, 0.1, len(df))
    df["click"] = ((df.city == "lyon") | df.genres.str.contains("Drama")).astype(int)
    path = tmp_path / "t.csv"
    df.to_csv(path, index=False)
    convert_table(path, tmp_path / "d", ["row", "city:cat", "genres:multi:k=3", "age:num", "income:num:fill=0"],
                  ["y", "click"], samples_per_shard=300, chunk_size=100)
    recipe = write_recipe(
        tmp_path, tmp_path / "d",
        data={"sources": [{"name": "table", "train": str(tmp_path / "d/train"), "val": str(tmp_path / "d/val"),
                           "inputs": ["city", "genres", "age", "income", "income_missing"],
                           "labels": {"y": "y", "click": "click"}}]},
        tasks={"y": {"type": "regression"}, "click": {"type": "binary"}},
        logging={"wandb": False, "progress": False, "heatmap_every": 0},
    )
    val = train(load_config(recipe))  # 60 steps
    assert val["val/click/auc"] > 0.8  # learnt from the string and multi-valued columns
    assert val["val/y/mse"] < 0.5 * float(df.y.var())
    kept = tmp_path / "run/preprocessing/table"
    assert (kept / "vocab/city.txt").read_text() == (tmp_path / "d/train/vocab/city.txt").read_text()
    written = read_split(tmp_path / "d/val")
    raw = pa.Table.from_pandas(df.iloc[written["row"]].drop(columns=["y", "click"]))  # serving: no labels
    encoded = Preprocessor.from_manifest(kept).encode(raw)
    assert set(encoded) == {"row", "city", "genres", "age", "income", "income_missing"}
    for name, values in encoded.items():
        np.testing.assert_allclose(values, written[name], rtol=1e-6)

    # The trained model in use on raw rows: manytask.load and `manytask predict` on the raw
    # CSV go through the run's stored preprocessing and give what the shards' fields give.
    import manytask

    model = manytask.load(tmp_path / "run")
    inputs = ["city", "genres", "age", "income", "income_missing"]
    from_fields = model.predict({k: written[k] for k in inputs})
    raw_rows = df.iloc[written["row"]].drop(columns=["y", "click"])
    from_raw = model.predict(raw_rows)
    for task in ("y", "click"):
        np.testing.assert_allclose(from_raw[task], from_fields[task], rtol=1e-5)
    raw_csv = tmp_path / "val_raw.csv"
    raw_rows.to_csv(raw_csv, index=False)
    out = tmp_path / "pred.parquet"
    assert main(["predict", str(tmp_path / "run"), "--data", str(raw_csv), "--out", str(out), "--key", "row"]) == 0
    pred = pd.read_parquet(out)
    assert [int(k) for k in pred["key"]] == list(written["row"])
    np.testing.assert_allclose(pred["click"], from_fields["click"], rtol=1e-5)
    np.testing.assert_allclose(pred["y"], from_fields["y"], rtol=1e-5)


def test_diamonds_recipe_from_the_raw_csv(tmp_path):
    """`manytask data prepare diamonds`: the CSV inside the plotnine wheel, converted by column
    specs, then the recipe briefly trained: both tasks far beyond what ignoring the inputs gets
    (AUC 0.5; MSE of the training mean about 1.03)."""
    from pathlib import Path

    from manytask.data_pipeline import real_data

    root = Path(__file__).resolve().parents[1]
    try:
        out = real_data.prepare_diamonds(tmp_path / "diamonds", cache=root / "data" / "_wheels")
    except real_data.DownloadError as err:
        pytest.skip(f"diamonds needs `pip download plotnine==0.15.9`: {err}")
    assert out["train"].total_samples + out["val"].total_samples == 53_940
    assert out["train"].fields["color"].vocab == 8 and out["train"].fields["clarity"].vocab == 9
    assert (tmp_path / "diamonds/train/vocab/color.txt").read_text().split() == list("GEFHDIJ")
    run = tmp_path / "run"
    assert main(["train", str(root / "configs/diamonds_mmoe.yaml"), f"run.dir={run}", "run.resume=never",
                 f"data.sources.diamonds.train={tmp_path / 'diamonds/train'}",
                 f"data.sources.diamonds.val={tmp_path / 'diamonds/val'}", "trainer.max_steps=100",
                 "trainer.eval_every=100", "checkpoint.every=100000", "logging.wandb=false",
                 "logging.progress=false", "logging.heatmap_every=0"]) == 0
    import json

    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in rows if "val/ideal/auc" in r][-1]
    assert val["val/ideal/auc"] > 0.8 and val["val/log_price/mse"] < 0.5  # 100 steps: 0.88 / 0.25
    assert (run / "preprocessing/diamonds/vocab/clarity.txt").exists()


def messy_lists_table(n=300, seed=3) -> pa.Table:
    """String and list<string> columns with every awkward case: null rows, null and empty
    elements, empty lists, lists longer than k, values seen once."""
    rng = np.random.default_rng(seed)
    pool = GENRES + ["", None, "rare"]
    tags = [None if rng.random() < 0.1 else
            [pool[j] for j in rng.integers(0, len(pool), rng.integers(0, 7))] for _ in range(n)]
    city = [None if rng.random() < 0.05 else str(rng.choice(CITIES + [""])) for _ in range(n)]
    return pa.table({"row": np.arange(n), "city": city, "tags": pa.array(tags, pa.list_(pa.string())),
                     "y": rng.normal(size=n)})


def reference_ids(values: list[str], vocab: list[str], first_id: int, oov: int) -> list[int]:
    at = {v: i + first_id for i, v in enumerate(vocab)}
    return [at.get(v, oov) for v in values]


@pytest.mark.parametrize("row_group", [7, 1000, "capped"])
def test_parquet_lists_read_as_dictionaries_give_the_ids_plain_python_gives(tmp_path, monkeypatch, row_group,
                                                                             kernels):
    """Vocabulary columns come from Parquet as dictionaries (row group whole, or batch by batch
    above ROW_GROUP_CAP); the ids must be those of a plain per-row lookup in the vocabulary file:
    empties and nulls skipped, unseen values -> 1, at most k per row, padding 0."""
    from manytask.data_pipeline import table_reader

    if row_group == "capped":
        monkeypatch.setattr(table_reader, "ROW_GROUP_CAP", 0)  # plain list reads, batch by batch
    table = messy_lists_table()
    pq.write_table(table, tmp_path / "t.parquet", row_group_size=7 if row_group == 7 else 1000)
    convert_table(tmp_path / "t.parquet", tmp_path / "out", ["row", "city:cat", "tags:multi:k=3"], ["y"],
                  val_fraction=0.2, batch_rows=50, samples_per_shard=64, chunk_size=16)
    pre = load_manifest(tmp_path / "out" / "train").preprocessing
    vocab = {f: (tmp_path / "out" / "train" / pre[f]["vocab_file"]).read_text().split("\n")[:-1]
             for f in ("city", "tags")}
    # the training vocabulary, counted by hand from the training rows
    train_rows = set()
    for split in ("train", "val"):
        got = read_split(tmp_path / "out" / split)
        rows = got["row"].astype(int)
        if split == "train":
            train_rows = set(rows.tolist())
        cities = table.column("city").to_pylist()
        want_city = reference_ids([cities[r] for r in rows], vocab["city"], 1, 0)
        np.testing.assert_array_equal(got["city"], want_city)
        tags = table.column("tags").to_pylist()
        for r, ids in zip(rows, got["tags"]):
            kept = [v for v in (tags[r] or []) if v]  # null rows, null and empty values drop out
            want = reference_ids(kept[:3], vocab["tags"], 2, 1)
            assert ids.tolist() == want + [0] * (3 - len(want)), (r, tags[r], ids)
    counts: dict[str, int] = {}
    for r in train_rows:
        for v in table.column("tags").to_pylist()[r] or []:
            if v:
                counts[v] = counts.get(v, 0) + 1
    assert vocab["tags"] == sorted(counts, key=lambda v: (-counts[v], v))


def test_string_hash_is_the_documented_polynomial_at_every_block_size(monkeypatch, kernels):
    """hash=N ids are recorded as `poly64-splitmix64`: the fast hashes (the compiled loop; numpy's
    inverse powers over blocks of _HASH_BLOCK bytes) must equal the formula computed one string
    at a time in Python."""
    from manytask.data_pipeline import string_hash

    mask = (1 << 64) - 1

    def formula(s):
        if not s:
            return 0
        data = s.encode()
        h = 0
        for b in data:
            h = (h * 0x100000001B3 + b + 1) & mask
        h ^= len(data)
        h ^= h >> 30
        h = (h * 0xBF58476D1CE4E5B9) & mask
        h ^= h >> 27
        h = (h * 0x94D049BB133111EB) & mask
        return h ^ (h >> 31)

    rng = np.random.default_rng(0)
    values = [None, "", "a", "é≠", "x" * 300] + [
        "".join(chr(c) for c in rng.integers(32, 0x800, rng.integers(0, 40))) for _ in range(200)]
    want = [formula(v) for v in values]
    for block in (1 << 20, 64, 5):  # one block; many blocks; strings longer than a block
        monkeypatch.setattr(string_hash, "_HASH_BLOCK", block)
        for arr in (pa.array(values, pa.string()), pa.array(values, pa.large_string()).slice(3)):
            got = string_hash.hash_strings(arr)
            assert got.tolist() == want[len(values) - len(arr):]
        full = [v for v in values if v]  # no empty or null value: no mask per block
        assert string_hash.hash_strings(pa.array(full)).tolist() == [formula(v) for v in full]
        # a null slot may hold bytes (pyarrow does not clear them): still 0
        held = pa.StringArray.from_buffers(3, pa.py_buffer(np.array([0, 2, 5, 6], np.int32)),
                                           pa.py_buffer(b"abcdef"), pa.py_buffer(np.array([0b101], np.uint8)))
        assert string_hash.hash_strings(held).tolist() == [formula("ab"), 0, formula("f")]
    if kernels == "compiled":  # offsets that leave the data (an invalid array) are refused, not followed
        from manytask.data_pipeline.compiled_kernels import poly64_splitmix64

        with pytest.raises(IndexError, match="string 1 spans bytes 5..3"):
            poly64_splitmix64(np.zeros(8, np.uint8), np.array([0, 5, 3]))
        with pytest.raises(IndexError, match="string 0 spans bytes 0..9"):
            poly64_splitmix64(np.zeros(8, np.uint8), np.array([0, 9]))


@pytest.mark.parametrize("dtype", ["int8", "int16", "int32", "int64"])
@pytest.mark.parametrize("index_dtype", [np.int32, np.int64])
def test_compiled_list_padding_is_the_scatter_it_replaces(dtype, index_dtype, kernels):
    """pad_lists (encode_kernels.c) against a per-row Python reference: rows shorter and longer
    than k, empty rows at the start and the end, every id width; an index outside the values or
    the ids is refused before anything is read there."""
    from manytask.data_pipeline import compiled_kernels

    if kernels == "numpy":
        assert compiled_kernels.pad_lists(np.arange(3), np.arange(3), np.zeros(1), np.ones(1), 2, 0, dtype) is None
        return  # (the numpy scatter is Vocabulary.encode's own code: the conversion tests run it)
    rng = np.random.default_rng(int(np.dtype(dtype).itemsize))
    ids = rng.integers(2, np.iinfo(dtype).max, 50)
    lengths = rng.integers(0, 7, 200)
    lengths[[0, -1]] = 0
    starts = np.cumsum(lengths) - lengths
    index = rng.integers(0, len(ids), int(lengths.sum())).astype(index_dtype)
    anywhere = rng.integers(0, len(index) - lengths + 1)  # rows may share or skip values
    got = compiled_kernels.pad_lists(ids, index, anywhere, lengths, 3, 0, dtype)
    assert got.tolist() == [[int(ids[index[s + p]]) for p in range(min(n, 3))] + [0] * (3 - min(n, 3))
                            for s, n in zip(anywhere, lengths)]
    got = compiled_kernels.pad_lists(ids, index, starts, lengths, 4, 1, dtype)
    want = [[int(ids[index[s + p]]) for p in range(min(n, 4))] + [1] * (4 - min(n, 4))
            for s, n in zip(starts, lengths)]
    assert got.dtype == np.dtype(dtype) and got.tolist() == want
    assert compiled_kernels.pad_lists(ids, index[:0], np.zeros(3, np.int64), np.zeros(3, np.int64),
                                      2, 7, dtype).tolist() == [[7, 7]] * 3  # no values at all
    with pytest.raises(IndexError, match="row 199"):
        compiled_kernels.pad_lists(ids, index, starts, lengths + (np.arange(200) == 199), 4, 1, dtype)
    bad = index.copy()
    bad[starts[lengths > 0][-1]] = len(ids)
    with pytest.raises(IndexError, match="outside"):
        compiled_kernels.pad_lists(ids, bad, starts, lengths, 4, 1, dtype)
    with pytest.raises(TypeError, match="float32"):
        compiled_kernels.pad_lists(ids, index, starts, lengths, 4, 1, "float32")


def test_a_column_without_any_value_encodes_as_empty(kernels):
    """A column that holds no value at all (pandas writes an all-None column with Parquet's null
    type) is a multi field of padding only and hash ids 0, not an error inside pyarrow."""
    from manytask.data_pipeline.column_specs import parse_spec
    from manytask.data_pipeline.field_encoders import HashedIds, Vocabulary

    col = pa.nulls(3)
    ids = Vocabulary(parse_spec("t:multi:k=2"), ["a"]).encode({"t": col}, 0)["t"]
    assert ids.tolist() == [[0, 0]] * 3
    assert HashedIds(parse_spec("t:hash=8")).encode({"t": col}, 0)["t"].tolist() == [0, 0, 0]


def test_a_library_built_from_another_source_is_not_used(tmp_path, monkeypatch):
    """A compiled library left from an older encode_kernels.c (a pull without reinstalling)
    could take other arguments, and a damaged one does not load: either is refused with a
    warning, and the numpy code runs."""
    import shutil
    import warnings

    from manytask.data_pipeline import compiled_kernels

    use_kernels("compiled", monkeypatch)
    here = Path(compiled_kernels.__file__).parent
    built = next(here.glob("_encode_kernels*"))
    shutil.copy(built, tmp_path / built.name)
    source = (here / "encode_kernels.c").read_text()
    monkeypatch.setattr(compiled_kernels, "__file__", str(tmp_path / "compiled_kernels.py"))
    try:
        (tmp_path / "encode_kernels.c").write_text(source)
        compiled_kernels.library.cache_clear()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert compiled_kernels.library() is not None  # the source it was built from
        (tmp_path / "encode_kernels.c").write_text(source.replace("int64_t n,", "int64_t n, int64_t added,", 1))
        compiled_kernels.library.cache_clear()
        with pytest.warns(RuntimeWarning, match="built from another encode_kernels.c"):
            assert compiled_kernels.library() is None
        assert compiled_kernels.poly64_splitmix64(np.zeros(1, np.uint8), np.array([0, 1])) is None
        # a truncated copy, in another folder (the first copy is loaded: rewriting it in place
        # would truncate a library the process has mapped)
        (tmp_path / "damaged").mkdir()
        (tmp_path / "damaged" / built.name).write_bytes(built.read_bytes()[:100])
        (tmp_path / "damaged" / "encode_kernels.c").write_text(source)
        monkeypatch.setattr(compiled_kernels, "__file__", str(tmp_path / "damaged" / "compiled_kernels.py"))
        compiled_kernels.library.cache_clear()
        with pytest.warns(RuntimeWarning, match="does not load"):
            assert compiled_kernels.library() is None
    finally:
        compiled_kernels.library.cache_clear()


@pytest.mark.parametrize("n", [1, 7, 1000, 5_000_000, 2_999_999_999, 3 << 40, (1 << 52) + 3])
def test_validation_rows_are_the_documented_formula_at_any_size(n):
    """Row i goes to val/ when (a * i + b) mod n < n_val, computed in int64 up to 3e9 rows and
    with Python's integers beyond: the integer formula's rows everywhere, and exactly n_val rows
    on a whole table."""
    from manytask.data_pipeline.table_to_shards import val_rows

    is_val, n_val = val_rows(n, 0.1, seed=3)
    rng = np.random.default_rng(3)  # a and b as val_rows draws them
    b = int(rng.integers(n)) if n else 0
    a = int(n * 0.6180339887498949) | 1 if n > 2 else 1
    while math.gcd(a, n) != 1:
        a += 2
    a %= n
    for row0, count in ((0, min(n, 3000)), (max(n - 2500, 0), min(n, 2500)), (n // 3, min(n - n // 3, 70_000))):
        want = [(a * i + b) % n < n_val for i in range(row0, row0 + count)]
        assert is_val(np.arange(row0, row0 + count)).tolist() == want, (row0, count)
    if n <= 5_000_000:
        assert sum(int(is_val(np.arange(r, min(r + 131_072, n))).sum()) for r in range(0, n, 131_072)) == n_val


def test_read_ahead_hands_over_batches_in_order_and_the_readers_error_where_it_stopped():
    import threading

    from manytask.data_pipeline.table_reader import read_ahead

    def reader():
        yield from range(5)
        raise OSError("disk gone at batch 5")

    got = []
    with pytest.raises(OSError, match="batch 5"):
        for b in read_ahead(reader()):
            got.append(b)
    assert got == [0, 1, 2, 3, 4]
    early = read_ahead(iter(range(10**6)))
    assert next(early) == 0
    early.close()  # a consumer that stops early leaves no reader thread behind
    assert not [t for t in threading.enumerate() if t.name == "table-read-ahead"]


def test_id_fields_are_stored_narrow_and_manifests_without_a_dtype_encode_int64(tmp_path):
    """Id fields are written in the narrowest signed dtype of their vocabulary / hash space (the
    manifest's field dtype and the preprocessing record say which); the serving-side encoder
    gives the same dtype and values. A manifest written before dtypes were recorded (int64 ids on
    disk) still encodes int64."""
    import json

    from manytask.data_pipeline.field_encoders import id_dtype

    assert [id_dtype(s) for s in (1, 128, 129, 32768, 32769, 2**31)] == \
        ["int8", "int8", "int16", "int16", "int32", "int32"]
    df = raw_table()
    path = tmp_path / "t.parquet"
    pq.write_table(pa.Table.from_pandas(df.assign(genres=[g.split("|") if g else [] for g in df.genres])), path)
    specs = SPECS + ["wide=user_id:hash=30000", "wider=user_id:hash=70000"]
    out = convert_table(path, tmp_path / "out", specs, ["y", "click", "paris=city:eq=paris"],
                        samples_per_shard=128, chunk_size=32, val_fraction=0.25, batch_rows=100)
    train = out["train"]
    want = {"city": "int8", "genres": "int8", "user": "int8", "wide": "int16", "wider": "int32", "paris": "int8"}
    assert {f: train.fields[f].dtype for f in want} == want
    assert {f: train.preprocessing[f]["dtype"] for f in want} == want
    assert train.fields["click"].dtype == "int64"  # a number column passes through as it was
    written = read_split(tmp_path / "out/val")
    raw = df.iloc[written["row"]]
    encoded = Preprocessor.from_manifest(tmp_path / "out/train").encode(raw)
    for name, dtype in want.items():
        assert encoded[name].dtype == dtype and written[name].dtype == dtype
        np.testing.assert_array_equal(encoded[name], written[name])
    # the same folder as an older writer left it: no "dtype" in preprocessing -> int64 ids
    manifest = tmp_path / "out/train/manifest.json"
    record = json.loads(manifest.read_text())
    for rec in record["preprocessing"].values():
        rec.pop("dtype", None)
    manifest.write_text(json.dumps(record))
    old = Preprocessor.from_manifest(tmp_path / "out/train").encode(raw)
    for name in want:
        assert old[name].dtype == np.int64
        np.testing.assert_array_equal(old[name], written[name])


def test_vocabulary_counts_summed_in_pyarrow_rank_like_python(monkeypatch):
    """Vocabulary counts are summed batch by batch inside pyarrow (compacted past COMPACT_ROWS
    kept rows): the ranking is Python's sorted(-count, value) over the plain counts, with empty
    and null values left out, min_count and max_vocab applied."""
    from manytask.data_pipeline.field_encoders import ValueCounts

    monkeypatch.setattr(ValueCounts, "COMPACT_ROWS", 5)  # compact after almost every batch
    rng = np.random.default_rng(0)
    words = ["b", "a", "é", "z", "", None, "ab", "A", "日本", "aa"]
    counts, reference = ValueCounts(), {}
    for _ in range(12):
        distinct = pa.array(list(rng.permutation(np.array(words, dtype=object))), pa.string())
        seen = rng.integers(0, 4, len(words))
        counts.add(distinct, seen)
        for value, c in zip(distinct.to_pylist(), seen.tolist()):
            if value:
                reference[value] = reference.get(value, 0) + c
    ranked = sorted(reference, key=lambda v: (-reference[v], v))
    assert counts.ranked(1, 0) == [v for v in ranked if reference[v] >= 1]
    assert counts.ranked(15, 3) == [v for v in ranked if reference[v] >= 15][:3]


def test_raw_columns_named_like_their_fields_go_through_the_preprocessing(tmp_path):
    """`color:cat` makes field color from column color, `age:num` standardises column age into
    field age: a raw table's same-named columns are raw values, not the fields (before, a string
    column reached the model as if it were ids: "invalid literal for int()"; a float64 age went
    in unstandardised), while model-ready fields in the model's dtypes pass as they are."""
    from manytask.data_pipeline.fields import FieldSpec
    from manytask.models.spec import ModelSpec
    from manytask.trainer.inference import model_inputs_from

    df = raw_table()
    path = tmp_path / "t.csv"
    df.to_csv(path, index=False)
    out = convert_table(path, tmp_path / "d", ["city:cat", "age:num"], ["y"], val_fraction=0.0)
    prep = Preprocessor.from_manifest(tmp_path / "d/train")
    spec = ModelSpec({f: FieldSpec.of(out["train"].fields[f]) for f in ("city", "age")}, {})
    raw = df[["city", "age"]]
    want = prep.encode(raw)
    got = model_inputs_from(spec, {c: raw[c].to_numpy() for c in raw}, prep, raw=raw)
    for name in ("city", "age"):
        np.testing.assert_array_equal(got[name].numpy(), want[name])
    assert abs(float(got["age"].mean())) < 1e-4  # standardised, not the raw ages
    fields = {k: v for k, v in read_split(tmp_path / "d/train").items() if k in ("city", "age")}
    passed = model_inputs_from(spec, fields, prep)  # already fields: used as they are
    for name in ("city", "age"):
        np.testing.assert_array_equal(passed[name].numpy(), fields[name])
    # ids in numpy's default int64 for the narrow id field are still ids, not raw values
    wide = model_inputs_from(spec, {**fields, "city": fields["city"].astype(np.int64)}, prep)
    np.testing.assert_array_equal(wide["city"].numpy(), fields["city"])


def test_sources_whose_id_fields_differ_in_width_train_together(tmp_path):
    """Two tables converted separately: 5 cities (int8 ids) and 300 (int16 ids) in a field of
    the same name. The recipe's field is int16 with the larger vocabulary, and a run over both
    sources with 2 reader workers trains (the int8 source's rows are cast when batches are built)."""
    from manytask.config import load_config
    from manytask.data_pipeline.sources import check_sources
    from manytask.trainer.loop import train
    from tests.conftest import write_recipe

    rng = np.random.default_rng(0)
    wide = pd.DataFrame({"city": [f"c{i}" for i in rng.integers(0, 300, 2000)], "y": rng.normal(size=2000)})
    wide.to_csv(tmp_path / "wide.csv", index=False)
    raw_table(800).to_csv(tmp_path / "narrow.csv", index=False)
    for name in ("narrow", "wide"):
        convert_table(tmp_path / f"{name}.csv", tmp_path / name, ["city:cat"], ["y"], chunk_size=64)
    assert load_manifest(tmp_path / "narrow/train").fields["city"].dtype == "int8"
    assert load_manifest(tmp_path / "wide/train").fields["city"].dtype == "int16"
    sources = [{"name": n, "train": str(tmp_path / n / "train"), "val": str(tmp_path / n / "val"),
                "inputs": ["city"], "labels": {"y": "y"}} for n in ("narrow", "wide")]
    recipe = write_recipe(tmp_path, tmp_path / "narrow", data={"sources": sources, "num_workers": 2},
                          tasks={"y": {"type": "regression"}}, trainer={"max_steps": 20, "eval_every": 20},
                          logging={"wandb": False, "progress": False, "heatmap_every": 0})
    cfg = load_config(recipe)
    city = check_sources(cfg).inputs["city"]
    assert (city.dtype, city.vocab) == ("int16", load_manifest(tmp_path / "wide/train").fields["city"].vocab)
    val = train(cfg)
    assert np.isfinite(val["val/y/mse"])
