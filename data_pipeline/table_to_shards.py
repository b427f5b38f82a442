"""`manytask shards write`: a raw table (CSV / TSV / Parquet, a file, a directory or a glob;
or one NPZ) -> `train/` and `val/` shard folders with manifest.json, vocabularies and statistics.

The driver of the conversion: the column specs are parsed and matched (column_specs), the field
encoders fitted on the training rows (pass 1, only when a field needs a vocabulary or
statistics) and then applied batch by batch (pass 2) while the shards are written (ShardSink).
Memory is bounded by a few record batches, whatever the table's length.
"""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from manytask.data_pipeline.field_encoders import FieldEncoder
from manytask.data_pipeline.manifest import FieldInfo, Manifest
from manytask.data_pipeline.preprocess import (
    field_infos,
    make_encoders,
    parse_spec,
    preprocessing_record,
    resolve_specs,
)
from manytask.data_pipeline.shard_writer import ShardSink
from manytask.data_pipeline.table_reader import TableSource, open_table, read_ahead


def read_table(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Columns of a (small) CSV/TSV, Parquet or NPZ table read whole: name -> array [n, ...]."""
    source = open_table(path)
    parts = list(source.batches(list(source.columns), batch_rows=1 << 30))
    out = {}
    for name in source.columns:
        cols = [b[name] for b in parts]
        out[name] = np.concatenate([np.asarray(c.to_numpy(zero_copy_only=False)) if hasattr(c, "to_numpy")
                                    else np.asarray(c) for c in cols]) if cols else np.zeros(0)
    return out


ENCODE_THREADS = min(4, os.cpu_count() or 1)  # a batch's field encoders run side by side


def encode_batch(pool: ThreadPoolExecutor, encoders: list[FieldEncoder], cols: dict, row0: int) -> dict[str, np.ndarray]:
    """Every encoder's fields of one batch (rows row0..), in encoder order: field -> [n, ...].
    An encoder's error is raised as it would be one encoder after the other (the first in order)."""
    arrays: dict[str, np.ndarray] = {}
    for fields in pool.map(lambda e: e.encode(cols, row0), encoders):
        arrays.update(fields)
    return arrays


def _write_batch(sinks: dict[str, ShardSink], arrays: dict[str, np.ndarray], val: np.ndarray,
                 shuffle: np.random.Generator) -> None:
    """A batch's training rows, shuffled, to the train sink; its validation rows, in order, to val."""
    train_idx = np.flatnonzero(~val)
    train_idx = train_idx[shuffle.permutation(len(train_idx))]
    sinks["train"].add({k: take_rows(v, train_idx) for k, v in arrays.items()})
    if "val" in sinks:
        val_idx = np.flatnonzero(val)
        sinks["val"].add({k: take_rows(v, val_idx) for k, v in arrays.items()})


class OutputNotEmptyError(ValueError):
    """`shards write` into a folder that already holds files, without force."""


def take_rows(a: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """a[rows] for a [n, ...] array; a row of several values is moved as one opaque item
    (numpy gathers a [n, 4] int64 array ~8x faster so than element by element)."""
    if a.ndim > 1 and a.flags.c_contiguous and a.size:
        row = np.dtype((np.void, a.itemsize * (a.size // len(a))))
        return np.take(a.reshape(len(a), -1).view(row)[:, 0], rows).view(a.dtype).reshape((len(rows),) + a.shape[1:])
    return np.take(a, rows, axis=0)


def val_rows(n: int, val_fraction: float, seed: int):
    """A function rows -> bool mask "goes to val/" that picks exactly round(n * val_fraction) of
    rows 0..n-1, spread evenly over the table, in O(1) memory: row i is in val when
    (a * i + b) mod n < n_val, a bijection of 0..n-1 for a coprime to n."""
    n_val = int(round(n * val_fraction))
    rng = np.random.default_rng(seed)
    b = int(rng.integers(n)) if n else 0
    a = int(n * 0.6180339887498949) | 1 if n > 2 else 1
    while n and math.gcd(a, n) != 1:
        a += 2
    a %= max(n, 1)

    def is_val(rows: np.ndarray) -> np.ndarray:
        if n_val == 0:
            return np.zeros(len(rows), bool)
        pos = (rows.astype(object) * a + b) % n if n > 3_000_000_000 else (rows * a + b) % n
        return np.asarray(pos < n_val, bool)

    return is_val, n_val


def convert_table(
    input: str | os.PathLike,
    out_dir: str | os.PathLike,
    features: list[str],
    targets: list[str],
    samples_per_shard: int = 100_000,
    chunk_size: int = 1024,
    val_fraction: float = 0.1,
    seed: int = 0,
    layout: str = "chunk",
    force: bool = False,
    min_count: int = 1,
    max_vocab: int = 0,
    batch_rows: int = 131_072,
) -> dict[str, Manifest]:
    """Convert a table (file, directory or glob of CSV / TSV / Parquet, or one NPZ) to
    `out_dir/train` and `out_dir/val` (shards + manifest.json + vocabulary files each).

    features / targets: column specs (data_pipeline/preprocess.py). The table is streamed in
    record batches of `batch_rows` (memory is bounded by the batch): pass 1 (only when some field
    needs a vocabulary or statistics) reads the training rows, pass 2 encodes and writes.
    Exactly round(n * val_fraction) rows go to val/, spread over the table (`val_rows`); the
    training rows of each batch are shuffled with `seed`. An `out_dir` that already holds files
    is refused unless `force`. Returns {"train": Manifest, "val": Manifest} (no val/ when 0).
    """
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not force:
        raise OutputNotEmptyError(
            f"{out}: the folder is not empty; `manytask shards write` would replace what is there. "
            "Choose another folder, or pass --force (force=True) to overwrite it"
        )
    source = open_table(input)
    specs = [parse_spec(t, "input", min_count, max_vocab) for t in features]
    specs += [parse_spec(t, "target", min_count, max_vocab) for t in targets]
    encoders = make_encoders(resolve_specs(specs, source.columns))
    n = source.count_rows()
    if n == 0:
        raise ValueError(f"{input}: the table has no rows")
    is_val, n_val = val_rows(n, val_fraction, seed)
    batches = BatchReader(source, encoders, batch_rows)
    # Encoders work on their own columns and state, mostly inside numpy and pyarrow (which let
    # go of the GIL): a batch's encoders run side by side.
    with ThreadPoolExecutor(ENCODE_THREADS, "encode") as pool:
        fit_encoders(pool, encoders, batches, is_val)
        splits = {"train": out / "train"} | ({"val": out / "val"} if n_val else {})
        for folder in splits.values():
            if folder.exists() and force:
                shutil.rmtree(folder)
            folder.mkdir(parents=True, exist_ok=True)
            for e in encoders:
                e.write_files(folder)

        def open_sinks(fields: dict[str, FieldInfo]) -> dict[str, ShardSink]:
            record = preprocessing_record(encoders)
            # Each sink its own field specs: a sink sets its fields' vocab as it closes.
            return {s: ShardSink(folder, {k: replace(f) for k, f in fields.items()}, samples_per_shard,
                                 chunk_size, layout, prefix=s, preprocessing=record) for s, folder in splits.items()}

        sinks = write_splits(pool, encoders, batches, is_val, seed, layout, open_sinks)
    return {s: sink.close() for s, sink in sinks.items()}


class BatchReader:
    """The table's record batches for the encoders: `batches(encoders)` yields (first row,
    column name -> array) with the columns those encoders read, the next batch read ahead in a
    background thread. String columns a vocabulary or hash reads stay text in CSV (zip codes keep
    their leading zeros); vocabulary columns come as dictionaries where Parquet stores them so."""

    def __init__(self, source: TableSource, encoders: list[FieldEncoder], batch_rows: int):
        self.source, self.batch_rows = source, batch_rows
        self.strings = {e.spec.columns[0] for e in encoders if e.spec.kind in ("cat", "hash", "eq")
                        or (e.spec.kind == "multi" and source.columns[e.spec.columns[0]] == "string")}
        self.dictionaries = {e.spec.columns[0] for e in encoders if e.spec.kind in ("cat", "multi")}

    def batches(self, encoders: list[FieldEncoder]) -> Iterator[tuple[int, dict[str, Any]]]:
        wanted = list(dict.fromkeys(c for e in encoders for c in e.spec.columns))
        row0 = 0
        for cols in read_ahead(self.source.batches(wanted, self.strings & set(wanted), self.batch_rows,
                                                   self.dictionaries)):
            yield row0, cols
            row0 += len(next(iter(cols.values())))


def fit_encoders(pool: ThreadPoolExecutor, encoders: list[FieldEncoder], reader: BatchReader, is_val) -> None:
    """Pass 1: the encoders that need vocabularies or statistics see the training rows of every
    batch (`is_val(rows)` -> bool mask of the validation rows), then finish."""
    fitting = [e for e in encoders if e.needs_fit]
    if fitting:
        for row0, cols in reader.batches(fitting):
            train = ~is_val(np.arange(row0, row0 + len(next(iter(cols.values())))))
            list(pool.map(lambda e: e.fit(cols, train), fitting))  # noqa: B023 - used at once
    for e in fitting:
        e.finish()


def write_splits(
    pool: ThreadPoolExecutor, encoders: list[FieldEncoder], reader: BatchReader, is_val, seed: int,
    layout: str, open_sinks: Callable[[dict[str, FieldInfo]], dict[str, ShardSink]],
) -> dict[str, ShardSink]:
    """Pass 2: every batch encoded, its training rows shuffled (seeded by batch) into the train
    sink and its validation rows into val; the shuffle and writing of a batch run in a thread
    while the next batch is encoded (memory: one more encoded batch). The sinks are opened with
    the first batch's field specs; an integer field without a fixed vocabulary gets the same
    `vocab` (max + 1 over both splits: the sinks' `top`) in train and val. Returns the sinks,
    not yet closed."""
    sinks: dict[str, ShardSink] = {}
    writing: Future | None = None
    with ThreadPoolExecutor(1, "write") as writer:
        for b, (row0, cols) in enumerate(reader.batches(encoders)):
            arrays = encode_batch(pool, encoders, cols, row0)
            if not sinks:
                sinks = open_sinks(field_infos(arrays, encoders, layout))
            val = is_val(np.arange(row0, row0 + len(next(iter(arrays.values())))))
            if writing is not None:
                writing.result()  # (raises the writer's error here)
            writing = writer.submit(_write_batch, sinks, arrays, val, np.random.default_rng([seed, b]))
        if writing is not None:
            writing.result()
    # Each sink saw one split: both record the larger top (and so the same vocab).
    for name in sinks["train"].top if sinks else ():
        top = max(sink.top[name] for sink in sinks.values())
        for sink in sinks.values():
            sink.top[name] = top
    return sinks
