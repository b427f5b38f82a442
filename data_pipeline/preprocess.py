"""Raw table columns -> model-ready fields, fitted on the training split and recorded in
manifest.json so that training and, later, serving turn raw values into the same inputs.

A column spec is one string per field (the `--features` / `--targets` of `manytask shards
write`):

    [FIELD=]COLUMNS[:KIND][:OPTION...]

COLUMNS is a column name, `c1,c2,...` or a glob (`f*`; several columns make one `[k]` field).
FIELD defaults to the column name. KIND and OPTIONs:

| spec                              | field                                                        |
| --------------------------------- | ------------------------------------------------------------ |
| `city:cat`                        | int64 id from a vocabulary of the training split; 0 = unseen or empty |
| `city:cat:min_count=5:max_vocab=1000` | values seen < 5 times, or beyond the 1000 most frequent, -> 0 |
| `user_id:hash=1048576`            | int64 id 1 + hash(value) mod 1048575, no vocabulary pass; 0 = empty |
| `genres:multi:k=4:sep=\\|`         | int64 `[4]`: a Parquet list or a delimited string; 0 = padding (ignored by pooling), 1 = unseen |
| `age:num`                         | float32, standardised with the training mean / std; missing -> error naming column and row |
| `age:num:raw`                     | float32 as is (still checked for missing values)              |
| `income:num:fill=0`               | missing -> 0 (or `fill=mean`) plus a float32 field `income_missing` (1 where filled) |
| `price:num:log`                   | log1p(value) before standardising                            |
| `ideal=cut:eq=Ideal`              | int64 1 where the value equals `Ideal`, else 0; missing -> -1 (masked label) |
| `col` (no kind)                   | a string column -> `cat`, a list column -> `multi`; numbers pass through as before (float32 / int64) |

Targets use the same syntax. A float target keeps NaN for "no label" (masked), an integer
target -1; a string target (`label:cat` or no kind) gets class ids 0..C-1 from the training
split, -1 for an unseen or empty value. `--min-count` / `--max-vocab` set the defaults of
every vocabulary.

`manifest.json` then holds `"preprocessing": {field: {...}}` (kind, columns, vocabulary file
`vocab/<field>.txt` beside the manifest — one value per line, line 1 is id `first_id` —, size,
oov / pad ids, mean / std, missing policy). `Preprocessor.from_manifest(dir).encode(table)`
reproduces the written fields from raw columns; `copy_preprocessing(cfg, run_dir)` keeps a copy
in the run directory.
"""

from __future__ import annotations

import fnmatch
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from manytask.data_pipeline.manifest import FieldInfo, load_manifest, manifest_path

KINDS = ("cat", "hash", "multi", "num", "eq")
VOCAB_DIR = "vocab"


class SpecError(ValueError):
    """A column spec that cannot be used; the message names the spec and what was expected."""


class MissingValueError(ValueError):
    """A missing or non-finite value in a numeric input column with `missing=error`."""


@dataclass
class ColumnSpec:
    """One parsed column spec (see the module docstring)."""

    text: str
    field: str
    columns: list[str]
    role: str = "input"  # input | target
    kind: str = ""  # one of KINDS, or "" = decided by the column's type
    min_count: int = 1
    max_vocab: int = 0
    buckets: int = 0
    k: int = 0
    sep: str = "|"
    standardize: bool = True
    log: bool = False
    fill: float | str | None = None  # None = refuse missing values; a number or "mean"
    equals: str = ""


_INT_OPTIONS = ("min_count", "max_vocab", "k")


