"""A stable 64-bit string hash, vectorised over a pyarrow string array's bytes with numpy
(`hash=N` fields: recorded in manifest.json as `poly64-splitmix64`; it must never change)."""

from __future__ import annotations

import numpy as np

from manytask.data_pipeline import compiled_kernels
from manytask.data_pipeline.arrow_columns import valid_mask

_P = np.uint64(0x100000001B3)  # odd multiplier of the polynomial string hash (FNV-1's prime)
_P_INV = np.uint64(pow(int(_P), -1, 1 << 64))  # odd, so invertible modulo 2^64
_HASH_BLOCK = 1 << 17  # bytes hashed per numpy pass: its uint64 temporaries (1 MiB) stay in cache
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

    With the compiled loops (compiled_kernels.py), by Horner's rule in C, one string after the
    other (3x faster). Else with numpy, as P^(end - 1) * sum_j (byte_j + 1) * P^-g_j over each
    byte's position g_j in a block of the data (P is odd, so P^-1 exists modulo 2^64): one
    multiply per byte against a contiguous slice of the inverse-power table, no per-byte gather."""
    import pyarrow as pa

    if not (pa.types.is_string(values.type) or pa.types.is_large_string(values.type)):
        values = values.cast(pa.large_string())
    n = len(values)
    bufs = values.buffers()
    width = 8 if pa.types.is_large_string(values.type) else 4  # offsets: int64 or int32
    offsets = np.frombuffer(bufs[1], f"i{width}", count=n + 1, offset=values.offset * width).astype(np.int64)
    data = np.frombuffer(bufs[2], np.uint8) if bufs[2] is not None else np.zeros(0, np.uint8)
    lens = np.diff(offsets)
    valid = lens > 0
    if values.null_count:
        valid &= valid_mask(values)
    every = bool(valid.all())  # (the common case: no mask per block)
    h = compiled_kernels.poly64_splitmix64(data, offsets)
    if h is not None:
        return h if every else np.where(valid, h, np.uint64(0))
    h = np.zeros(n, np.uint64)
    i = 0
    while i < n:  # strings i..j-1 span at most _HASH_BLOCK bytes (or are one longer string)
        j = max(i + 1, int(np.searchsorted(offsets, offsets[i] + _HASH_BLOCK, "right")) - 1)
        base = int(offsets[i])
        block = data[base : int(offsets[j])]
        nonempty = slice(None) if every else lens[i:j] > 0
        if every or nonempty.any():
            contrib = np.add(block, np.uint64(1), dtype=np.uint64)
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
    return h if every else np.where(valid, h, np.uint64(0))
