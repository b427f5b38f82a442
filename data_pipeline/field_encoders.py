"""Field encoders: one column spec -> one or two model-ready fields. Each is fitted on the
training split's rows (vocabularies, mean / std), encodes record batches of raw columns and says
what manifest.json records for it (data_pipeline/preprocess.py describes the kinds)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from manytask.data_pipeline import compiled_kernels
from manytask.data_pipeline.arrow_columns import (
    buffer_values,
    distinct_index,
    floats,
    int_array,
    is_dictionary,
    list_rows,
    list_values,
    numpy_of,
    string_array,
    string_lists,
    strings,
    valid_mask,
    value_positions,
)
from manytask.data_pipeline.column_specs import ColumnSpec
from manytask.data_pipeline.string_hash import hash_strings

VOCAB_DIR = "vocab"


class MissingValueError(ValueError):
    """A missing or non-finite value in a numeric input column with `missing=error`."""


ID_DTYPES = ("int8", "int16", "int32", "int64")


def id_dtype(size: int) -> str:
    """The narrowest signed integer dtype holding the ids 0..size-1 and -1 (a masked label).

    Id fields are written so (manifest `dtype`, and `dtype` in their preprocessing record):
    an 8-byte id per value was most of the bytes a table conversion shuffles, hashes and
    writes. Models cast ids to int64 when they look them up (`InputEncoder`, the losses), so
    the narrow type stops at the batch. Manifests written before `dtype` was recorded hold
    int64 ids (`Preprocessor.from_manifest` then encodes int64)."""
    for name in ID_DTYPES:
        if size - 1 <= np.iinfo(name).max:
            return name
    return "int64"


class FieldEncoder:
    """Base: one spec -> one or two output fields. `fit` sees training rows only (pass 1)."""

    needs_fit = False

    def __init__(self, spec: ColumnSpec):
        self.spec = spec
        self.stored_dtype = ""  # an id field's dtype as a manifest recorded it ("" = id_dtype(size))

    @property
    def dtype(self) -> str:
        """An id field's dtype: as recorded, else the narrowest for its `size` (id encoders)."""
        return self.stored_dtype or id_dtype(self.size)

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


