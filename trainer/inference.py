"""A trained model on new data: inputs checked against the model, predictions, gate weights.

- `as_arrays(table)`: a dict of numpy arrays, a pandas DataFrame or a pyarrow Table /
  RecordBatch -> column -> array `[n, ...]` (list columns stacked).
- `model_inputs_from(spec, arrays, preprocessing)`: the model's input fields, checked (a
  missing field or a wrong per-sample shape is a ValueError naming the field and what was
  expected); raw columns go through the run's stored preprocessing first.
- `predictions(tasks, outputs)`: raw outputs -> what a user wants per task (probabilities for
  binary / multilabel, class probabilities for multiclass, values for regression / forecast).
- `GateRecorder`: per-sample gate weights of one forward.
- `shard_batches(manifest, ...)`: a dataset's samples in manifest order with their keys
  (`<tar key>` in the sample layout, `<tar key>/<row>` in the chunk layout), this rank's share.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from manytask.config import Config
from manytask.data_pipeline.manifest import Manifest
from manytask.data_pipeline.shard_reader import read_shard
from manytask.data_pipeline.stream import stack_members
from manytask.models.gates import SoftmaxGates
from manytask.models.spec import ModelSpec, TaskSpec
from manytask.trainer import distributed as D
from manytask.trainer.evaluate import evaluate


# --------------------------------------------------------------------------- inputs
def as_arrays(table: Any) -> dict[str, np.ndarray]:
    """column -> numpy array `[n, ...]` from a dict of arrays, a pandas DataFrame or a pyarrow
    Table / RecordBatch (list-valued columns are stacked into `[n, width]`)."""
    if isinstance(table, dict):
        return {k: np.asarray(v) for k, v in table.items()}
    if hasattr(table, "column_names") and hasattr(table, "column"):  # pyarrow Table / RecordBatch
        return {name: _stack(table.column(name).to_numpy(zero_copy_only=False)) for name in table.column_names}
    if hasattr(table, "columns") and hasattr(table, "to_numpy"):  # pandas DataFrame
        return {str(name): _stack(table[name].to_numpy()) for name in table.columns}
    raise TypeError(
        f"expected a dict of numpy arrays, a pandas DataFrame or a pyarrow Table, got {type(table).__name__}"
    )


def _stack(column: np.ndarray) -> np.ndarray:
    """A column of equal-length lists -> `[n, width]`; ragged lists (raw multi-valued columns,
    left to the preprocessing) stay an object array."""
    if column.dtype == object and len(column) and isinstance(column[0], (list, np.ndarray)):
        try:
            return np.stack([np.asarray(v) for v in column])
        except ValueError:
            return column
    return column


def _raw_column(a: np.ndarray, field_dtype: str) -> bool:
    """Whether `a`, named like a field of `field_dtype`, is the raw column that field is made
    from: text (or anything not numeric) for any field, or float64 (a table's numbers) for a
    float field. Integers for an id field are taken as its ids (cast to the field's width)."""
    want = np.dtype(field_dtype)
    if a.dtype.kind not in "iufb":
        return True
    return want.kind == "f" and a.dtype != want and a.dtype == np.float64


def model_inputs_from(
    spec: ModelSpec, arrays: dict[str, np.ndarray], preprocessing: Any = None, where: str = "batch",
    raw: Any = None, provided: list[str] | None = None, raw_table: bool = False,
) -> dict[str, torch.Tensor]:
    """The model's input fields as tensors `[n, *shape]` in the model's dtypes.

    arrays: model-ready fields, or raw columns when `preprocessing` (the run's stored
    `Preprocessor`) is given and some field is missing; it encodes `raw` (the table as the
    caller gave it) or else `arrays`. provided: the fields the rows' source has (default all);
    the others are zero-filled as in training. raw_table: `arrays` are a raw table's columns
    (every field the preprocessing makes is made from them, whatever a column's name); else a
    column named like a field is taken as the raw column it is made from only when it cannot be
    the field (`_raw_column`). Raises ValueError naming `where`, the field and what the model
    expects.
    """
    needed = [f for f in spec.inputs if provided is None or f in provided]
    missing = [f for f in needed if f not in arrays]
    # A raw column often has the name of the field made from it (`color:cat` makes field color
    # from column color; `age:num` standardises column age into field age).
    raw_named = [] if preprocessing is None else [
        f for f in needed if f in arrays and f in preprocessing.fields
        and (raw_table or _raw_column(np.asarray(arrays[f]), spec.inputs[f].dtype))]
    if (missing or raw_named) and preprocessing is not None:
        arrays = {**arrays, **preprocessing.encode(raw if raw is not None else arrays)}
        missing = [f for f in needed if f not in arrays]
    if missing or not needed:
        expected = ", ".join(f"{f}: {spec.inputs[f].dtype} {list(spec.inputs[f].shape)}" for f in needed)
        hint = "" if preprocessing is not None else " (this run stores no preprocessing for raw columns)"
        raise ValueError(
            f"{where}: missing input field(s) {missing}; the model expects {expected}; "
            f"got columns {sorted(arrays)}{hint}"
        )
    out, rows = {}, None
    for name in [f for f in spec.inputs if f in arrays]:
        fs = spec.inputs[name]
        a = np.asarray(arrays[name])
        if tuple(a.shape[1:]) != tuple(fs.shape) or a.ndim == 0:
            raise ValueError(
                f"{where}: field '{name}' has per-sample shape {list(a.shape[1:])} "
                f"({a.dtype} {list(a.shape)}), the model expects {fs.dtype} {list(fs.shape)}"
            )
        if rows is not None and a.shape[0] != rows:
            raise ValueError(f"{where}: field '{name}' has {a.shape[0]} rows, other fields {rows}")
        rows = a.shape[0]
        # (writable: a column read from Arrow is a read-only view torch would warn about)
        out[name] = torch.from_numpy(np.require(a, np.dtype(fs.dtype), ["C_CONTIGUOUS", "WRITEABLE"]))
    for name, fs in spec.inputs.items():  # another source's field: zeros, as the loader fills it
        if name not in out:
            out[name] = torch.from_numpy(np.zeros((rows, *fs.shape), dtype=np.dtype(fs.dtype)))
    return {f: out[f] for f in spec.inputs}


# --------------------------------------------------------------------------- outputs
def task_prediction(spec: TaskSpec, output: torch.Tensor) -> torch.Tensor:
    """Raw output `[B, out_dim]` -> probability `[B]` (binary), probabilities `[B, L]`
    (multilabel), class probabilities `[B, C]` (multiclass), values `[B]` or `[B, out_dim]`."""
    output = output.float()
    if spec.type in ("binary", "multilabel"):
        output = torch.sigmoid(output)
    elif spec.type == "multiclass":
        return torch.softmax(output, dim=-1)
    return output.reshape(-1) if spec.out_dim == 1 else output


def predictions(tasks: dict[str, TaskSpec], outputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {t: task_prediction(spec, outputs[t]) for t, spec in tasks.items()}


class GateRecorder:
    """Records every softmax gate's per-sample weights during a forward (a context manager).

    `weights()` -> gate key -> `[B, E]`, named as in the model's `gate_experts()` (MMoE: the
    task; PLE: `<task>/level<l>`, `(shared)/level<l>`); `gate_<i>` if the model names none.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self._out: list[torch.Tensor] = []
        self._handles: list[Any] = []

    def __enter__(self) -> GateRecorder:
        self._out = []
        for m in self.model.modules():
            if isinstance(m, SoftmaxGates):
                self._handles.append(m.register_forward_hook(lambda _m, _i, out: self._out.append(out.detach())))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def weights(self) -> dict[str, torch.Tensor]:
        per_gate = [g for w in self._out for g in w.unbind(0)]  # each [B, E]
        names = list(getattr(self.model, "gate_experts", dict)())
        if len(names) != len(per_gate):
            names = [f"gate_{i}" for i in range(len(per_gate))]
        return dict(zip(names, per_gate))


@torch.no_grad()
def predict_tensors(
    model: nn.Module, spec: ModelSpec, inputs: dict[str, torch.Tensor], source_id: torch.Tensor,
    gates: bool = False,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """One forward in eval mode -> (task -> prediction, gate key -> `[B, E]` weights or {})."""
    if model.training:
        model.eval()
    recorder = GateRecorder(model)
    if gates:
        with recorder:
            out = model(inputs, source_id)
        return predictions(spec.tasks, out.outputs), recorder.weights()
    return predictions(spec.tasks, model(inputs, source_id).outputs), {}


def source_index(spec: ModelSpec, source: str | int | None) -> int:
    """A source name (or index) -> its index in the model's sources (0 when not given)."""
    if source is None:
        return 0
    if isinstance(source, int):
        if not 0 <= source < max(1, len(spec.sources)):
            raise ValueError(f"source index {source} out of range: the model has sources {spec.sources}")
        return source
    if source not in spec.sources:
        raise ValueError(f"unknown source '{source}': the model was trained on sources {spec.sources}")
    return spec.sources.index(source)


# --------------------------------------------------------------------------- shards
def shard_batches(
    m: Manifest, fields: list[str], batch_size: int, rank: int = 0, world: int = 1, key_field: str | None = None,
) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray]]]:
    """(keys `[n]`, field -> `[n, ...]`) in manifest order, batch_size rows each (the last
    one shorter); rank r reads the tar keys whose index over the manifest is ≡ r (mod world).

    Keys are `key_field`'s values when given, else the tar key (sample layout) or
    `<tar key>/<row>` (chunk layout). Raises ValueError naming the manifest and a missing field.
    """
    wanted = list(dict.fromkeys([*fields, *([key_field] if key_field else [])]))
    absent = [f for f in wanted if f not in m.fields]
    if absent:
        raise ValueError(f"{m.path}: field(s) {absent} are not in the data (fields there: {', '.join(m.fields)})")
    infos = {f: m.fields[f] for f in wanted}
    pending: list[dict] = []  # decoded members not yet stacked, and their keys
    pending_keys: list[np.ndarray] = []
    carry: dict[str, np.ndarray] | None = None  # stacked rows not yet yielded
    carry_keys = np.zeros(0, dtype=object)
    rows, first = 0, 0
    for s, shard in enumerate(m.shards):
        select = {q for q in range(len(shard.members)) if (first + q) % world == rank}
        first += len(shard.members)
        if not select:
            continue
        for q, key, data in read_shard(m.shard_url(s), infos, m.layout, shard.members, select=select, manifest=m.path):
            n = shard.members[q]
            pending.append(data)
            pending_keys.append(np.array([f"{key}/{j}" for j in range(n)] if m.layout == "chunk" else [key], dtype=object))
            rows += n
            if rows < batch_size:
                continue
            carry, carry_keys = _append(carry, carry_keys, pending, pending_keys, infos, m.layout)
            pending, pending_keys = [], []
            start = 0
            while rows - start >= batch_size:
                cut = slice(start, start + batch_size)
                yield _keyed(carry_keys[cut], {f: v[cut] for f, v in carry.items()}, key_field)
                start += batch_size
            carry, carry_keys, rows = {f: v[start:] for f, v in carry.items()}, carry_keys[start:], rows - start
    if pending:
        carry, carry_keys = _append(carry, carry_keys, pending, pending_keys, infos, m.layout)
    if rows:
        yield _keyed(carry_keys, carry, key_field)


