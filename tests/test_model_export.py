"""`manytask export`: the artifact loads in a process that cannot import manytask and predicts
what `manytask.load(...).predict` does; wrong input names are refused by name."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import manytask
from manytask.launch.cli import main

# Runs with -I -S (no site-packages, no .pth files, so no editable manytask), then puts only
# torch's own site-packages on sys.path and proves manytask is not importable there.
SERVE = """
import importlib.util, json, sys
sys.path[:0] = [sys.argv[1], sys.argv[2]]
assert importlib.util.find_spec("manytask") is None, "manytask is importable"
try:
    import manytask  # noqa: F401
    raise SystemExit("manytask imported")
except ModuleNotFoundError:
    pass
import numpy as np
import pytest
from serve import load
model = load(sys.argv[3])
data = np.load(sys.argv[4])
out = {f"{n}/{k}": v for n in (1, 7, 300) for k, v in model({"x": data["x"][:n]}).items()}
import torch  # the program alone, as the JSON's "load" line says (no torch.no_grad needed)
program = torch.export.load(sys.argv[3]).module()
out.update({f"raw/{k}": v.detach().numpy() for k, v in program({"x": torch.from_numpy(data["x"][:7])}).items()})
try:
    model({"features": data["x"]})
except ValueError as err:
    out["error"] = np.array(str(err))
np.savez(sys.argv[5], **out)
"""


def test_exported_program_serves_without_manytask(trained_run, demo_shards, tmp_path, capsys):
    from manytask.data_pipeline.manifest import load_manifest
    from manytask.trainer.inference import shard_batches

    out = tmp_path / "export" / "model.pt2"
    assert main(["export", str(trained_run), "--out", str(out)]) == 0
    meta = json.loads(out.with_name("model.pt2.json").read_text())
    assert [i["name"] for i in meta["inputs"]] == ["x"] and meta["inputs"][0]["shape"] == ["batch", 100]
    assert {o["name"]: o["meaning"] for o in meta["outputs"]} == {
        "click": "probability", "regress_a": "value", "regress_b": "value"}
    _, arrays = next(shard_batches(load_manifest(demo_shards / "val"), ["x"], 300))
    np.savez(tmp_path / "batch.npz", x=arrays["x"])
    site = str(Path(torch.__file__).resolve().parents[1])
    proc = subprocess.run(
        [sys.executable, "-I", "-S", "-c", SERVE, str(out.parent), site, str(out), str(tmp_path / "batch.npz"),
         str(tmp_path / "served.npz")], capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    served = np.load(tmp_path / "served.npz")
    expected = manytask.load(trained_run).predict({"x": arrays["x"]})
    for n in (1, 7, 300):  # one program, any batch size
        for task in ("click", "regress_a", "regress_b"):
            assert served[f"{n}/{task}"].shape == (n,)
            np.testing.assert_allclose(served[f"{n}/{task}"], expected[task][:n], atol=1e-5, rtol=0)
    for task in ("click", "regress_a", "regress_b"):
        np.testing.assert_array_equal(served[f"raw/{task}"], served[f"7/{task}"])
    error = str(served["error"])
    assert str(out) in error and "missing ['x']" in error and "unknown ['features']" in error
    assert "x: float32 ['batch', 100]" in error


def test_onnx_export_or_a_clear_error_without_the_onnx_packages(trained_run, demo_shards, tmp_path, capsys):
    """With onnx + onnxscript installed the ONNX file predicts what manytask.load does (checked
    with onnxruntime when present); without them the error says what to install."""
    import importlib.util

    from manytask.data_pipeline.manifest import load_manifest
    from manytask.trainer.inference import shard_batches

    out = tmp_path / "m.onnx"
    if importlib.util.find_spec("onnx") is None or importlib.util.find_spec("onnxscript") is None:
        assert main(["export", str(trained_run), "--format", "onnx", "--out", str(out)]) == 2
        assert "needs the `onnx` and `onnxscript` packages" in capsys.readouterr().err
        assert not out.exists()
        return
    assert main(["export", str(trained_run), "--format", "onnx", "--out", str(out)]) == 0
    assert json.loads(out.with_name("m.onnx.json").read_text())["format"] == "onnx"
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(str(out))
    assert [i.name for i in session.get_inputs()] == ["x"]
    _, arrays = next(shard_batches(load_manifest(demo_shards / "val"), ["x"], 300))
    expected = manytask.load(trained_run).predict({"x": arrays["x"]})
    for n in (1, 300):
        got = dict(zip([o.name for o in session.get_outputs()], session.run(None, {"x": arrays["x"][:n]})))
        for task in expected:
            np.testing.assert_allclose(got[task], expected[task][:n], atol=1e-5, rtol=0)
