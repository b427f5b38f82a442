"""`manytask export`: a trained model as one file a serving process loads without manytask.

pt2: a `torch.export` program (`torch.export.load(path).module()`), ONNX: torch's exporter
(needs the `onnx` package). Both take one input per model field, with a dynamic batch
dimension, and return the same per-task predictions as `manytask.load(...).predict`
(probabilities for binary / multilabel, class probabilities for multiclass, values otherwise).
Beside the artifact, `<artifact>.json` names the inputs (dtype, per-sample shape), outputs,
tasks and the run's preprocessing files, and `serve.py` is a dependency-free loader (torch
only) that checks input names against that JSON before calling the program.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from manytask.models.spec import ModelSpec
from manytask.trainer.inference import task_prediction

SERVE_SOURCE = Path(__file__).with_name("serve_exported.py")


class ServingModel(nn.Module):
    """The model plus the prediction head, taking the input fields as named tensors.

    forward({field: `[B, *shape]`, "source_id": `[B]` only for multi-source models}) ->
    {task: prediction `[B]` or `[B, k]`}.
    """

    def __init__(self, model: nn.Module, spec: ModelSpec):
        super().__init__()
        self.model, self.spec = model, spec
        self.fields = list(spec.inputs)
        self.needs_source = len(spec.sources) > 1

    def forward(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        fields = {f: inputs[f] for f in self.fields}
        first = fields[self.fields[0]]
        source_id = inputs["source_id"] if self.needs_source else torch.zeros_like(first[:, 0] if first.dim() > 1 else first, dtype=torch.long)
        out = self.model(fields, source_id).outputs
        return {t: task_prediction(s, out[t]) for t, s in self.spec.tasks.items()}


@contextlib.contextmanager
def plain_tower_path() -> Iterator[None]:
    """The towers' CPU-fused mixture picks chunk sizes from the batch size in Python; a program
    with a dynamic batch takes the plain (same arithmetic) path instead."""
    from manytask.models import towers

    fused = towers.use_fused
    towers.use_fused = lambda *_a, **_k: False
    try:
        yield
    finally:
        towers.use_fused = fused


def example_inputs(spec: ModelSpec, batch: int = 4) -> dict[str, torch.Tensor]:
    """Zeros for every input field (and source_id), batch rows."""
    out = {f: torch.from_numpy(np.zeros((batch, *s.shape), dtype=s.dtype)) for f, s in spec.inputs.items()}
    if len(spec.sources) > 1:
        out["source_id"] = torch.zeros(batch, dtype=torch.long)
    return out


def describe(spec: ModelSpec, artifact: Path, fmt: str, preprocessing: list[str], step: int) -> dict[str, Any]:
    inputs = [{"name": f, "dtype": s.dtype, "shape": ["batch", *s.shape]} for f, s in spec.inputs.items()]
    if len(spec.sources) > 1:
        inputs.append({"name": "source_id", "dtype": "int64", "shape": ["batch"],
                       "values": {n: i for i, n in enumerate(spec.sources)}})
    outputs = []
    for task, t in spec.tasks.items():
        meaning = {"binary": "probability", "multilabel": "probability per label",
                   "multiclass": "probability per class"}.get(t.type, "value")
        shape = ["batch"] if t.out_dim == 1 and t.type != "multiclass" else ["batch", t.out_dim]
        outputs.append({"name": task, "task_type": t.type, "dtype": "float32", "shape": shape, "meaning": meaning})
    return {
        "format": fmt, "artifact": artifact.name, "step": step, "inputs": inputs, "outputs": outputs,
        "tasks": {k: {"type": t.type, "out_dim": t.out_dim} for k, t in spec.tasks.items()},
        "preprocessing": preprocessing,
        "load": ("torch.export.load(artifact).module()(inputs)" if fmt == "pt2"
                 else "onnxruntime.InferenceSession(artifact).run(None, inputs)"),
    }


def export_model(trained: Any, out: Path, fmt: str = "pt2") -> list[Path]:
    """Export `trained` (a `model_io.TrainedModel`) to `out`; returns the files written
    (artifact, its JSON, serve.py and the copied preprocessing files)."""
    out = Path(out)
    spec: ModelSpec = trained.spec
    serving = ServingModel(trained.model.eval(), spec).eval()
    # an inference program: weights without autograd (some layers write into out= buffers,
    # which autograd refuses when a weight requires grad), so callers need no torch.no_grad()
    serving.requires_grad_(False)
    example = example_inputs(spec)
    batch = torch.export.Dim("batch", min=1, max=1 << 30)
    dynamic = {"inputs": {name: {0: batch} for name in example}}
    out.parent.mkdir(parents=True, exist_ok=True)
    if fmt not in ("pt2", "onnx"):
        raise ValueError(f"--format {fmt}: expected pt2 or onnx")
    if fmt == "onnx":
        try:
            import onnx  # noqa: F401 - torch's exporter needs it (and onnxscript)
            import onnxscript  # noqa: F401
        except ImportError as err:
            raise ValueError(
                "--format onnx needs the `onnx` and `onnxscript` packages (pip install onnx onnxscript); "
                "--format pt2 needs only torch"
            ) from err
    with plain_tower_path(), torch.no_grad():
        program = torch.export.export(serving, (example,), dynamic_shapes=dynamic, strict=False)
        if fmt == "pt2":
            torch.export.save(program, out)
        else:  # the same program through torch's ONNX exporter: inputs and outputs keep their names
            torch.onnx.export(program, (), str(out), input_names=list(example),
                              output_names=list(spec.tasks), dynamo=True)
    written = [out]
    prep_root = Path(trained.run_dir) / "preprocessing"
    copied: list[str] = []
    if prep_root.is_dir():
        target = out.parent / "preprocessing"
        shutil.copytree(prep_root, target, dirs_exist_ok=True)
        copied = sorted(str(p.relative_to(out.parent)) for p in target.rglob("*") if p.is_file())
        written += [out.parent / c for c in copied]
    meta = out.with_name(out.name + ".json")
    meta.write_text(json.dumps(describe(spec, out, fmt, copied, trained.step), indent=1) + "\n")
    serve = out.parent / "serve.py"
    shutil.copyfile(SERVE_SOURCE, serve)
    return [*written, meta, serve]
