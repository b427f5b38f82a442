"""Raw table columns (pyarrow arrays, or numpy for NPZ) in the forms the field encoders work on:
strings, each row's index into its batch's distinct values, floats, lists of strings."""

from __future__ import annotations

from typing import Any

import numpy as np


def strings(col: Any):
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


def distinct_index(col: Any) -> tuple[Any, np.ndarray]:
    """A column as (distinct values, a pyarrow string array; index of each row's value in it,
    integers [n] (int32 as pyarrow's dictionaries hold them), -1 for null). A dictionary array
    (Parquet's string columns, read so) is used as it is; any other column is dictionary-encoded
    here (one hash per row, in pyarrow)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    if not isinstance(col, pa.Array) or not pa.types.is_dictionary(col.type):
        col = pc.dictionary_encode(strings(col))
    index = numpy_of(col.indices)
    if col.null_count:
        index = np.where(np.asarray(col.is_valid(), dtype=bool), index, -1).astype(np.int64)  # (was NaN)
    return strings(col.dictionary), index


def numpy_of(arr) -> np.ndarray:
    """A pyarrow array of numbers as numpy: a view of its buffer when it holds no null (pyarrow's
    own `to_numpy` imports pandas on its first call, ~0.3 s of every `shards write`)."""
    import pyarrow as pa

    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    t = arr.type
    floating = pa.types.is_floating(t)
    if (floating or pa.types.is_integer(t)) and (floating or not arr.null_count):
        out = buffer_values(arr)
        return np.where(valid_mask(arr), out, np.nan) if arr.null_count else out  # a null float is NaN
    return arr.to_numpy(zero_copy_only=False)


def buffer_values(arr) -> np.ndarray:
    """The value buffer of a pyarrow array of numbers as a numpy view, nulls' slots included
    (they hold anything: mask them with valid_mask)."""
    import pyarrow as pa

    t = arr.type
    kind = "f" if pa.types.is_floating(t) else "u" if pa.types.is_unsigned_integer(t) else "i"
    dtype = np.dtype(f"{kind}{t.bit_width // 8}")
    return np.frombuffer(arr.buffers()[1], dtype, count=len(arr), offset=arr.offset * dtype.itemsize)


def int_array(values: np.ndarray):
    """An int64 numpy array as a pyarrow array, sharing its memory (`pa.array` imports pandas on
    its first call; see numpy_of)."""
    import pyarrow as pa

    values = np.ascontiguousarray(values, np.int64)
    return pa.Array.from_buffers(pa.int64(), len(values), [None, pa.py_buffer(values)])


def string_array(values: list[str]):
    """A list of str as a pyarrow string array, built from its buffers (`pa.array` imports
    pandas on its first call; see numpy_of). large_string beyond 2 GiB of text."""
    import pyarrow as pa

    data = [v.encode("utf-8") for v in values]
    offsets = np.zeros(len(data) + 1, np.int64)
    np.cumsum(np.fromiter(map(len, data), np.int64, len(data)), out=offsets[1:])
    large = offsets[-1] >= 2**31
    kind = pa.LargeStringArray if large else pa.StringArray
    return kind.from_buffers(len(data), pa.py_buffer(offsets if large else offsets.astype(np.int32)),
                             pa.py_buffer(b"".join(data)))


def valid_mask(arr) -> np.ndarray:
    """bool [n]: which values of a pyarrow array are not null (from its validity bitmap)."""
    bitmap = arr.buffers()[0]
    if bitmap is None or not arr.null_count:
        return np.ones(len(arr), bool)
    bits = np.unpackbits(np.frombuffer(bitmap, np.uint8), bitorder="little")
    return bits[arr.offset : arr.offset + len(arr)].astype(bool)


def is_dictionary(col: Any) -> bool:
    import pyarrow as pa

    return isinstance(col, (pa.Array, pa.ChunkedArray)) and pa.types.is_dictionary(col.type)


def floats(col: Any) -> np.ndarray:
    """A column as float64 [n] or [n, ...] (numpy arrays keep their trailing dims); null -> NaN."""
    import pyarrow as pa

    if isinstance(col, (pa.Array, pa.ChunkedArray)):
        return numpy_of(col if col.type == pa.float64() else col.cast(pa.float64()))
    return np.asarray(col, dtype=np.float64)


def string_lists(col: Any, sep: str):
    """A list column, or a delimited string column split on `sep`, as a pyarrow list<string>
    (list<dictionary<string>> as it is: Parquet's list columns read as dictionaries)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    if not isinstance(col, pa.Array):
        values = np.asarray(col, dtype=object)
        col = pa.array([None if v is None else list(v) if not isinstance(v, str) else v for v in values])
    if pa.types.is_null(col.type):  # (a column with no value at all: Parquet's null type)
        return pa.nulls(len(col), pa.list_(pa.string()))
    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        return pc.split_pattern(col, sep)
    if pa.types.is_fixed_size_list(col.type) or pa.types.is_large_list(col.type):
        col = col.cast(pa.list_(col.type.value_type))
    value_type = col.type.value_type
    if pa.types.is_dictionary(value_type) and pa.types.is_string(value_type.value_type):
        return col
    if pa.types.is_string(col.type):  # a dictionary-encoded string column: decode, then split
        return pc.split_pattern(strings(col), sep)
    if not pa.types.is_string(value_type):
        col = col.cast(pa.list_(pa.string()))
    return col


def list_values(lists) -> tuple[Any, np.ndarray]:
    """Every value of a list<string> array, null rows' values included, and each row's value
    count (0 for a null row): (values, counts [n]). Read from the list offsets with numpy
    (pyarrow's list_parent_indices costs ~1 us per value)."""
    offsets = numpy_of(lists.offsets).astype(np.int64)
    values = lists.values.slice(offsets[0], offsets[-1] - offsets[0])
    counts = np.diff(offsets)
    if lists.null_count:
        counts = np.where(np.asarray(lists.is_valid(), dtype=bool), counts, 0)
    return values, counts


def value_positions(offsets: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """The positions of the values of list rows `rows` ([r], ascending) in the list array's
    values, given its offsets ([n + 1], first 0): row i's values are offsets[i]..offsets[i+1]-1."""
    starts, lengths = offsets[rows], offsets[rows + 1] - offsets[rows]
    before = np.cumsum(lengths) - lengths  # where each row's run starts in the output
    return np.repeat(starts - before, lengths) + np.arange(int(lengths.sum()), dtype=np.int64)


def list_rows(lists) -> tuple[Any, np.ndarray, np.ndarray, np.ndarray]:
    """The non-empty values of a list<string> array, row by row: (distinct values, index of
    each kept value in them [m], each row's first kept value in that index [n], its number of
    kept values [n]); row i's values are index[starts[i] : starts[i] + lengths[i]]."""
    import pyarrow.compute as pc

    values, counts = list_values(lists)
    distinct, index = distinct_index(values)
    spans = np.diff(numpy_of(lists.offsets).astype(np.int64))
    empty = np.r_[(buffer_values(pc.binary_length(distinct)) == 0) | ~valid_mask(distinct), True]
    if not (empty[:-1].any() or values.null_count or lists.null_count):  # every value is kept
        return distinct, index, np.cumsum(spans) - spans, spans
    keep = ~empty[index]  # index -1 (null) -> the appended True
    if lists.null_count:
        keep &= np.repeat(counts > 0, spans)  # a null row's values do not count
    if not keep.all():
        spans = np.bincount(np.repeat(np.arange(len(lists)), spans)[keep], minlength=len(lists))
        index = index[keep]
    return distinct, index, np.cumsum(spans) - spans, spans

