"""`manytask predict`: per-sample predictions of a trained model for a dataset, written in parts.

Input: shards (a directory or manifest.json; the model's input fields are read as they are) or
a raw table (.parquet / .csv) that the run's stored preprocessing turns into model inputs.
Output: Parquet (one row group per batch) or CSV, streamed, so memory stays at one batch.
Columns: `key`, then per task its prediction (`<task>`: probability / value; list columns for
multi-output tasks; multiclass also `<task>.class`, the argmax), `label.<task>` where the data
carry the task's label field, and with `gates=True` `gate.<key>` (the sample's expert weights).
CSV has no list columns: they are spread over `<name>.<i>`.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from manytask.data_pipeline.manifest import ManifestError, load_manifest
from manytask.models.spec import ModelSpec
from manytask.trainer.inference import as_arrays, model_inputs_from, predict_tensors, shard_batches

TABLE_SUFFIXES = (".parquet", ".pq", ".csv")


def _column(values: np.ndarray) -> Any:
    import pyarrow as pa

    if values.ndim == 1:
        return pa.array(values)
    flat = pa.array(np.ascontiguousarray(values).reshape(-1))
    return pa.FixedSizeListArray.from_arrays(flat, int(np.prod(values.shape[1:])))


class PredictionWriter:
    """Appends batches of columns to a Parquet or CSV file (context manager)."""

    def __init__(self, path: Path, fmt: str):
        self.path, self.fmt, self._writer = Path(path), fmt, None
        self.rows = 0

    def write(self, columns: dict[str, np.ndarray]) -> None:
        import pyarrow as pa

        if self.fmt == "csv":
            flat: dict[str, np.ndarray] = {}
            for name, v in columns.items():
                if v.ndim == 1:
                    flat[name] = v
                else:
                    for i, col in enumerate(v.reshape(len(v), -1).T):
                        flat[f"{name}.{i}"] = col
            columns = flat
        table = pa.table({k: _column(v) for k, v in columns.items()})
        if self._writer is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if self.fmt == "csv":
                import pyarrow.csv as pacsv

                self._writer = pacsv.CSVWriter(str(self.path), table.schema)
            else:
                import pyarrow.parquet as pq

                self._writer = pq.ParquetWriter(str(self.path), table.schema)
        self._writer.write_table(table)
        self.rows += table.num_rows

    def __enter__(self) -> PredictionWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._writer is not None:
            self._writer.close()


def table_batches(path: Path, batch_size: int, key_field: str | None) -> Iterator[tuple[np.ndarray, Any]]:
    """(keys, pyarrow Table of raw columns) of a .parquet / .csv table, batch_size rows at a
    time (streamed)."""
    import pyarrow as pa

    if path.suffix == ".csv":
        import pyarrow.csv as pacsv

        reader = pacsv.open_csv(str(path), read_options=pacsv.ReadOptions(block_size=1 << 22))
        batches = iter(reader)
    else:
        import pyarrow.parquet as pq

        batches = pq.ParquetFile(str(path)).iter_batches(batch_size=batch_size)
    start = 0
    for rb in batches:
        table = pa.Table.from_batches([rb])
        n = table.num_rows
        if key_field:
            if key_field not in table.column_names:
                raise ValueError(f"{path}: no column '{key_field}' for --key (columns: {table.column_names})")
            keys = np.asarray(table.column(key_field).to_numpy(zero_copy_only=False)).astype(str).astype(object)
        else:
            keys = np.arange(start, start + n).astype(str).astype(object)
        start += n
        yield keys, table


def predict_to_file(
    loaded: Any, data: str | Path, out: str | Path, fmt: str = "parquet", gates: bool = False,
    batch_size: int = 4096, source: str | None = None, key_field: str | None = None,
) -> int:
    """Write `loaded`'s (a `manytask.api.LoadedModel`) predictions for `data` to `out`; returns rows.

    data: shards (directory with manifest.json, or the manifest) or a raw .parquet / .csv
    table (needs the run's stored preprocessing). Raises ValueError naming the data path and
    the missing field when the data lack one of the model's inputs.
    """
    from manytask.trainer.inference import source_index

    spec: ModelSpec = loaded.spec
    src_i = source_index(spec, source)
    src_cfg = loaded.config.data.sources[src_i]
    preprocessing = loaded.preprocessor(src_i)
    data = Path(data)
    if data.suffix in TABLE_SUFFIXES:
        if preprocessing is None:
            raise ValueError(
                f"{data}: a raw table needs the run's stored preprocessing, and {loaded.run_dir}/preprocessing/"
                f"{src_cfg.name}/ does not exist (the run was trained on shards not made from a table); pass shards "
                f"(a directory with manifest.json) holding the fields {list(spec.inputs)}"
            )
        batches = table_batches(data, batch_size, key_field)
        label_fields: dict[str, str] = {}
        where = str(data)
    else:
        try:
            m = load_manifest(data)
        except ManifestError as err:
            raise ValueError(f"--data {data}: {err}") from err
        label_fields = {t: f for t, f in src_cfg.labels.items() if f in m.fields}
        fields = [f for f in src_cfg.inputs if f in spec.inputs]
        missing = [f for f in fields if f not in m.fields]
        if missing:
            raise ValueError(
                f"{m.path}: missing input field(s) {missing} the model reads (source '{src_cfg.name}' "
                f"expects {', '.join(f'{f}: {spec.inputs[f].dtype} {list(spec.inputs[f].shape)}' for f in fields)}; "
                f"fields there: {', '.join(m.fields)})"
            )
        batches = shard_batches(m, fields + list(label_fields.values()), batch_size, key_field=key_field)
        where = m.path
    own_inputs = list(src_cfg.inputs)
    with PredictionWriter(Path(out), fmt) as writer:
        for keys, batch in batches:
            raw = None if isinstance(batch, dict) else batch  # a raw table for the preprocessing
            arrays = batch if raw is None else as_arrays(raw)
            n = len(keys)
            inputs = model_inputs_from(spec, arrays, preprocessing, where=where, raw=raw, provided=own_inputs,
                                       raw_table=raw is not None)
            source_id = torch.full((n,), src_i, dtype=torch.long)
            preds, gate_w = predict_tensors(loaded.model, spec, inputs, source_id, gates)
            columns: dict[str, np.ndarray] = {"key": np.asarray(keys).astype(str)}
            for task, p in preds.items():
                columns[task] = p.numpy()
                if spec.tasks[task].type == "multiclass":
                    columns[f"{task}.class"] = p.argmax(-1).numpy()
            for task, f in label_fields.items():
                columns[f"label.{task}"] = np.asarray(arrays[f])
            for k, w in gate_w.items():
                columns[f"gate.{k}"] = w.numpy()
            writer.write(columns)
    return writer.rows