def _append(carry, carry_keys, pending, pending_keys, infos, layout):
    stacked = stack_members(pending, infos, layout)
    keys = np.concatenate([carry_keys, *pending_keys])
    if carry is None:
        return stacked, keys
    return {f: np.concatenate([carry[f], v]) for f, v in stacked.items()}, keys


def _keyed(keys: np.ndarray, arrays: dict[str, np.ndarray], key_field: str | None):
    if key_field:
        keys = np.asarray(arrays[key_field]).astype(str).astype(object)
    return keys, arrays


# --------------------------------------------------------------------------- eval
def eval_config(cfg: Config, data: list[str] | None) -> Config:
    """The run's recipe pointed at the data to evaluate: `data` is one directory per source
    (recipe order) or `SOURCE=DIR` items; None keeps each source's `val` split. Only those
    manifests are read (the training shards need not exist any more)."""
    cfg = copy.deepcopy(cfg)
    names = [s.name for s in cfg.data.sources]
    chosen: dict[str, str] = {}
    for i, item in enumerate(data or []):
        name, sep, where = item.partition("=")
        if sep and name in names:
            chosen[name] = where
        elif len(data or []) == len(names):
            chosen[names[i]] = item
        else:
            raise ValueError(
                f"--data {item}: give one directory per source ({', '.join(names)}) in recipe order, "
                f"or SOURCE=DIR"
            )
    for src in cfg.data.sources:
        src.val = chosen.get(src.name, src.val)
        if src.val is not None:
            src.train = src.val
    if not any(s.val for s in cfg.data.sources):
        raise ValueError("no data to evaluate: the recipe has no val split; pass --data DIR")
    return cfg


