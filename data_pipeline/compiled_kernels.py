"""The compiled loops of `shards write` (encode_kernels.c, built as the extension
`manytask.data_pipeline._encode_kernels` at install when a C compiler is there), called with
ctypes, which releases the GIL for the call: encoders on two threads run on two cores.

Each function returns None when the library is absent (no compiler at install, or
MANYTASK_NO_COMPILED_KERNELS=1), and its caller runs its numpy code instead: both give the same
values (tests/test_tables.py runs both). The library saves ~0.3 CPU s per 5M rows of the
ingestion benchmark (bench/bench_ingest.py): one pass per batch where numpy makes several.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.machinery
import os
import warnings
from functools import cache
from pathlib import Path

import numpy as np

_P = ctypes.c_void_p
_I = ctypes.c_int64


@cache
def library() -> ctypes.CDLL | None:
    """The compiled kernels, or None: not built, turned off by the environment, or built from
    another encode_kernels.c than the one beside this file (warned: reinstall to rebuild)."""
    if os.environ.get("MANYTASK_NO_COMPILED_KERNELS") == "1":
        return None
    here = Path(__file__).parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = here / f"_encode_kernels{suffix}"
        if path.exists():
            lib = ctypes.CDLL(str(path))
            source, stamp = here / "encode_kernels.c", getattr(lib, "source_sha256", None)
            if stamp is not None:
                stamp.restype = ctypes.c_char_p
            built_from = stamp().decode() if stamp is not None else "(none)"
            if source.exists() and built_from != hashlib.sha256(source.read_bytes()).hexdigest():
                warnings.warn(f"{path.name} was built from another {source.name} than the one beside "
                              "it: shards write runs its numpy code (pip install -e . rebuilds it)",
                              RuntimeWarning, stacklevel=2)
                return None
            lib.poly64_splitmix64.argtypes = [_P, _P, _I, _P]
            lib.poly64_splitmix64.restype = None
            lib.pad_lists.argtypes = [_P, _I, _P, _I, _I, _P, _P, _I, _I, _I, _I, _P]
            lib.pad_lists.restype = _I
            return lib
    return None


def _ptr(a: np.ndarray) -> int:
    return a.ctypes.data


def poly64_splitmix64(data: np.ndarray, offsets: np.ndarray) -> np.ndarray | None:
    """string_hash's hash of each string data[offsets[i]:offsets[i+1]] (uint8 data, int64
    offsets [n + 1]); None without the library."""
    lib = library()
    if lib is None:
        return None
    data = np.ascontiguousarray(data, np.uint8)
    offsets = np.ascontiguousarray(offsets, np.int64)
    if len(offsets) and (offsets[0] < 0 or offsets[-1] > len(data)):
        raise IndexError(f"poly64_splitmix64: offsets {offsets[0]}..{offsets[-1]} outside {len(data)} bytes")
    out = np.empty(len(offsets) - 1, np.uint64)
    lib.poly64_splitmix64(_ptr(data), _ptr(offsets), len(out), _ptr(out))
    return out


def pad_lists(ids: np.ndarray, index: np.ndarray, starts: np.ndarray, lengths: np.ndarray, k: int,
              pad: int, dtype: str) -> np.ndarray | None:
    """[n, k] of `dtype`: row r holds ids[index[starts[r] + p]] for p < min(lengths[r], k),
    then `pad`; None without the library."""
    lib = library()
    if lib is None:
        return None
    ids = np.ascontiguousarray(ids, np.int64)
    if index.dtype != np.int32:
        index = np.ascontiguousarray(index, np.int64)
    index = np.ascontiguousarray(index)
    starts, lengths = np.ascontiguousarray(starts, np.int64), np.ascontiguousarray(lengths, np.int64)
    out = np.empty((len(starts), k), dtype)
    bad = lib.pad_lists(_ptr(ids), len(ids), _ptr(index), index.itemsize, len(index), _ptr(starts),
                        _ptr(lengths), len(starts), k, pad, out.itemsize, _ptr(out))
    if bad >= 0:  # (a bug upstream: the kernel stops rather than read outside the arrays)
        raise IndexError(f"pad_lists: row {bad} points outside its {len(index)} values or {len(ids)} ids")
    return out
