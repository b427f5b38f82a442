"""Serve a model exported by `manytask export --format pt2` with torch and numpy only.

`manytask export` copies this file beside the artifact as `serve.py`; it imports nothing
from manytask, so a serving image needs only torch:

    from serve import load
    model = load("export/model.pt2")                   # reads model.pt2 and model.pt2.json
    out = model({"x": np.zeros((3, 100), np.float32)})  # {task: array [3] or [3, k]}

Input names, dtypes and per-sample shapes are checked against `<artifact>.json`; a wrong or
missing name is a ValueError naming the artifact and the inputs it expects.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch


class ExportedModel:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        meta_path = self.path.with_name(self.path.name + ".json")
        if not meta_path.is_file():
            raise FileNotFoundError(f"{meta_path}: missing (written by `manytask export` beside {self.path.name})")
        self.meta = json.loads(meta_path.read_text())
        self.inputs = {i["name"]: i for i in self.meta["inputs"]}
        self.program = torch.export.load(str(self.path)).module()

    def expected(self) -> str:
        return ", ".join(f"{n}: {i['dtype']} {i['shape']}" for n, i in self.inputs.items())

    def __call__(self, inputs: dict[str, Any]) -> dict[str, np.ndarray]:
        missing = [n for n in self.inputs if n not in inputs]
        unknown = [n for n in inputs if n not in self.inputs]
        if missing or unknown:
            raise ValueError(
                f"{self.path}: wrong input names (missing {missing}, unknown {unknown}); "
                f"the model expects {self.expected()}"
            )
        tensors = {}
        for name, info in self.inputs.items():
            a = np.asarray(inputs[name])
            if list(a.shape[1:]) != list(info["shape"][1:]):
                raise ValueError(
                    f"{self.path}: input '{name}' has shape {list(a.shape)}, expected {info['dtype']} {info['shape']}"
                )
            tensors[name] = torch.from_numpy(np.ascontiguousarray(a, dtype=np.dtype(info["dtype"])))
        with torch.no_grad():
            out = self.program(tensors)
        return {k: v.numpy() for k, v in out.items()}


def load(path: str | Path) -> ExportedModel:
    return ExportedModel(path)