class ValueCounts:
    """How often each string value was seen, summed over batches inside pyarrow: `add` keeps a
    batch's (distinct values, counts); past COMPACT_ROWS kept rows they are summed per value
    (group_by), so memory stays at about the vocabulary's size and no value passes through
    Python until the ranking."""

    COMPACT_ROWS = 1 << 20

    def __init__(self):
        self.parts: list = []  # pyarrow tables (value: large_string, count: int64)
        self.rows = 0

    def add(self, distinct, counts: np.ndarray) -> None:
        """distinct: pyarrow string array; counts: int [len(distinct)], how often each was seen."""
        import pyarrow as pa

        seen = np.flatnonzero(counts)
        if not len(seen):
            return
        part = pa.table({"value": distinct.take(int_array(seen)).cast(pa.large_string()),
                         "count": int_array(counts[seen].astype(np.int64))})
        self.parts.append(part)
        self.rows += len(part)
        if self.rows > self.COMPACT_ROWS:
            self.parts = [self._summed()]
            self.rows = len(self.parts[0])

    def _summed(self):
        """The kept parts as one table, each value once with its total count (nulls dropped)."""
        import pyarrow as pa
        import pyarrow.compute as pc

        table = pa.concat_tables(self.parts).combine_chunks()
        encoded = pc.dictionary_encode(table["value"]).chunk(0)
        valid = valid_mask(encoded)
        sums = np.bincount(buffer_values(encoded.indices)[valid], minlength=len(encoded.dictionary),
                           weights=numpy_of(table["count"])[valid])  # (float64: exact below 2^53)
        return pa.table({"value": encoded.dictionary, "count": int_array(sums.astype(np.int64))})

    def ranked(self, min_count: int, max_vocab: int) -> list[str]:
        """The values seen at least `min_count` times, most frequent first (ties by value, in
        code point order: UTF-8 bytes sort so), at most `max_vocab` of them (0 = all). None and
        "" are "empty", never vocabulary entries."""
        import pyarrow.compute as pc

        if not self.rows:
            return []
        table = self._summed()
        values, counts = table["value"].chunk(0), numpy_of(table["count"])
        kept = np.flatnonzero((buffer_values(pc.binary_length(values)) > 0) & (counts >= min_count))
        values, counts = values.take(int_array(kept)), counts[kept]
        by_value = np.empty(len(values), np.int64)
        by_value[buffer_values(pc.sort_indices(values))] = np.arange(len(values))
        order = np.lexsort((by_value, -counts))  # count descending, then value ascending
        if max_vocab:
            order = order[:max_vocab]
        return values.take(int_array(order)).to_pylist()


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
        self.counts = ValueCounts()
        self.values = values
        self._lookup = None

    def fit(self, cols: dict[str, Any], train: np.ndarray) -> None:
        # Count each distinct value of the batch once: its rows' dictionary indices are counted
        # with numpy (bincount) and summed over batches in pyarrow (ValueCounts). Every value is
        # counted, then the few rows that do not count (validation rows, null lists) are
        # subtracted: no mask over every value.
        col = cols[self.spec.columns[0]]
        if self.multi:
            lists = string_lists(col, self.spec.sep)
            values, _ = list_values(lists)
            distinct, index = distinct_index(values)
            offsets = numpy_of(lists.offsets).astype(np.int64)
            # Validation rows' values, and a null row's (if it spans any), do not count.
            dropped = np.flatnonzero(~train | ~valid_mask(lists) if lists.null_count else ~train)
            drop = index[value_positions(offsets - offsets[0], dropped)]
        else:
            distinct, index = distinct_index(col)
            drop = index[~train]
        if len(index) and index.min() < 0:  # nulls (index -1) are never counted
            index, drop = index[index >= 0], drop[drop >= 0]
        counts = np.bincount(index, minlength=len(distinct)) - np.bincount(drop, minlength=len(distinct))
        self.counts.add(distinct, counts)

    def finish(self) -> None:
        self.values = self.counts.ranked(self.spec.min_count, self.spec.max_vocab)
        self.counts = ValueCounts()

    @property
    def size(self) -> int:
        return self.first_id + len(self.values)

    def _ids(self, values) -> np.ndarray:
        import pyarrow.compute as pc

        if self._lookup is None:
            self._lookup = string_array(self.values)
        found = pc.index_in(values, value_set=self._lookup)  # null where not in the vocabulary
        idx = np.where(valid_mask(found), buffer_values(found), -1)
        return np.where(idx >= 0, idx + self.first_id, self.oov).astype(self.dtype)

    def _lookup_table(self, distinct) -> np.ndarray:
        """The ids of a batch's distinct values, then the OOV id for index -1 (null): [d + 1]."""
        ids = self._ids(distinct)
        return np.append(ids, np.array(self.oov, ids.dtype))

    def encode(self, cols: dict[str, Any], row0: int) -> dict[str, np.ndarray]:
        col = cols[self.spec.columns[0]]
        if not self.multi and is_dictionary(col):  # look up each distinct value once
            distinct, index = distinct_index(col)
            return {self.spec.field: self._lookup_table(distinct)[index]}
        if not self.multi:
            return {self.spec.field: self._ids(strings(col))}
        lists = string_lists(col, self.spec.sep)
        n, k = len(lists), self.spec.k
        distinct, index, starts, lengths = list_rows(lists)
        out = compiled_kernels.pad_lists(self._ids(distinct), index, starts, lengths, k, self.pad, self.dtype)
        if out is not None:
            return {self.spec.field: out}
        # Kept value v of row r at position p = v - starts[r] goes to out[r, p] (p < k): one
        # scatter into the flat [n * k] array; positions past a row's values keep the padding.
        row_base = np.repeat(np.arange(n, dtype=np.int64) * k - starts, lengths)
        target = row_base + np.arange(len(index), dtype=np.int64)
        ids = self._ids(distinct)[index]  # each distinct value looked up once
        if len(lengths) and lengths.max() > k:  # rows longer than k keep their first k values
            fits = target - np.repeat(np.arange(n, dtype=np.int64) * k, lengths) < k
            target, ids = target[fits], ids[fits]
        out = np.full(n * k, self.pad, self.dtype)
        out[target] = ids
        return {self.spec.field: out.reshape(n, k)}

    def record(self) -> dict[str, Any]:
        out = {**super().record(), "vocab_file": f"{VOCAB_DIR}/{self.spec.field}.txt", "size": self.size,
               "first_id": self.first_id, "oov": self.oov, "min_count": self.spec.min_count,
               "max_vocab": self.spec.max_vocab, "dtype": self.dtype}
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


def unescape(line: str) -> str:
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