def parse_spec(text: str, role: str = "input", min_count: int = 1, max_vocab: int = 0) -> ColumnSpec:
    """`[FIELD=]COLUMNS[:KIND][:OPTION...]` -> ColumnSpec (columns not yet matched to a table)."""
    head, *opts = text.split(":")
    name, _, cols = head.partition("=") if "=" in head else (head, "", head)
    spec = ColumnSpec(text, name.strip(), [c.strip() for c in cols.split(",") if c.strip()], role,
                      min_count=min_count, max_vocab=max_vocab)
    if not spec.field or not spec.columns:
        raise SpecError(f"column spec '{text}': expected [FIELD=]COLUMN[:KIND][:OPTION...]")
    for opt in opts:
        key, has_value, value = opt.partition("=")
        key = key.strip()
        if key in KINDS:
            if spec.kind:
                raise SpecError(f"column spec '{text}': two kinds ('{spec.kind}' and '{key}')")
            spec.kind = key
            if key == "hash":
                spec.buckets = _int(text, key, value, minimum=2)
            elif key == "eq":
                if not has_value:
                    raise SpecError(f"column spec '{text}': 'eq' needs a value (eq=VALUE)")
                spec.equals = value
            elif has_value:
                raise SpecError(f"column spec '{text}': kind '{key}' takes no value")
        elif key in _INT_OPTIONS:
            setattr(spec, key, _int(text, key, value, minimum=1 if key != "max_vocab" else 0))
        elif key == "sep" and has_value:
            spec.sep = value or "|"
        elif key == "raw" and not has_value:
            spec.standardize = False
        elif key == "log" and not has_value:
            spec.log = True
        elif key == "fill" and has_value:
            spec.fill = "mean" if value == "mean" else _float(text, value)
        elif key == "missing" and value == "error":
            spec.fill = None
        else:
            raise SpecError(
                f"column spec '{text}': unknown option '{opt}' (kinds: {', '.join(KINDS)}; options: "
                "min_count=N, max_vocab=N, k=N, sep=S, raw, log, fill=V|mean, missing=error)"
            )
    if spec.kind == "multi" and not spec.k:
        raise SpecError(f"column spec '{text}': 'multi' needs the list width k=N")
    return spec


def _int(text: str, key: str, value: str, minimum: int) -> int:
    try:
        out = int(value)
    except ValueError:
        out = minimum - 1
    if out < minimum:
        raise SpecError(f"column spec '{text}': '{key}' must be an integer >= {minimum}, got '{value}'")
    return out


