"""The trained model in use: load from Python, eval (1 and 2 ranks), predict to a file, bad input.

Every test reads the run directory of one short training (conftest `trained_run`).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import ROOT

import manytask
from manytask.launch.cli import main


def _val_x(demo_shards: Path, n: int = 300) -> np.ndarray:
    from manytask.data_pipeline.manifest import load_manifest
    from manytask.trainer.inference import shard_batches

    keys, arrays = next(shard_batches(load_manifest(demo_shards / "val"), ["x"], n))
    return arrays["x"]


def test_load_gives_the_trained_model_and_predicts_any_table_form(trained_run, demo_shards):
    m = manytask.load(trained_run)
    assert not m.model.training and m.step == 60 and m.preprocessing == {} and m.preprocessor() is None
    assert {t: s.type for t, s in m.tasks.items()} == {"regress_a": "regression", "regress_b": "regression", "click": "binary"}
    x = _val_x(demo_shards)
    out = m.predict({"x": x})
    assert out["click"].shape == (300,) and ((out["click"] > 0) & (out["click"] < 1)).all()
    assert out["regress_a"].shape == (300,)
    # a pandas DataFrame with a list column and a pyarrow table give the same predictions
    frame = pd.DataFrame({"x": list(x)})
    table = pa.table({"x": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), x.shape[1])})
    for other in (m.predict(frame), m.predict(table)):
        for task in m.tasks:
            np.testing.assert_array_equal(other[task], out[task])
    # the same checkpoint loaded by path, and per-sample gate weights that are distributions
    by_ckpt = manytask.load(m.checkpoint).predict({"x": x[:5]}, gates=True)
    # Same batch size on both sides: a batch of 5 and one of 300 may round differently (BLAS
    # kernels), so comparing against out[:5] bit for bit held only for some trained weights.
    np.testing.assert_array_equal(by_ckpt["click"], m.predict({"x": x[:5]})["click"])
    np.testing.assert_allclose(by_ckpt["click"], out["click"][:5], rtol=1e-6)
    assert by_ckpt["gate.click"].shape == (5, 4)
    np.testing.assert_allclose(by_ckpt["gate.click"].sum(1), 1.0, atol=1e-6)


def test_predict_file_matches_eval_and_sklearn(trained_run, demo_shards, tmp_path, capsys):
    from sklearn.metrics import mean_absolute_error, mean_squared_error, roc_auc_score

    assert main(["eval", str(trained_run)]) == 0
    printed = capsys.readouterr().out
    assert "click" in printed and "auc" in printed
    record = json.loads((trained_run / "eval" / "val-step00000060.json").read_text())
    metrics = record["metrics"]
    out = tmp_path / "pred.parquet"
    # small parts: the file is written in several row groups, never held whole
    assert main(["predict", str(trained_run), "--data", str(demo_shards / "val"), "--out", str(out),
                 "--batch-size", "300"]) == 0
    assert pq.ParquetFile(out).num_row_groups == 7
    pred = pd.read_parquet(out)
    assert len(pred) == 2000 and pred["key"].is_unique
    assert roc_auc_score(pred["label.click"], pred["click"]) == pytest.approx(metrics["val/click/auc"], abs=1e-6)
    for task in ("regress_a", "regress_b"):
        assert mean_squared_error(pred[f"label.{task}"], pred[task]) == pytest.approx(metrics[f"val/{task}/mse"], abs=1e-6)
        assert mean_absolute_error(pred[f"label.{task}"], pred[task]) == pytest.approx(metrics[f"val/{task}/mae"], abs=1e-6)
    # the trained model beats the trivial baselines on the file's numbers
    assert metrics["val/click/auc"] > 0.6
    assert metrics["val/regress_a/mse"] < pred["label.regress_a"].var()
    # CSV on request, with gate weights spread over columns
    csv_out = tmp_path / "pred.csv"
    assert main(["predict", str(trained_run), "--data", str(demo_shards / "val"), "--out", str(csv_out), "--gates"]) == 0
    flat = pd.read_csv(csv_out, dtype={"key": str})
    assert list(flat["key"]) == list(pred["key"])
    np.testing.assert_allclose(flat["click"], pred["click"], rtol=1e-6)
    gates = flat[[f"gate.click.{e}" for e in range(4)]].to_numpy()
    np.testing.assert_allclose(gates.sum(1), 1.0, atol=1e-5)
    assert not any(p.name.endswith((".parquet", ".csv")) for p in (trained_run / "ckpt").rglob("*"))


@pytest.mark.slow
def test_eval_on_two_ranks_equals_one(trained_run, tmp_path):
    assert main(["eval", str(trained_run), "--out-dir", str(tmp_path / "one"), "--batch-size", "256"]) == 0
    one = json.loads((tmp_path / "one" / "val-step00000060.json").read_text())["metrics"]
    two_rec = json.loads((_eval_once(trained_run, tmp_path / "two", nproc=2)).read_text())
    assert two_rec["world_size"] == 2
    assert set(two_rec["metrics"]) == set(one)
    for key, value in one.items():
        assert two_rec["metrics"][key] == pytest.approx(value, rel=1e-9, abs=1e-9), key


def _eval_once(run: Path, out_dir: Path, nproc: int) -> Path:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m"]
    cmd = [*launcher, "manytask.launch.cli", "eval", str(run), "--out-dir", str(out_dir), "--batch-size", "256"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out_dir / "val-step00000060.json"


# --------------------------------------------------------------------------- bad input
def test_run_dir_without_complete_checkpoint_is_named(trained_run, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(trained_run, broken)
    newer = broken / "ckpt" / "step_00000090"  # a save that died before its COMPLETE marker
    shutil.copytree(broken / "ckpt" / "step_00000060", newer)
    (newer / "COMPLETE").unlink()
    assert manytask.load(broken).checkpoint.name == "step_00000060"  # passed over
    (broken / "ckpt" / "step_00000060" / "COMPLETE").unlink()
    for cmd in (["eval", str(broken)], ["predict", str(broken), "--data", "x", "--out", str(tmp_path / "p.parquet")]):
        assert main(cmd) == 2
        err = capsys.readouterr().err
        assert str(broken) in err and "no complete checkpoint" in err and "COMPLETE" in err
    with pytest.raises(RuntimeError, match="incomplete"):
        manytask.load(broken / "ckpt" / "step_00000060")


def test_data_missing_a_field_is_named(trained_run, demo_shards, tmp_path, capsys):
    data = tmp_path / "no_x"
    shutil.copytree(demo_shards / "val", data)
    manifest = json.loads((data / "manifest.json").read_text())
    del manifest["fields"]["x"]
    (data / "manifest.json").write_text(json.dumps(manifest))
    assert main(["predict", str(trained_run), "--data", str(data), "--out", str(tmp_path / "p.parquet")]) == 2
    err = capsys.readouterr().err
    assert "missing input field(s) ['x']" in err and str(data / "manifest.json") in err and "float32 [100]" in err
    assert main(["eval", str(trained_run), "--data", str(data)]) == 2
    err = capsys.readouterr().err
    assert "field 'x'" in err and str(data / "manifest.json") in err
    m = manytask.load(trained_run)
    with pytest.raises(ValueError, match=r"missing input field\(s\) \['x'\].*x: float32 \[100\]"):
        m.predict({"y": np.zeros((3, 100), np.float32)})
    with pytest.raises(ValueError, match=r"field 'x' has per-sample shape \[8\].*expects float32 \[100\]"):
        m.predict({"x": np.zeros((3, 8), np.float32)})


def test_raw_table_without_stored_preprocessing_is_refused(trained_run, tmp_path, capsys):
    table = tmp_path / "raw.parquet"
    pq.write_table(pa.table({"age": [1, 2, 3]}), table)
    assert main(["predict", str(trained_run), "--data", str(table), "--out", str(tmp_path / "p.parquet")]) == 2
    err = capsys.readouterr().err
    assert str(table) in err and "preprocessing" in err and "['x']" in err


def test_eval_of_a_checkpoint_folder_writes_beside_it_never_into_it(trained_run, tmp_path, capsys):
    ckpt = trained_run / "ckpt" / "step_00000060"
    before = sorted(p.name for p in ckpt.rglob("*"))
    assert main(["eval", str(ckpt), "--out-dir", str(tmp_path / "by_ckpt")]) == 0
    assert (tmp_path / "by_ckpt" / "val-step00000060.json").is_file()
    assert main(["eval", str(trained_run), "--checkpoint", str(ckpt), "--out-dir", str(ckpt / "eval")]) == 2
    assert f"refusing to write into the checkpoint folder {ckpt}" in capsys.readouterr().err
    assert sorted(p.name for p in ckpt.rglob("*")) == before


def test_predict_keys_sample_layout_rows_by_their_tar_key(trained_run, tmp_path, capsys):
    """Foreign WebDataset shards (one sample per key, indexed by `manytask shards index`)."""
    import webdataset as wds

    rng = np.random.default_rng(3)
    xs = rng.standard_normal((50, 100)).astype(np.float32)
    data = tmp_path / "foreign"
    data.mkdir()
    with wds.ShardWriter(str(data / "part-%06d.tar"), maxcount=20, verbose=0) as sink:
        for i, x in enumerate(xs):
            sink.write({"__key__": f"user{i:03d}", "x.npy": x})
    assert main(["shards", "index", str(data)]) == 0
    out = tmp_path / "pred.parquet"
    assert main(["predict", str(trained_run), "--data", str(data), "--out", str(out), "--batch-size", "16"]) == 0
    pred = pd.read_parquet(out)
    assert list(pred["key"]) == [f"user{i:03d}" for i in range(50)]
    expected = manytask.load(trained_run).predict({"x": xs})
    np.testing.assert_allclose(pred["click"], expected["click"], rtol=1e-6)
    assert "label.click" not in pred  # these shards carry no labels


class ColumnsToX:
    """Raw columns c0..c99 -> the model's field x: the contract of the data issue's
    `Preprocessor` (`encode(table) -> {field: array}`, `fields`), which this branch does not
    have yet; it stands in for it to drive predict's raw-table path end to end."""

    fields = ["x"]

    def encode(self, table) -> dict[str, np.ndarray]:
        if isinstance(table, pa.Table):
            table = table.to_pandas()
        cols = np.stack([np.asarray(table[f"c{i}"], dtype=np.float32) for i in range(100)], axis=1)
        return {"x": cols}