class HashedIds(FieldEncoder):
    """`hash=N`: id 1 + hash(value) mod (N - 1), 0 for empty — no vocabulary, any cardinality
    (`hash_strings`: vectorised, stable across runs and machines)."""

    kind = "hash"

    def encode(self, cols: dict[str, Any], row0: int) -> dict[str, np.ndarray]:
        col = cols[self.spec.columns[0]]
        if is_dictionary(col):  # hash each distinct value once
            distinct, index = distinct_index(col)
            h = np.r_[hash_strings(distinct), np.uint64(0)][index]
        else:
            h = hash_strings(strings(col))
        ids = h % np.uint64(self.spec.buckets - 1)
        ids += np.uint64(1)
        ids[h == 0] = 0  # empty
        return {self.spec.field: ids.astype(self.dtype)}

    @property
    def size(self) -> int:
        return self.spec.buckets

    def record(self) -> dict[str, Any]:
        return {**super().record(), "size": self.spec.buckets, "oov": 0, "hash": "poly64-splitmix64",
                "dtype": self.dtype}

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

    def _values(self, cols: dict[str, Any]) -> list[np.ndarray]:
        """Each column as float64 [n] (log1p on request), NaN where missing or not finite.
        Column by column: numpy reduces a [n] array ~2x faster than a [n, 1] one along rows."""
        out = []
        for c in self.spec.columns:
            v = floats(cols[c])
            if v.ndim != 1:
                raise ValueError(f"column '{c}' (field '{self.spec.field}'): ':num' takes one number per "
                                 f"row, got arrays of shape {list(v.shape[1:])}; give it without a kind")
            if self.spec.log:
                with np.errstate(invalid="ignore", divide="ignore"):
                    v = np.log1p(v)
            infinite = np.isinf(v)
            out.append(np.where(infinite, np.nan, v) if infinite.any() else v)
        return out

    def fit(self, cols: dict[str, Any], train: np.ndarray) -> None:
        for j, v in enumerate(self._values(cols)):
            y = v[train & ~np.isnan(v)]
            if not len(y):
                continue
            mean = y.sum() / len(y)
            d = y - mean
            m2 = np.square(d, out=d).sum()  # (not np.dot: BLAS threads cost ~30x more here)
            total = self.count[j] + len(y)  # Chan et al.: this batch's moments with the running ones
            delta = mean - self.mean[j]
            self.mean[j] += delta * len(y) / total
            self.m2[j] += m2 + delta**2 * self.count[j] * len(y) / total
            self.count[j] = total

    def finish(self) -> None:
        std = np.sqrt(self.m2 / np.maximum(self.count, 1))
        self.std = np.where(std > 0, std, 1.0)

    def encode(self, cols: dict[str, Any], row0: int) -> dict[str, np.ndarray]:
        spec = self.spec
        values = self._values(cols)
        missing = [np.isnan(v) for v in values]
        if spec.role == "input" and spec.fill is None and any(m.any() for m in missing):
            row, j = min((int(np.argmax(m)), j) for j, m in enumerate(missing) if m.any())
            raise MissingValueError(
                f"column '{spec.columns[j]}' (field '{spec.field}'): missing or non-finite value "
                f"at row {row0 + row} (0-based data row); give '{spec.field}=...:fill=0' (or "
                f"fill=mean) to fill it and add a '{spec.field}_missing' indicator"
            )
        fields, indicators = [], []
        for j, (v, m) in enumerate(zip(values, missing)):
            if spec.role == "input" and spec.fill is not None:
                if m.any():
                    v = np.where(m, self.mean[j] if spec.fill == "mean" else float(spec.fill), v)
                indicators.append(m.astype(np.float32))
            if spec.standardize and spec.role == "input":
                v = (v - self.mean[j]) / self.std[j]
            fields.append(v.astype(np.float32))
        one = len(fields) == 1
        out = {spec.field: fields[0] if one else np.stack(fields, axis=1)}  # [n] or [n, c]
        if indicators:
            out[f"{spec.field}_missing"] = indicators[0] if one else np.stack(indicators, axis=1)
        return out

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
    """`eq=VALUE`: 1 where the (text of the) value equals VALUE, 0 elsewhere, -1 if empty."""

    kind = "equals"
    size = 2

    def encode(self, cols: dict[str, Any], row0: int) -> dict[str, np.ndarray]:
        import pyarrow.compute as pc

        s = strings(cols[self.spec.columns[0]])
        eq = pc.equal(s, self.spec.equals).fill_null(False).to_numpy(zero_copy_only=False)
        empty = pc.or_(pc.is_null(s), pc.equal(s, "").fill_null(True)).to_numpy(zero_copy_only=False)
        return {self.spec.field: np.where(empty, -1, eq).astype(self.dtype)}

    def record(self) -> dict[str, Any]:
        return {**super().record(), "equals": self.spec.equals, "size": 2, "dtype": self.dtype}

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
                    a = floats(col)
                    if not pa.types.is_floating(col.type):
                        a = np.where(np.isnan(a), -1, a).astype(np.int64)
                else:
                    a = numpy_of(col)
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

