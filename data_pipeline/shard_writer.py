"""Write arrays as WebDataset shards plus manifest.json, in the chunk or the sample layout.

- chunk layout (default): each tar key holds up to `chunk_size` consecutive samples; every field
  is one `.npy` array with that leading dim. Reading is a memcpy per chunk, no per-sample work.
- sample layout: one sample per key (`.cls` for integer scalars, `.npy` otherwise, `.json` on
  request) — what any other WebDataset tool reads and writes.

Missing labels: a float field may hold NaN ("no label for this sample") and an integer label
field a negative value; the loader turns both into mask False.
"""

from __future__ import annotations

import io
import json
import os
import re
from pathlib import Path

import numpy as np
import numpy.lib.format as npformat
from webdataset import TarWriter

from manytask.data_pipeline.manifest import FieldInfo, Manifest, ShardInfo, write_manifest

# An integer mtime: webdataset stamps time.time() (a float) otherwise, and tarfile then adds a
# PAX header to every member, which doubles the members to parse and halves read speed.
TAR_MTIME = 0
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]*$")


def npy_bytes(arr: np.ndarray, _headers: dict = {}) -> bytes:  # noqa: B006 - a deliberate cache
    """`.npy` encoding of `arr` (header cached per dtype/shape; payload is `arr.tobytes()`)."""
    arr = np.asarray(arr)  # keeps 0-d scalars 0-d (ascontiguousarray would make them [1])
    key = (arr.dtype.str, arr.shape)
    header = _headers.get(key)
    if header is None:
        buf = io.BytesIO()
        meta = {"descr": npformat.dtype_to_descr(arr.dtype), "fortran_order": False, "shape": arr.shape}
        npformat.write_array_header_1_0(buf, meta)
        header = buf.getvalue()
        if len(_headers) < 1024:
            _headers[key] = header
    return header + arr.tobytes()  # C order, matching fortran_order False


def infer_fields(
    arrays: dict[str, np.ndarray], layout: str, exts: dict[str, str] | None = None
) -> dict[str, FieldInfo]:
    """Manifest field specs for `arrays` ([n, ...] each): dtype, per-sample shape, ext, vocab."""
    fields = {}
    for name, arr in arrays.items():
        if not _NAME.match(name):
            raise ValueError(f"field name {name!r}: use letters, digits, '_' or '-' (no dots)")
        if arr.dtype.hasobject or arr.dtype.kind not in "biuf":
            raise ValueError(f"field {name!r}: dtype {arr.dtype} is not numeric")
        dtype, ext = arr.dtype, "npy"
        if layout == "sample" and arr.ndim == 1 and arr.dtype.kind in "iub":
            dtype, ext = np.dtype(np.int64), "cls"  # webdataset's class-label convention
        ext = (exts or {}).get(name, ext)
        if layout == "chunk" and ext != "npy":
            raise ValueError(f"field {name!r}: the chunk layout stores every field as npy")
        vocab = 0
        if arr.dtype.kind in "iub" and arr.size:
            top = int(arr.max())
            vocab = top + 1 if top >= 0 else 0
        fields[name] = FieldInfo(dtype.name, tuple(arr.shape[1:]), ext, vocab)
    return fields


def write_shards(
    out_dir: str | os.PathLike,
    arrays: dict[str, np.ndarray],
    samples_per_shard: int = 100_000,
    chunk_size: int = 1024,
    layout: str = "chunk",
    prefix: str = "shard",
    exts: dict[str, str] | None = None,
    vocab: dict[str, int] | None = None,
) -> Manifest:
    """Write `arrays` (field -> [n, ...], same n) as `<prefix>-000000.tar`, ... + manifest.json.

    chunk layout: each shard holds `samples_per_shard` samples in keys of `chunk_size`.
    sample layout: one key per sample; `exts` may ask for `json` for a field.
    vocab: field -> number of ids, overriding max + 1 of these arrays (give train and val
    splits the same value).
    Returns the written Manifest (its `path` set). Shards `<prefix>-NNNNNN.tar` left over from a
    larger earlier write to the same folder are removed so the folder matches the manifest.
    """
    if layout not in ("chunk", "sample"):
        raise ValueError(f"layout must be 'chunk' or 'sample', got {layout!r}")
    if not arrays:
        raise ValueError("write_shards: no fields given")
    sizes = {k: len(v) for k, v in arrays.items()}
    n = next(iter(sizes.values()))
    if any(s != n for s in sizes.values()):
        raise ValueError(f"write_shards: fields have different sample counts {sizes}")
    if samples_per_shard < 1 or chunk_size < 1:
        raise ValueError("samples_per_shard and chunk_size must be positive")
    chunk = chunk_size if layout == "chunk" else 1
    arrays = {k: np.asarray(v) for k, v in arrays.items()}
    fields = infer_fields(arrays, layout, exts)
    for name, v in (vocab or {}).items():
        fields[name].vocab = int(v)
    for name, info in fields.items():
        arrays[name] = arrays[name].astype(info.dtype, copy=False)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shards = []
    for s, lo in enumerate(range(0, n, samples_per_shard)):
        hi = min(lo + samples_per_shard, n)
        url = f"{prefix}-{s:06d}.tar"
        members, offsets = _write_tar(out / url, arrays, fields, lo, hi, chunk)
        shards.append(ShardInfo(url, hi - lo, members, offsets=offsets))
    _remove_stale(out, prefix, len(shards))
    manifest = Manifest(layout, chunk, fields, shards)
    write_manifest(manifest, out)
    return manifest


def _write_tar(path, arrays, fields, lo, hi, chunk) -> tuple[list[int], list[int]]:
    """Write one shard; returns (samples per key, byte offset of each key's first header)."""
    members, offsets = [], []
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f, TarWriter(f, encoder=False, mtime=TAR_MTIME) as tw:
        for a in range(lo, hi, chunk):
            b = min(a + chunk, hi)
            sample = {"__key__": f"{a:010d}"}
            for name, info in fields.items():
                arr = arrays[name]
                if chunk > 1:
                    sample[info.suffix(name)] = npy_bytes(arr[a:b])
                elif info.ext == "cls":
                    sample[info.suffix(name)] = str(int(arr[a])).encode()
                elif info.ext == "json":
                    sample[info.suffix(name)] = json.dumps(arr[a].tolist()).encode()
                else:
                    sample[info.suffix(name)] = npy_bytes(arr[a])
            offsets.append(tw.tarstream.offset)  # where this key's first header starts
            tw.write(sample)
            members.append(b - a)
    os.replace(tmp, path)
    return members, offsets


def _remove_stale(out: Path, prefix: str, count: int) -> None:
    pattern = re.compile(re.escape(prefix) + r"-(\d{6})\.tar$")
    for p in out.iterdir():
        m = pattern.match(p.name)
        if m and int(m.group(1)) >= count:
            p.unlink()