def _float(text: str, value: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise SpecError(f"column spec '{text}': fill must be a number or 'mean', got '{value}'") from None


def resolve_specs(specs: list[ColumnSpec], columns: dict[str, str]) -> list[ColumnSpec]:
    """Match each spec's columns (globs allowed) against the table's `columns` (name -> kind
    from table_reader) and decide an empty kind from the column type; SpecError names the spec."""
    names = list(columns)
    for spec in specs:
        picked = []
        for c in spec.columns:
            match = fnmatch.filter(names, c) if any(ch in c for ch in "*?[") else [c] if c in columns else []
            if not match:
                raise SpecError(f"column spec '{spec.text}': no column '{c}' (columns: {', '.join(names[:30])})")
            picked += match
        spec.columns = picked
        types = {columns[c] for c in picked}
        if not spec.kind:
            if types & {"string", "list"}:
                spec.kind = "multi" if "list" in types else "cat"
                if spec.kind == "multi":
                    raise SpecError(f"column spec '{spec.text}': a list column needs ':multi:k=N'")
        if spec.kind in ("cat", "hash", "multi", "eq") and len(picked) != 1:
            raise SpecError(f"column spec '{spec.text}': kind '{spec.kind}' takes one column")
        if spec.kind in ("", "num") and types - {"float", "int", "bool"}:
            raise SpecError(f"column spec '{spec.text}': columns {picked} are {sorted(types)}; "
                            "a numeric field needs numeric columns (use :cat, :hash or :multi)")
    seen: dict[str, str] = {}
    for spec in specs:
        for name in [spec.field] + ([f"{spec.field}_missing"] if spec.fill is not None and spec.kind == "num" else []):
            if name in seen:
                raise SpecError(f"field '{name}' is made by both '{seen[name]}' and '{spec.text}'")
            seen[name] = spec.text
    return specs


# ---------------------------------------------------------------- column access


def _strings(col: Any):
    """A column as a pyarrow string array (numbers printed as text; nulls stay null)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    if not isinstance(col, pa.Array):
        col = pa.array(np.asarray(col).tolist())
    if pa.types.is_dictionary(col.type):
        col = col.dictionary_decode()
    if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
        col = pc.cast(col, pa.string())
    return col


def _distinct(col: Any) -> tuple[Any, np.ndarray]:
    """A column as (distinct values, a pyarrow string array; index of each row's value in it,
    int64 [n], -1 for null). A dictionary array (Parquet's string columns, read so) is used as
    it is; any other column is dictionary-encoded here (one hash per row, in pyarrow)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    if not isinstance(col, pa.Array) or not pa.types.is_dictionary(col.type):
        col = pc.dictionary_encode(_strings(col))
    index = col.indices.to_numpy(zero_copy_only=False)
    if col.null_count:
        index = np.where(np.asarray(col.is_valid(), dtype=bool), index, -1)
    return _strings(col.dictionary), index.astype(np.int64, copy=False)


def _is_dictionary(col: Any) -> bool:
    import pyarrow as pa

    return isinstance(col, (pa.Array, pa.ChunkedArray)) and pa.types.is_dictionary(col.type)


def _floats(col: Any) -> np.ndarray:
    """A column as float64 [n] or [n, ...] (numpy arrays keep their trailing dims); null -> NaN."""
    import pyarrow as pa

    if isinstance(col, (pa.Array, pa.ChunkedArray)):
        return col.cast(pa.float64()).to_numpy(zero_copy_only=False)
    return np.asarray(col, dtype=np.float64)


def _lists(col: Any, sep: str):
    """A list column, or a delimited string column split on `sep`, as a pyarrow list<string>
    (list<dictionary<string>> as it is: Parquet's list columns read as dictionaries)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    if not isinstance(col, pa.Array):
        values = np.asarray(col, dtype=object)
        col = pa.array([None if v is None else list(v) if not isinstance(v, str) else v for v in values])
    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        return pc.split_pattern(col, sep)
    if pa.types.is_fixed_size_list(col.type) or pa.types.is_large_list(col.type):
        col = col.cast(pa.list_(col.type.value_type))
    value_type = col.type.value_type
    if pa.types.is_dictionary(value_type) and pa.types.is_string(value_type.value_type):
        return col
    if pa.types.is_string(col.type):  # a dictionary-encoded string column: decode, then split
        return pc.split_pattern(_strings(col), sep)
    if not pa.types.is_string(value_type):
        col = col.cast(pa.list_(pa.string()))
    return col


def _list_values(lists) -> tuple[Any, np.ndarray]:
    """Every value of a list<string> array, null rows' values included, and each row's value
    count (0 for a null row): (values, counts [n]). Read from the list offsets with numpy
    (pyarrow's list_parent_indices costs ~1 us per value)."""
    offsets = lists.offsets.to_numpy(zero_copy_only=False).astype(np.int64)
    values = lists.values.slice(offsets[0], offsets[-1] - offsets[0])
    counts = np.diff(offsets)
    if lists.null_count:
        counts = np.where(np.asarray(lists.is_valid(), dtype=bool), counts, 0)
    return values, counts


def _list_rows(lists) -> tuple[Any, np.ndarray, np.ndarray, np.ndarray]:
    """The non-empty values of a list<string> array, row by row: (distinct values, index of
    each kept value in them [m], each row's first kept value in that index [n], its number of
    kept values [n]); row i's values are index[starts[i] : starts[i] + lengths[i]]."""
    import pyarrow.compute as pc

    values, counts = _list_values(lists)
    distinct, index = _distinct(values)
    spans = np.diff(lists.offsets.to_numpy(zero_copy_only=False).astype(np.int64))
    empty = np.r_[np.asarray(pc.equal(pc.binary_length(distinct), 0).fill_null(True), dtype=bool), True]
    keep = ~empty[index]  # index -1 (null) -> the appended True
    if lists.null_count:
        keep &= np.repeat(counts > 0, spans)  # a null row's values do not count
    if not keep.all():
        spans = np.bincount(np.repeat(np.arange(len(lists)), spans)[keep], minlength=len(lists))
        index = index[keep]
    return distinct, index, np.cumsum(spans) - spans, spans


# ---------------------------------------------------------------- fields


class FieldEncoder:
    """Base: one spec -> one or two output fields. `fit` sees training rows only (pass 1)."""

    needs_fit = False

    def __init__(self, spec: ColumnSpec):
        self.spec = spec

    def fit(self, cols: dict[str, Any], train: np.ndarray) -> None:
        """Count / accumulate what the encoder needs from the training rows `train` (bool [n])."""

    def finish(self) -> None:
        """After the last `fit`: turn the counts into the vocabulary / statistics."""

    def encode(self, cols: dict[str, Any], row0: int) -> dict[str, np.ndarray]:
        """Raw columns of rows row0.. -> field -> array [n, ...] (row0 only names rows in errors)."""
        raise NotImplementedError

    def record(self) -> dict[str, Any]:
        """What manifest.json records for this field under "preprocessing"."""
        return {"kind": self.kind, "columns": self.spec.columns, "role": self.spec.role, "spec": self.spec.text}

    def vocab_sizes(self) -> dict[str, int]:
        """Fields whose manifest `vocab` is fixed by the encoder (not max + 1 of the data)."""
        return {}

    def write_files(self, folder: Path) -> None:
        """Write the vocabulary file(s) beside a split's manifest (only vocabularies have one)."""


class Vocabulary(FieldEncoder):
    """`cat` (one id per sample) and `multi` (k ids, padded) over a vocabulary of the training
    split's values: most frequent first (ties by value), `min_count` / `max_vocab` applied."""

    needs_fit = True

    def __init__(self, spec: ColumnSpec, values: list[str] | None = None):
        super().__init__(spec)
        self.multi = spec.kind == "multi"
        label = spec.role == "target" and not self.multi
        # cat input: 0 = unseen/empty; cat target: classes from 0, -1 = unseen/empty (masked);
        # multi: 0 = padding (pooling skips it), 1 = unseen.
        self.pad = 0 if self.multi else None
        self.oov = -1 if label else (1 if self.multi else 0)
        self.first_id = 0 if label else (2 if self.multi else 1)
        self.kind = "multi_categorical" if self.multi else "categorical"
        self.counts: dict[str, int] = {}
        self.values = values
        self._lookup = None

    def fit(self, cols: dict[str, Any], train: np.ndarray) -> None:
        # Count each distinct value of the batch once: its rows' dictionary indices are counted
        # with numpy (bincount), only the distinct values reach Python.
        col = cols[self.spec.columns[0]]
        if self.multi:
            lists = _lists(col, self.spec.sep)
            values, counts = _list_values(lists)
            distinct, index = _distinct(values)
            spans = np.diff(lists.offsets.to_numpy(zero_copy_only=False))
            train = np.repeat(train & (counts > 0), spans)
        else:
            distinct, index = _distinct(col)
        counts = np.bincount(index[train & (index >= 0)], minlength=len(distinct))
        seen = np.flatnonzero(counts)
        for value, count in zip(distinct.take(seen).to_pylist(), counts[seen].tolist()):
            if value:  # None and "" are "empty", never vocabulary entries
                self.counts[value] = self.counts.get(value, 0) + count

    def finish(self) -> None:
        ranked = sorted(self.counts.items(), key=lambda kv: (-kv[1], kv[0]))
        kept = [v for v, c in ranked if c >= self.spec.min_count]
        self.values = kept[: self.spec.max_vocab] if self.spec.max_vocab else kept
        self.counts = {}

    @property
    def size(self) -> int:
        return self.first_id + len(self.values)

    def _ids(self, values) -> np.ndarray:
        import pyarrow as pa
        import pyarrow.compute as pc

        if self._lookup is None:
            self._lookup = pa.array(self.values, pa.string())
        idx = pc.index_in(values, value_set=self._lookup).fill_null(-1).to_numpy(zero_copy_only=False)
        return np.where(idx >= 0, idx + self.first_id, self.oov).astype(np.int64)

    def encode(self, cols: dict[str, Any], row0: int) -> dict[str, np.ndarray]:

        col = cols[self.spec.columns[0]]
        if not self.multi and _is_dictionary(col):  # look up each distinct value once
            distinct, index = _distinct(col)
            return {self.spec.field: np.r_[self._ids(distinct), self.oov][index]}
        if not self.multi:
            return {self.spec.field: self._ids(_strings(col))}
        lists = _lists(col, self.spec.sep)
        n, k = len(lists), self.spec.k
        distinct, index, starts, lengths = _list_rows(lists)
        ids = self._ids(distinct)[index]  # each distinct value looked up once
        out = np.full((n, k), self.pad, np.int64)
        for j in range(k):  # column j: the j-th value of every row that has one
            rows = np.flatnonzero(lengths > j)
            out[rows, j] = ids[starts[rows] + j]
        return {self.spec.field: out}

    def record(self) -> dict[str, Any]:
        out = {**super().record(), "vocab_file": f"{VOCAB_DIR}/{self.spec.field}.txt", "size": self.size,
               "first_id": self.first_id, "oov": self.oov, "min_count": self.spec.min_count,
               "max_vocab": self.spec.max_vocab}
        if self.multi:
            out.update(pad=self.pad, k=self.spec.k, sep=self.spec.sep)
        return out

    def vocab_sizes(self) -> dict[str, int]:
        return {self.spec.field: self.size}

    def write_files(self, folder: Path) -> None:
        path = folder / VOCAB_DIR / f"{self.spec.field}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(_escape(v) + "\n" for v in self.values), encoding="utf-8")


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r")


def _unescape(line: str) -> str:
    out, i = [], 0
    while i < len(line):
        ch = line[i]
        if ch == "\\" and i + 1 < len(line):
            out.append({"n": "\n", "r": "\r"}.get(line[i + 1], line[i + 1]))
            i += 2
        else:
            out.append(ch)
            i += 1
    return "".join(out)


_P = np.uint64(0x100000001B3)  # odd multiplier of the polynomial string hash (FNV-1's prime)
_P_INV = np.uint64(pow(int(_P), -1, 1 << 64))  # odd, so invertible modulo 2^64
_HASH_BLOCK = 1 << 20  # bytes hashed per numpy pass: the power tables stay at 8 MiB each
_POWERS: dict[str, np.ndarray] = {}


def _powers(base: np.uint64, count: int) -> np.ndarray:
    """base^0 .. base^(count-1) modulo 2^64 (uint64), cached and grown once per base."""
    name = "p" if base == _P else "inv"
    table = _POWERS.get(name)
    if table is None or len(table) < count:
        size = max(count, _HASH_BLOCK + 1)
        table = np.cumprod(np.r_[np.uint64(1), np.full(size - 1, base, np.uint64)], dtype=np.uint64)
        _POWERS[name] = table
    return table


def hash_strings(values) -> np.ndarray:
    """A stable 64-bit hash of each string of a pyarrow string array, vectorised over the bytes:
    h = splitmix64(sum_j (byte_j + 1) * P^(len - 1 - j) mod 2^64, xor len). Null and "" -> 0.
    numpy's uint64 arithmetic wraps, so the value is the same on every platform.

    Computed as P^(end - 1) * sum_j (byte_j + 1) * P^-g_j over each byte's position g_j in a
    block of the data (P is odd, so P^-1 exists modulo 2^64): one multiply per byte against a
    contiguous slice of the inverse-power table, no per-byte gather."""
    import pyarrow as pa

    values = values.cast(pa.large_string()) if not pa.types.is_large_string(values.type) else values
    n = len(values)
    bufs = values.buffers()
    offsets = np.frombuffer(bufs[1], np.int64, count=n + 1, offset=values.offset * 8)
    data = np.frombuffer(bufs[2], np.uint8) if bufs[2] is not None else np.zeros(0, np.uint8)
    lens = np.diff(offsets)
    h = np.zeros(n, np.uint64)
    i = 0
    while i < n:  # strings i..j-1 span at most _HASH_BLOCK bytes (or are one longer string)
        j = max(i + 1, int(np.searchsorted(offsets, offsets[i] + _HASH_BLOCK, "right")) - 1)
        base = int(offsets[i])
        block = data[base : int(offsets[j])]
        nonempty = lens[i:j] > 0
        if nonempty.any():
            contrib = block.astype(np.uint64)
            contrib += np.uint64(1)
            contrib *= _powers(_P_INV, len(block))[: len(block)]
            sums = np.add.reduceat(contrib, (offsets[i:j] - base)[nonempty])
            ends = offsets[i + 1 : j + 1][nonempty] - base
            h[i:j][nonempty] = sums * _powers(_P, int(ends[-1]))[ends - 1]
        i = j
    h ^= lens.astype(np.uint64)
    h ^= h >> np.uint64(30)  # splitmix64's finaliser: every input bit moves every output bit
    h *= np.uint64(0xBF58476D1CE4E5B9)
    h ^= h >> np.uint64(27)
    h *= np.uint64(0x94D049BB133111EB)
    h ^= h >> np.uint64(31)
    valid = lens > 0
    if values.null_count:
        valid &= values.is_valid().to_numpy(zero_copy_only=False)
    return np.where(valid, h, np.uint64(0))


class HashedIds(FieldEncoder):
    """`hash=N`: id 1 + hash(value) mod (N - 1), 0 for empty — no vocabulary, any cardinality
    (`hash_strings`: vectorised, stable across runs and machines)."""

    kind = "hash"

    def encode(self, cols: dict[str, Any], row0: int) -> dict[str, np.ndarray]:
        col = cols[self.spec.columns[0]]
        if _is_dictionary(col):  # hash each distinct value once
            distinct, index = _distinct(col)
            h = np.r_[hash_strings(distinct), np.uint64(0)][index]
        else:
            h = hash_strings(_strings(col))
        ids = (h % np.uint64(self.spec.buckets - 1)).astype(np.int64) + 1
        return {self.spec.field: np.where(h == 0, 0, ids)}

    def record(self) -> dict[str, Any]:
        return {**super().record(), "size": self.spec.buckets, "oov": 0, "hash": "poly64-splitmix64"}

    def vocab_sizes(self) -> dict[str, int]:
        return {self.spec.field: self.spec.buckets}


class Numeric(FieldEncoder):
    """`num`: float32 (one column: [], several: [c]); log1p on request; mean/std of the training
    split (NaN ignored) for standardising; missing values refused or filled + indicator field."""

    kind = "numeric"

    def __init__(self, spec: ColumnSpec, stats: dict | None = None):
        super().__init__(spec)
        self.needs_fit = spec.role == "input" and (spec.standardize or spec.fill == "mean")
        c = len(spec.columns)
        self.count, self.mean, self.m2 = np.zeros(c), np.zeros(c), np.zeros(c)
        if stats:
            self.mean, self.std = np.asarray(stats["mean"], float), np.asarray(stats["std"], float)
        else:
            self.std = np.ones(c)

    def _values(self, cols: dict[str, Any]) -> np.ndarray:
        x = np.stack([_floats(cols[c]) for c in self.spec.columns], axis=1)  # [n, c]
        if self.spec.log:
            with np.errstate(invalid="ignore", divide="ignore"):
                x = np.log1p(x)
        x[~np.isfinite(x)] = np.nan
        return x

    def fit(self, cols: dict[str, Any], train: np.ndarray) -> None:
        x = self._values(cols)[train]
        valid = ~np.isnan(x)
        n = valid.sum(axis=0)
        if not n.any():
            return
        x[~valid] = 0.0  # (np.nanmean / nansum copy and mask again; these are the same sums)
        mean = x.sum(axis=0) / np.maximum(n, 1)
        m2 = (np.where(valid, x - mean, 0.0) ** 2).sum(axis=0)
        total = self.count + n  # Chan et al.: combine this batch's moments with the running ones
        delta = mean - self.mean
        safe = np.maximum(total, 1)
        self.mean = self.mean + delta * n / safe
        self.m2 = self.m2 + m2 + delta**2 * self.count * n / safe
        self.count = total

    def finish(self) -> None:
        std = np.sqrt(self.m2 / np.maximum(self.count, 1))
        self.std = np.where(std > 0, std, 1.0)

    def encode(self, cols: dict[str, Any], row0: int) -> dict[str, np.ndarray]:
        spec = self.spec
        x = self._values(cols)
        missing = np.isnan(x)
        out = {}
        if spec.role == "input" and missing.any():
            if spec.fill is None:
                row, j = np.argwhere(missing)[0]
                raise MissingValueError(
                    f"column '{spec.columns[j]}' (field '{spec.field}'): missing or non-finite value "
                    f"at row {row0 + row} (0-based data row); give '{spec.field}=...:fill=0' (or "
                    f"fill=mean) to fill it and add a '{spec.field}_missing' indicator"
                )
            fill = self.mean if spec.fill == "mean" else np.full(x.shape[1], float(spec.fill))
            x = np.where(missing, fill, x)
        if spec.role == "input" and spec.fill is not None:
            ind = missing.astype(np.float32)
            out[f"{spec.field}_missing"] = ind[:, 0] if x.shape[1] == 1 else ind
        if spec.standardize and spec.role == "input":
            x = (x - self.mean) / self.std
        x = x.astype(np.float32)
        out[spec.field] = x[:, 0] if x.shape[1] == 1 else x
        return dict(reversed(list(out.items())))  # the field first, then its indicator

    def record(self) -> dict[str, Any]:
        standardized = self.spec.standardize and self.spec.role == "input"
        out = {**super().record(), "standardize": standardized, "log": self.spec.log,
               "missing": "keep" if self.spec.role == "target" else ("error" if self.spec.fill is None else "fill")}
        if standardized or self.spec.fill == "mean":
            out.update(mean=[float(v) for v in self.mean], std=[float(v) for v in self.std])
        if self.spec.role == "input" and self.spec.fill is not None:
            out.update(fill=self.spec.fill, indicator=f"{self.spec.field}_missing")
        return out


class Equals(FieldEncoder):
    """`eq=VALUE`: int64 1 where the (text of the) value equals VALUE, 0 elsewhere, -1 if empty."""

    kind = "equals"

    def encode(self, cols: dict[str, Any], row0: int) -> dict[str, np.ndarray]:
        import pyarrow.compute as pc

        s = _strings(cols[self.spec.columns[0]])
        eq = pc.equal(s, self.spec.equals).fill_null(False).to_numpy(zero_copy_only=False)
        empty = pc.or_(pc.is_null(s), pc.equal(s, "").fill_null(True)).to_numpy(zero_copy_only=False)
        return {self.spec.field: np.where(empty, -1, eq.astype(np.int64))}

    def record(self) -> dict[str, Any]:
        return {**super().record(), "equals": self.spec.equals, "size": 2}

    def vocab_sizes(self) -> dict[str, int]:
        return {self.spec.field: 2}


class Passthrough(FieldEncoder):
    """No kind on numeric columns: float -> float32 (NaN kept), int / bool -> int64 (null -> -1);
    several columns (or an NPZ array) become one `[k]` / `[...]` field."""

    kind = "passthrough"

    def encode(self, cols: dict[str, Any], row0: int) -> dict[str, np.ndarray]:
        import pyarrow as pa

        parts = []
        for c in self.spec.columns:
            col = cols[c]
            if isinstance(col, (pa.Array, pa.ChunkedArray)):
                if pa.types.is_floating(col.type) or col.null_count:
                    a = _floats(col)
                    if not pa.types.is_floating(col.type):
                        a = np.where(np.isnan(a), -1, a).astype(np.int64)
                else:
                    a = col.to_numpy(zero_copy_only=False)
            else:
                a = np.asarray(col)
            parts.append(a)
        single = len(parts) == 1 and (self.spec.field == self.spec.columns[0] or parts[0].ndim > 1)
        arr = parts[0] if single else np.concatenate([p.reshape(len(p), -1) for p in parts], axis=1)
        return {self.spec.field: arr.astype(np.float32 if arr.dtype.kind == "f" else np.int64)}


ENCODERS = {"cat": Vocabulary, "multi": Vocabulary, "hash": HashedIds, "num": Numeric,
            "eq": Equals, "": Passthrough}


def make_encoders(specs: list[ColumnSpec]) -> list[FieldEncoder]:
    return [ENCODERS[s.kind](s) for s in specs]


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
                values = [_unescape(v) for v in lines]
                spec.kind = "multi" if rec["kind"] == "multi_categorical" else "cat"
                encoders.append(Vocabulary(spec, values))
            elif rec["kind"] == "numeric":
                encoders.append(Numeric(spec, rec if "mean" in rec else None))
            else:
                encoders.append(ENCODERS[spec.kind](spec))
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
    """Manifest field specs of one encoded batch, categorical vocab sizes from the encoders."""
    from manytask.data_pipeline.shard_writer import infer_fields

    fields = infer_fields(arrays, layout)
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