def test_raw_table_goes_through_the_runs_preprocessing(trained_run, demo_shards, tmp_path):
    from manytask.trainer.predict_file import predict_to_file

    m = manytask.load(trained_run)
    m.preprocessing = {"synthetic": ColumnsToX()}
    x = _val_x(demo_shards, 500)
    raw = pd.DataFrame({f"c{i}": x[:, i] for i in range(100)} | {"user": [f"u{i}" for i in range(500)]})
    expected = m.predict({"x": x})
    for form in (raw, pa.Table.from_pandas(raw)):
        np.testing.assert_array_equal(m.predict(form)["click"], expected["click"])
    table = tmp_path / "raw.parquet"
    pq.write_table(pa.Table.from_pandas(raw), table, row_group_size=128)
    rows = predict_to_file(m, table, tmp_path / "pred.parquet", batch_size=200, key_field="user")
    pred = pd.read_parquet(tmp_path / "pred.parquet")
    assert rows == 500 and list(pred["key"]) == [f"u{i}" for i in range(500)]
    np.testing.assert_allclose(pred["click"], expected["click"], rtol=1e-6)


@pytest.mark.parametrize("name,params", [("mmoe", {}), ("omoe", {}), ("ple", {"num_levels": 2})])
def test_per_sample_gate_weights_are_named_like_the_models_gate_statistics(name, params):
    import torch

    from manytask.config import ModelConfig
    from manytask.models import build_model
    from manytask.models.spec import FieldSpec, ModelSpec, TaskSpec
    from manytask.trainer.inference import GateRecorder

    spec = ModelSpec({"x": FieldSpec("float32", (10,))}, {"a": TaskSpec("regression", 1), "b": TaskSpec("binary", 1)}, ["s"])
    model = build_model(ModelConfig(name, params), spec).eval()
    recorder = GateRecorder(model)
    with recorder, torch.no_grad():
        out = model({"x": torch.randn(6, 10)}, torch.zeros(6, dtype=torch.long))
    weights = recorder.weights()
    assert list(weights) == list(out.gate_means)
    for key, w in weights.items():
        assert w.shape[0] == 6
        torch.testing.assert_close(w.mean(0), out.gate_means[key])