def check_data_fields(cfg: Config, spec: ModelSpec) -> None:
    """Every input field the data provide must have the model's dtype and per-sample shape."""
    from manytask.data_pipeline.sources import model_inputs

    for name, got in model_inputs(cfg).items():
        want = spec.inputs.get(name)
        if want is not None and (got.dtype, tuple(got.shape)) != (want.dtype, tuple(want.shape)):
            where = [s.val for s in cfg.data.sources if name in s.inputs]
            raise ValueError(
                f"field '{name}' in {where[0] if where else 'the data'}: {got.dtype} {list(got.shape)}, "
                f"the model expects {want.dtype} {list(want.shape)}"
            )


def evaluate_model(
    model: nn.Module, spec: ModelSpec, cfg: Config, info: D.DistInfo, batch_size: int | None = None
) -> dict[str, float]:
    """Exact per-task metrics of `model` on every source's `val` split of `cfg` (see
    `eval_config`); under torchrun each rank reads its share and the metrics are reduced exactly."""
    from manytask.data_pipeline.validation import val_batches

    check_data_fields(cfg, spec)
    batches = val_batches(cfg, info.rank, info.world_size, batch_size or cfg.data.val_batch_size, max_batches=0)
    return evaluate(model.to(info.device), batches, spec.tasks, cfg, info.device, exact=True)


def metrics_table(result: dict[str, float]) -> list[dict[str, Any]]:
    """`{"val/<task>/<metric>": v}` -> rows `{"task", "metric", "value"}` in result order."""
    rows = []
    for key, value in result.items():
        _, task, metric = key.split("/", 2)
        rows.append({"task": task, "metric": metric, "value": value})
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    metrics = list(dict.fromkeys(r["metric"] for r in rows))
    values = {(r["task"], r["metric"]): r["value"] for r in rows}
    width = max(len(t) for t in tasks) + 2
    lines = ["task".ljust(width) + "".join(m.rjust(12) for m in metrics)]
    for t in tasks:
        cells = [values.get((t, m)) for m in metrics]
        lines.append(t.ljust(width) + "".join(("" if v is None else f"{v:.6f}").rjust(12) for v in cells))
    return "\n".join(lines)
