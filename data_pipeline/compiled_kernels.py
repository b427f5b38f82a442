"""The compiled loops of `shards write` (encode_kernels.c, a plain C library that setuptools
builds beside this file at install, as `_encode_kernels<suffix>`, when a C compiler is there;
importing it as a module raises ImportError), called with ctypes, which releases the GIL for
the call: encoders on two threads run on two cores.

Each function returns None when the library is absent (no compiler at install, a file that does
not load, or MANYTASK_NO_COMPILED_KERNELS=1, read at the first call), and its caller runs its
numpy code instead: both give the same values (tests/test_tables.py runs both). The library
saves ~0.2 CPU s per 5M rows of the ingestion benchmark (bench/bench_ingest.py): one pass per
batch where numpy makes several.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.machinery
import os
import threading
import warnings
from functools import cache
from pathlib import Path

import numpy as np

_P = ctypes.c_void_p
_I = ctypes.c_int64
_LOADING = threading.Lock()


def library() -> ctypes.CDLL | None:
    """The compiled kernels, or None: not built, turned off by the environment, not loadable,
    or built from another encode_kernels.c than the one beside this file (the last two warned:
    reinstall to rebuild). `library.cache_clear()` loads it again at the next call."""
    with _LOADING:  # encoder threads' first calls: the first loads, the others find it cached
        return _load()


@cache
def _load() -> ctypes.CDLL | None:
    if os.environ.get("MANYTASK_NO_COMPILED_KERNELS") == "1":
        return None
    here = Path(__file__).parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = here / f"_encode_kernels{suffix}"
        if not path.exists():
            continue
        try:
            lib = ctypes.CDLL(str(path))
        except OSError as e:
            return _unused(f"{path} does not load ({e})")
        source, stamp = here / "encode_kernels.c", getattr(lib, "source_sha256", None)
        if stamp is not None:
            stamp.restype = ctypes.c_char_p
        built_from = stamp().decode() if stamp is not None else "(none)"
        if source.exists() and built_from != hashlib.sha256(source.read_bytes()).hexdigest():
            return _unused(f"{path.name} was built from another {source.name} than the one beside it")
        lib.poly64_splitmix64.argtypes = [_P, _I, _P, _I, _P]
        lib.poly64_splitmix64.restype = _I
        lib.pad_lists.argtypes = [_P, _I, _P, _I, _I, _P, _P, _I, _I, _I, _I, _P]
        lib.pad_lists.restype = _I
        return lib
    return None


library.cache_clear = _load.cache_clear  # type: ignore[attr-defined]


def _unused(why: str) -> None:
    warnings.warn(f"{why}: shards write runs its numpy code (pip install -e . rebuilds the library)",
                  RuntimeWarning, stacklevel=4)
    return None


def _ptr(a: np.ndarray) -> int:
    return a.ctypes.data


def _c_array(a: np.ndarray, dtype) -> np.ndarray:
    """`a` as a C-contiguous, aligned array of `dtype` (a copy only where it is not one)."""
    return np.require(a, dtype, ["C_CONTIGUOUS", "ALIGNED"])


def poly64_splitmix64(data: np.ndarray, offsets: np.ndarray) -> np.ndarray | None:
    """string_hash's hash of each string data[offsets[i]:offsets[i+1]] (uint8 data, int64
    offsets [n + 1]); None without the library. Offsets that go backwards or outside data (an
    invalid Arrow array) raise IndexError naming the string."""
    lib = library()
    if lib is None:
        return None
    data, offsets = _c_array(data, np.uint8), _c_array(offsets, np.int64)
    out = np.empty(max(len(offsets) - 1, 0), np.uint64)
    bad = lib.poly64_splitmix64(_ptr(data), len(data), _ptr(offsets), len(out), _ptr(out))
    if bad >= 0:
        raise IndexError(f"poly64_splitmix64: string {bad} spans bytes {offsets[bad]}..{offsets[bad + 1]}, "
                         f"outside the {len(data)} bytes of the array's data (or backwards)")
    return out


def pad_lists(ids: np.ndarray, index: np.ndarray, starts: np.ndarray, lengths: np.ndarray, k: int,
              pad: int, dtype) -> np.ndarray | None:
    """[n, k] of the integer `dtype`: row r holds ids[index[starts[r] + p]] for
    p < min(lengths[r], k), then `pad`; None without the library. A row whose values lie outside
    index, or point outside ids, raises IndexError naming the row."""
    lib = library()
    if lib is None:
        return None
    out = np.empty((len(starts), k), dtype)
    if out.dtype.kind not in "iu" or out.itemsize not in (1, 2, 4, 8):
        raise TypeError(f"pad_lists: ids are written as integers, not {out.dtype}")
    ids = _c_array(ids, np.int64)
    index = _c_array(index, np.int32 if index.dtype == np.int32 else np.int64)
    starts, lengths = _c_array(starts, np.int64), _c_array(lengths, np.int64)
    bad = lib.pad_lists(_ptr(ids), len(ids), _ptr(index), index.itemsize, len(index), _ptr(starts),
                        _ptr(lengths), len(starts), k, pad, out.itemsize, _ptr(out))
    if bad >= 0:
        raise IndexError(f"pad_lists: row {bad} (values {starts[bad]}.., {lengths[bad]} of them) lies outside "
                         f"its {len(index)} values or points outside its {len(ids)} ids")
    return out
