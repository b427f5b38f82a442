"""Raw table columns -> model-ready fields, fitted on the training split and recorded in
manifest.json so that training and, later, serving turn raw values into the same inputs.

A column spec is one string per field (the `--features` / `--targets` of `manytask shards
write`):

    [FIELD=]COLUMNS[:KIND][:OPTION...]

COLUMNS is a column name, `c1,c2,...` or a glob (`f*`; several columns make one `[k]` field).
FIELD defaults to the column name. KIND and OPTIONs:

| spec                              | field                                                        |
| --------------------------------- | ------------------------------------------------------------ |
| `city:cat`                        | id from a vocabulary of the training split; 0 = unseen or empty |
| `city:cat:min_count=5:max_vocab=1000` | values seen < 5 times, or beyond the 1000 most frequent, -> 0 |
| `user_id:hash=1048576`            | id 1 + hash(value) mod 1048575, no vocabulary pass; 0 = empty |
| `genres:multi:k=4:sep=\\|`         | ids `[4]`: a Parquet list or a delimited string; 0 = padding (ignored by pooling), 1 = unseen |
| `age:num`                         | float32, standardised with the training mean / std; missing -> error naming column and row |
| `age:num:raw`                     | float32 as is (still checked for missing values)              |
| `income:num:fill=0`               | missing -> 0 (or `fill=mean`) plus a float32 field `income_missing` (1 where filled) |
| `price:num:log`                   | log1p(value) before standardising                            |
| `ideal=cut:eq=Ideal`              | 1 where the value equals `Ideal`, else 0; missing -> -1 (masked label) |
| `col` (no kind)                   | a string column -> `cat`, a list column -> `multi`; numbers pass through as before (float32 / int64) |

Targets use the same syntax. A float target keeps NaN for "no label" (masked), an integer
target -1; a string target (`label:cat` or no kind) gets class ids 0..C-1 from the training
split, -1 for an unseen or empty value. `--min-count` / `--max-vocab` set the defaults of
every vocabulary. Id fields are stored in the narrowest signed integer dtype of their id space
(`field_encoders.id_dtype`: int8 / int16 / int32), recorded as `dtype`.

`manifest.json` then holds `"preprocessing": {field: {...}}` (kind, columns, vocabulary file
`vocab/<field>.txt` beside the manifest — one value per line, line 1 is id `first_id` —, size,
oov / pad ids, mean / std, missing policy). `Preprocessor.from_manifest(dir).encode(table)`
reproduces the written fields from raw columns; `copy_preprocessing(cfg, run_dir)` keeps a copy
in the run directory.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from manytask.data_pipeline.column_specs import (
    KINDS,
    ColumnSpec,
    SpecError,
    parse_spec,
    resolve_specs,
)
from manytask.data_pipeline.field_encoders import (
    ENCODERS,
    VOCAB_DIR,
    FieldEncoder,
    MissingValueError,
    Numeric,
    Vocabulary,
    make_encoders,
    unescape,
)
from manytask.data_pipeline.manifest import FieldInfo, load_manifest, manifest_path
from manytask.data_pipeline.string_hash import hash_strings

ID_KINDS = ("categorical", "multi_categorical", "hash", "equals")  # record kinds of id fields

__all__ = [  # the names other modules and tests import from here
    "KINDS", "VOCAB_DIR", "ColumnSpec", "SpecError", "MissingValueError", "parse_spec", "resolve_specs",
    "make_encoders", "hash_strings", "preprocessing_record", "Preprocessor", "field_infos",
    "copy_preprocessing", "describe",
]


def preprocessing_record(encoders: list[FieldEncoder]) -> dict[str, Any]:
    """field -> how it is made (what manifest.json records under "preprocessing")."""
    out = {}
    for e in encoders:
        out[e.spec.field] = e.record()
        if isinstance(e, Numeric) and e.spec.role == "input" and e.spec.fill is not None:
            out[f"{e.spec.field}_missing"] = {"kind": "missing_indicator", "of": e.spec.field,
                                              "columns": e.spec.columns, "role": "input"}
    return out


# ---------------------------------------------------------------- serving side


class Preprocessor:
    """The preprocessing of a shard folder, applied to raw columns.

    `Preprocessor.from_manifest(path_or_dir)` reads manifest.json's "preprocessing" and its
    vocabulary files; `encode(table)` takes a pyarrow Table, a pandas DataFrame or a dict of
    arrays of RAW columns and returns field -> numpy array `[n, ...]`, the arrays `manytask
    shards write` wrote for the same rows (targets only when their columns are present).
    """

    def __init__(self, encoders: list[FieldEncoder], path: str = ""):
        self.encoders = encoders
        self.path = path

    @property
    def fields(self) -> list[str]:
        """Every field it makes (inputs, missing indicators, targets), in manifest order."""
        return list(preprocessing_record(self.encoders))

    @classmethod
    def from_manifest(cls, path_or_dir: str | os.PathLike) -> Preprocessor:
        path = manifest_path(path_or_dir)
        m = load_manifest(path)
        if not m.preprocessing:
            raise ValueError(f"{path}: no 'preprocessing' recorded (these shards were not written "
                             "from a table by `manytask shards write`)")
        encoders = []
        for name, rec in m.preprocessing.items():
            if rec.get("kind") == "missing_indicator":
                continue
            spec = parse_spec(rec["spec"], rec.get("role", "input"))
            spec.field, spec.columns = name, list(rec["columns"])
            if rec["kind"] in ("categorical", "multi_categorical"):
                lines = (path.parent / rec["vocab_file"]).read_text(encoding="utf-8").split("\n")[:-1]
                values = [unescape(v) for v in lines]
                spec.kind = "multi" if rec["kind"] == "multi_categorical" else "cat"
                encoders.append(Vocabulary(spec, values))
            elif rec["kind"] == "numeric":
                encoders.append(Numeric(spec, rec if "mean" in rec else None))
            else:
                encoders.append(ENCODERS[spec.kind](spec))
            if rec["kind"] in ID_KINDS:  # written before dtypes were recorded: int64
                encoders[-1].stored_dtype = rec.get("dtype", "int64")
        return cls(encoders, str(path))

    def encode(self, table: Any, fields: list[str] | None = None) -> dict[str, np.ndarray]:
        """Raw columns -> field -> array [n, ...]; `fields` limits which fields are made
        (default: every input field, and the targets whose columns are present)."""
        cols = _columns(table)
        out: dict[str, np.ndarray] = {}
        for e in self.encoders:
            if fields is not None and e.spec.field not in fields:
                continue
            absent = [c for c in e.spec.columns if c not in cols]
            if absent:
                if e.spec.role == "target":
                    continue
                raise KeyError(f"field '{e.spec.field}' needs column(s) {absent} (have: {', '.join(cols)})")
            out.update(e.encode(cols, 0))
        return out


def _columns(table: Any) -> dict[str, Any]:
    import pyarrow as pa

    if isinstance(table, pa.Table):
        return {name: table.column(name) for name in table.column_names}
    if hasattr(table, "columns") and hasattr(table, "iloc"):  # pandas DataFrame
        return {str(c): pa.array(table[c].tolist()) if table[c].dtype == object else table[c].to_numpy()
                for c in table.columns}
    return dict(table)


def field_infos(
    arrays: dict[str, np.ndarray], encoders: list[FieldEncoder], layout: str = "chunk"
) -> dict[str, FieldInfo]:
    """Manifest field specs of one encoded batch, categorical vocab sizes from the encoders.
    Another integer field's vocab is left 0 (one batch's max says nothing of the table's): the
    shard sinks take it from everything they write."""
    from manytask.data_pipeline.shard_writer import infer_fields

    fields = infer_fields(arrays, layout)
    for info in fields.values():
        info.vocab = 0
    for e in encoders:
        for name, size in e.vocab_sizes().items():
            fields[name].vocab = size
        if isinstance(e, Vocabulary) and e.multi:
            fields[e.spec.field].pad = e.pad
    return fields


def copy_preprocessing(cfg: Any, run_dir: Path) -> list[Path]:
    """Copy each source's training manifest and vocabulary files to
    `<run_dir>/preprocessing/<source name>/` (sources without preprocessing are left out), so a
    trained model can encode raw values without the original shards. Returns the folders."""
    out = []
    for src in cfg.data.sources:
        path = manifest_path(src.train)
        if not path.is_file():
            continue
        m = load_manifest(path)
        if not m.preprocessing:
            continue
        dest = Path(run_dir) / "preprocessing" / src.name
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, dest / path.name)
        for rec in m.preprocessing.values():
            if "vocab_file" in rec:
                (dest / rec["vocab_file"]).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path.parent / rec["vocab_file"], dest / rec["vocab_file"])
        out.append(dest)
    return out


def describe(record: dict[str, Any]) -> str:
    """A one-line summary of a field's preprocessing (for `shards inspect`)."""
    kind = record.get("kind", "?")
    cols = ",".join(record.get("columns", []))
    extra = []
    if "size" in record:
        extra.append(f"size {record['size']}")
    if record.get("log"):
        extra.append("log1p")
    if "mean" in record and record.get("standardize"):
        extra.append("standardised (mean " + ", ".join(f"{v:.4g}" for v in record["mean"][:3]) + ")")
    if record.get("missing") == "fill":
        extra.append(f"missing -> {record.get('fill')} + {record.get('indicator')}")
    if "vocab_file" in record:
        extra.append(record["vocab_file"])
    return f"{kind} of {cols}" + (f" ({'; '.join(extra)})" if extra else "")

