"""Raw tables read in record batches: CSV / TSV / Parquet through pyarrow's dataset reader (one
file, a glob or a directory of files), NPZ whole (numpy has no partial reader for it).

Memory is bounded by one batch (`batch_rows`), not by the table: `manytask shards write`
streams a table of any size through `TableSource.batches` twice at most (statistics, then
encoding). Rows keep the files' order (sorted file names), so both passes see the same rows.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

TABLE_SUFFIXES = {
    ".csv": "csv", ".csv.gz": "csv", ".txt": "csv", ".tsv": "tsv", ".tsv.gz": "tsv",
    ".parquet": "parquet", ".pq": "parquet", ".npz": "npz",
}


def table_format(path: str) -> str:
    low = path.lower()
    for suffix, fmt in TABLE_SUFFIXES.items():
        if low.endswith(suffix):
            return fmt
    raise ValueError(f"{path}: unsupported table format (use .csv, .tsv, .parquet or .npz, "
                     "or a directory / glob of them)")


def table_files(input: str | os.PathLike) -> list[str]:
    """The files behind `input`: a file, a directory (its table files, sorted) or a glob."""
    text = str(input)
    if os.path.isdir(text):
        files = sorted(str(p) for p in Path(text).rglob("*") if p.is_file()
                       and not p.name.startswith((".", "_")) and _is_table(p.name))
    elif any(c in text for c in "*?["):
        files = sorted(f for f in glob.glob(text, recursive=True) if os.path.isfile(f))
    else:
        if not os.path.exists(text):
            raise FileNotFoundError(f"{text}: no such file or directory")
        files = [text]
    if not files:
        raise FileNotFoundError(f"{text}: no table files found (.csv, .tsv, .parquet, .npz)")
    formats = {table_format(f) for f in files}
    if len(formats) > 1:
        raise ValueError(f"{text}: mixes table formats {sorted(formats)}; use one format")
    return files


def _is_table(name: str) -> bool:
    try:
        table_format(name)
        return True
    except ValueError:
        return False


@dataclass
class TableSource:
    """A table to stream: `columns` (name -> 'string' | 'list' | 'float' | 'int' | 'bool' |
    'other'), `count_rows()`, `batches(...)`."""

    files: list[str]
    fmt: str
    columns: dict[str, str]
    _npz: dict[str, np.ndarray] | None = None

    def count_rows(self) -> int:
        if self._npz is not None:
            return len(next(iter(self._npz.values()))) if self._npz else 0
        if self.fmt == "parquet":  # from the footers, nothing decoded
            import pyarrow.parquet as pq

            return sum(pq.ParquetFile(f).metadata.num_rows for f in self.files)
        return int(self._dataset({}).count_rows())

    def batches(
        self, columns: list[str], strings: set[str] = frozenset(), batch_rows: int = 131_072,
        dictionaries: set[str] = frozenset(),
    ) -> Iterator[dict[str, Any]]:
        """Column name -> pyarrow Array (numpy array for NPZ) of up to `batch_rows` rows, in
        table order. `strings`: CSV columns read as text whatever they look like (categorical
        ids such as zip codes keep their leading zeros). `dictionaries`: Parquet string columns
        read as dictionary arrays (indices into the column chunk's distinct values) — Parquet
        stores them so, and a vocabulary then counts and looks up each distinct value once per
        batch instead of each row (~10x faster to read for a low-cardinality column)."""
        if self._npz is not None:
            n = self.count_rows()
            for lo in range(0, n, batch_rows):
                yield {c: self._npz[c][lo : lo + batch_rows] for c in columns}
            return
        if self.fmt == "parquet":
            wanted = [c for c in columns if c in dictionaries and self.columns.get(c) in ("string", "list")]
            yield from self._parquet_batches(columns, batch_rows, wanted)
            return
        dataset = self._dataset({c: "string" for c in strings})
        # A scanner yields batches in file order; batch_size caps each batch's rows. Its default
        # read-ahead (16 batches, 4 files) decodes ahead of a slower consumer: with 500k-row
        # Parquet row groups that held ~800 MB; 2 batches keep the reader busy and memory flat.
        for batch in dataset.to_batches(columns=columns, batch_size=batch_rows, batch_readahead=2,
                                        fragment_readahead=1):
            if batch.num_rows:
                yield {c: batch.column(c) for c in columns}

    def _parquet_batches(
        self, columns: list[str], batch_rows: int, dictionaries: list[str]
    ) -> Iterator[dict[str, Any]]:
        """File by file, row group by row group: no read-ahead beyond the row group being
        decoded, so memory is one row group and one batch whatever the table's length.
        (pyarrow.dataset's scanner decodes up to 16 batches x 4 files ahead of a slower
        consumer, and its default `pre_buffer=True` keeps the column chunks it has read: both
        made a 20M-row table cost ~1 GB more than a 5M-row one; bench/bench_ingest.py.)

        `dictionaries` (string or list<string> columns) are read as dictionaries. pyarrow reads
        a list of dictionaries only a whole row group at a time (its batch reader refuses
        nested dictionary columns), so a row group of at most ROW_GROUP_CAP rows is read whole
        and sliced; a larger one, or one whose dictionary changes inside it, is read in batches
        with its list columns as plain strings."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        for path in self.files:
            with pq.ParquetFile(path, pre_buffer=False) as plain:
                leaves = _dictionary_leaves(plain, dictionaries)
            flat = [c for c in dictionaries if leaves.get(c) == c]
            nested = [leaves[c] for c in dictionaries if c in leaves and leaves[c] != c]
            with pq.ParquetFile(path, pre_buffer=False, read_dictionary=flat) as f, \
                    pq.ParquetFile(path, pre_buffer=False, read_dictionary=flat + nested) as whole:
                for g in range(f.num_row_groups):
                    table = None
                    if nested and f.metadata.row_group(g).num_rows <= ROW_GROUP_CAP:
                        try:
                            table = whole.read_row_group(g, columns=columns)
                        except pa.ArrowNotImplementedError:  # the dictionary changes inside it
                            table = None
                    parts = table.to_batches(max_chunksize=batch_rows) if table is not None else \
                        f.iter_batches(batch_size=batch_rows, row_groups=[g], columns=columns)
                    for batch in parts:
                        if batch.num_rows:
                            yield {c: batch.column(c) for c in columns}

    def _dataset(self, types: dict[str, str]):
        import pyarrow as pa
        import pyarrow.dataset as ds

        if self.fmt == "parquet":
            return ds.dataset(self.files, format="parquet")
        from pyarrow import csv

        fmt = ds.CsvFileFormat(
            parse_options=csv.ParseOptions(delimiter="\t" if self.fmt == "tsv" else ","),
            convert_options=csv.ConvertOptions(
                column_types={c: pa.string() for c in types}, strings_can_be_null=False,
            ),
            read_options=csv.ReadOptions(block_size=1 << 22),
        )
        return ds.dataset(self.files, format=fmt)


def read_ahead(batches: Iterator[Any], depth: int = 1) -> Iterator[Any]:
    """`batches`, with the next `depth` of them read in a background thread while the caller
    works on the current one. pyarrow decodes without holding the GIL, so reading overlaps the
    caller's encoding and writing on a second core; memory grows by `depth` batches. An error
    in the reader is raised here, at the batch it stopped at."""
    import queue
    import threading

    done = object()
    slots: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in batches:
                if stop.is_set():
                    return
                slots.put(item)
            slots.put(done)
        except BaseException as err:  # handed to the consumer, raised there
            slots.put(err)

    thread = threading.Thread(target=produce, name="table-read-ahead", daemon=True)
    thread.start()
    try:
        while (item := slots.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue
            try:
                slots.get(timeout=0.05)
            except queue.Empty:
                pass
        thread.join()


ROW_GROUP_CAP = 1 << 19  # rows of a Parquet row group read whole (for list dictionaries)


def _dictionary_leaves(f, columns: list[str]) -> dict[str, str]:
    """Column -> the Parquet leaf path to read as a dictionary: the column itself for a string
    column, its one string leaf (e.g. `genres.list.element`) for a list<string> column."""
    schema = f.metadata.schema
    leaves: dict[str, list] = {}
    for i in range(len(schema)):
        col = schema.column(i)
        leaves.setdefault(col.path.split(".")[0], []).append(col)
    out = {}
    for name in columns:
        found = leaves.get(name, [])
        if len(found) == 1 and found[0].physical_type == "BYTE_ARRAY":
            out[name] = found[0].path
    return out


def open_table(input: str | os.PathLike) -> TableSource:
    """The table(s) at `input`, schema read (for CSV: inferred from the first block)."""
    files = table_files(input)
    fmt = table_format(files[0])
    if fmt == "npz":
        if len(files) > 1:
            raise ValueError(f"{input}: give one .npz file (NPZ is read whole)")
        with np.load(files[0], allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        return TableSource(files, fmt, {k: _numpy_kind(v) for k, v in arrays.items()}, arrays)
    source = TableSource(files, fmt, {})
    if fmt == "parquet":  # the footer alone (pyarrow.dataset, and pandas with it, take ~1 s to import)
        import pyarrow.parquet as pq

        schema = pq.read_schema(files[0])
    else:
        schema = source._dataset({}).schema
    source.columns = {f.name: _arrow_kind(f.type) for f in schema}
    return source


def _arrow_kind(t) -> str:
    import pyarrow as pa

    if pa.types.is_dictionary(t):
        t = t.value_type
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return "string"
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        return "list"
    if pa.types.is_floating(t) or pa.types.is_decimal(t):
        return "float"
    if pa.types.is_integer(t):
        return "int"
    if pa.types.is_boolean(t):
        return "bool"
    if pa.types.is_null(t):
        return "float"  # an all-empty CSV column
    return "other"


def _numpy_kind(a: np.ndarray) -> str:
    kind = a.dtype.kind
    return {"f": "float", "i": "int", "u": "int", "b": "bool", "U": "string", "S": "string"}.get(kind, "other")
