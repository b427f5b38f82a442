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
import tarfile
from pathlib import Path

import numpy as np
import numpy.lib.format as npformat

from manytask.data_pipeline.integrity import HashingWriter, digest
from manytask.data_pipeline.manifest import (
    FieldInfo,
    Manifest,
    ShardInfo,
    sample_bytes,
    write_manifest,
)

# An integer mtime: webdataset stamps time.time() (a float) otherwise, and tarfile then adds a
# PAX header to every member, which doubles the members to parse and halves read speed.
TAR_MTIME = 0
BLOCK_BYTES = 16 << 20  # at most this much array data is laid out (and copied) per block write
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]*$")


def npy_header(arr: np.ndarray, _headers: dict = {}) -> bytes:  # noqa: B006 - a deliberate cache
    """The `.npy` header of `arr` (format 1.0, C order), cached per dtype and shape."""
    key = (arr.dtype.str, arr.shape)
    header = _headers.get(key)
    if header is None:
        buf = io.BytesIO()
        meta = {"descr": npformat.dtype_to_descr(arr.dtype), "fortran_order": False, "shape": arr.shape}
        npformat.write_array_header_1_0(buf, meta)
        header = buf.getvalue()
        if len(_headers) < 1024:
            _headers[key] = header
    return header


def npy_parts(arr: np.ndarray) -> list:
    """`.npy` encoding of `arr` as [header, payload]: the payload is the array's own memory
    when it is C-contiguous (no copy; the caller joins or hashes it), else a C-order copy."""
    arr = np.asarray(arr)  # keeps 0-d scalars 0-d (ascontiguousarray would make them [1])
    payload = arr.data.cast("B") if arr.flags.c_contiguous and arr.ndim else arr.tobytes()
    return [npy_header(arr), payload]


def npy_bytes(arr: np.ndarray) -> bytes:
    """`.npy` encoding of `arr` (header cached per dtype/shape; payload is `arr.tobytes()`)."""
    return b"".join(npy_parts(arr))


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
    Returns the written Manifest (its `path` set), with each shard's size and checksums. Shards
    `<prefix>-NNNNNN.tar` left over from a larger earlier write to the same folder are removed
    so the folder matches the manifest.
    """
    if not arrays:
        raise ValueError("write_shards: no fields given")
    sizes = {k: len(v) for k, v in arrays.items()}
    n = next(iter(sizes.values()))
    if any(s != n for s in sizes.values()):
        raise ValueError(f"write_shards: fields have different sample counts {sizes}")
    arrays = {k: np.asarray(v) for k, v in arrays.items()}
    sink = ShardSink(out_dir, infer_fields(arrays, layout, exts), samples_per_shard, chunk_size,
                     layout, prefix)
    for name, v in (vocab or {}).items():
        sink.fields[name].vocab = int(v)
        sink.fixed_vocab.add(name)
    sink.add(arrays)
    return sink.close()


class ShardSink:
    """Shards written as arrays arrive: `add({field: [n, ...]})` any number of times, then
    `close()` writes manifest.json and returns the Manifest. Memory holds at most one chunk
    per field beyond what `add` is given. Each shard's byte size, whole-file xxh3 and per-key
    xxh3 are computed while writing (data_pipeline/integrity.py).

    fields: the manifest's field specs (dtype, per-sample shape, ext); an int field's `vocab`
    is max + 1 of what was written (`top`: the largest id so far, -1 for none; sinks of two
    splits of one dataset set theirs to the larger) unless its name is in `fixed_vocab`.
    preprocessing: recorded in the manifest as is.
    """

    def __init__(
        self, out_dir: str | os.PathLike, fields: dict[str, FieldInfo], samples_per_shard: int = 100_000,
        chunk_size: int = 1024, layout: str = "chunk", prefix: str = "shard",
        preprocessing: dict | None = None,
    ):
        if layout not in ("chunk", "sample"):
            raise ValueError(f"layout must be 'chunk' or 'sample', got {layout!r}")
        if samples_per_shard < 1 or chunk_size < 1:
            raise ValueError("samples_per_shard and chunk_size must be positive")
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.fields = fields
        self.fixed_vocab: set[str] = {k for k, f in fields.items() if f.vocab}
        self.samples_per_shard = samples_per_shard
        self.chunk = chunk_size if layout == "chunk" else 1
        self.layout = layout
        self.prefix = prefix
        self.preprocessing = preprocessing or {}
        self.shards: list[ShardInfo] = []
        self._pending: list[dict[str, np.ndarray]] = []
        self._pending_rows = 0
        self._tar = None  # (file, HashingWriter, TarWriter, url, members, member digests, offsets)
        self._in_shard = 0
        self._written = 0
        self.top = {k: -1 for k, f in fields.items() if np.dtype(f.dtype).kind in "iub"}
        self._members = sorted((info.suffix(name), name, info) for name, info in fields.items())
        row_bytes = sum(sample_bytes(f) for f in fields.values())
        self._block_rows = max(BLOCK_BYTES // max(row_bytes, 1), 1)  # rows per `_write_keys` block

    def add(self, arrays: dict[str, np.ndarray]) -> None:
        """Append samples: field -> [n, *shape] for every field of the sink (same n)."""
        missing = set(self.fields) - set(arrays)
        if missing:
            raise ValueError(f"ShardSink.add: fields {sorted(missing)} missing")
        n = len(next(iter(arrays.values())))
        if n == 0:
            return
        batch = {}
        for name, info in self.fields.items():
            a = np.asarray(arrays[name]).astype(info.dtype, copy=False)
            if tuple(a.shape[1:]) != info.shape or len(a) != n:
                raise ValueError(f"field {name!r}: got shape {list(a.shape)}, expected "
                                 f"[{n}, {', '.join(map(str, info.shape))}]")
            if name in self.top and name not in self.fixed_vocab and a.size:
                self.top[name] = max(self.top[name], int(a.max()))
            batch[name] = a
        self._pending.append(batch)
        self._pending_rows += n
        self._drain(final=False)

    def _drain(self, final: bool) -> None:
        """Write every full key the pending rows make (and, when `final`, the rest). Keys are
        slices (views) of the batches `add` was given; only a key that straddles two batches
        is copied together."""
        pending = self._pending
        while pending:
            head = pending[0]
            rows = len(next(iter(head.values())))
            take = min(self.chunk, self.samples_per_shard - self._in_shard)
            if rows < take and len(pending) > 1:  # top the key up from the next batch
                nxt = pending[1]
                need = min(take - rows, len(next(iter(nxt.values()))))
                pending[0] = {k: np.concatenate([head[k], nxt[k][:need]]) for k in head}
                pending[1] = {k: v[need:] for k, v in nxt.items()}
                if not len(next(iter(pending[1].values()))):
                    del pending[1]
                continue
            if rows < take and not final:
                break
            take = min(take, rows)
            keys = min(rows, self.samples_per_shard - self._in_shard, self._block_rows) // self.chunk
            if self.chunk > 1 and keys >= 2:  # many full keys in hand: one block, one write
                take = keys * self.chunk
                self._write_keys({k: v[:take] for k, v in head.items()}, keys)
            else:
                self._write_key({k: v[:take] for k, v in head.items()}, take)
            if take == rows:
                pending.pop(0)
            else:
                pending[0] = {k: v[take:] for k, v in head.items()}
        self._pending_rows = sum(len(next(iter(p.values()))) for p in pending)

    def _write_key(self, part: dict[str, np.ndarray], rows: int) -> None:
        f, hashing, tw, url, members, digests, offsets = self._open_tar()
        key = f"{self._written:010d}"
        payloads = []
        for suffix, name, info in self._members:  # webdataset's order: sorted by suffix
            arr = part[name]
            if self.chunk > 1:
                payloads.append((suffix, npy_parts(arr)))
            elif info.ext == "cls":
                payloads.append((suffix, [str(int(arr[0])).encode()]))
            elif info.ext == "json":
                payloads.append((suffix, [json.dumps(arr[0].tolist()).encode()]))
            else:
                payloads.append((suffix, npy_parts(arr[0])))
        offsets.append(tw.offset)  # where this key's first header starts: readers seek to it
        tw.write_key(key, payloads)
        digests.append(digest(p for _, pieces in payloads for p in pieces))
        members.append(rows)
        self._written += rows
        self._in_shard += rows
        if self._in_shard >= self.samples_per_shard:
            self._close_shard()

    def _open_tar(self) -> list:
        if self._tar is None:
            url = f"{self.prefix}-{len(self.shards):06d}.tar"
            f = open(self.out / (url + ".tmp"), "wb")
            hashing = HashingWriter(f)
            self._tar = [f, hashing, FastTarWriter(hashing), url, [], [], []]
        return self._tar

    def _write_keys(self, part: dict[str, np.ndarray], keys: int) -> None:
        """`keys` full chunk-layout keys at once, laid out with numpy: the bytes `_write_key`
        writes key by key (headers included), built in one [keys, key bytes] array and written
        in one call. Python work is per key (its checksum), not per member."""
        f, hashing, tw, url, members, digests, offsets = self._open_tar()
        chunk = self.chunk
        names = self._written + chunk * np.arange(keys, dtype=np.int64)
        digits = (names[:, None] // 10 ** np.arange(9, -1, -1, dtype=np.int64)) % 10 + 48  # [keys, 10]
        digit_sum = digits.sum(1)
        layout = []  # (column, npy header, payload [keys, bytes], size)
        column = 0
        for suffix, name, _ in self._members:
            arr = np.ascontiguousarray(part[name])
            header = npy_header(arr[:chunk])
            payload = arr.reshape(keys, -1).view(np.uint8)
            size = len(header) + payload.shape[1]
            layout.append((column, suffix, header, payload, size))
            column += tarfile.BLOCKSIZE + size + (-size % tarfile.BLOCKSIZE)
        block = np.empty((keys, column), np.uint8)  # every byte is set below (no memset pass)
        for at, suffix, header, payload, size in layout:
            template = np.frombuffer(tw.header_for(b"0" * 10 + b"." + suffix.encode(), size), np.uint8)
            block[:, at : at + tarfile.BLOCKSIZE] = template
            block[:, at : at + 10] = digits
            checksum = int(bytes(template[148:154]), 8) - 48 * 10 + digit_sum  # the name's digits
            block[:, at + 148 : at + 154] = (checksum[:, None] // 8 ** np.arange(5, -1, -1)) % 8 + 48
            body = at + tarfile.BLOCKSIZE
            block[:, body : body + len(header)] = np.frombuffer(header, np.uint8)
            block[:, body + len(header) : body + size] = payload
            block[:, body + size : body + size + (-size % tarfile.BLOCKSIZE)] = 0  # the member's padding
        flat = memoryview(block).cast("B")  # (slicing a memoryview is ~5x cheaper than a numpy row)
        spans = [(at + tarfile.BLOCKSIZE, at + tarfile.BLOCKSIZE + size) for at, _, _, _, size in layout]
        for k in range(keys):
            offsets.append(tw.offset + k * column)
            base = k * column
            digests.append(digest(flat[base + lo : base + hi] for lo, hi in spans))
        tw.write_raw(flat)
        members.extend([chunk] * keys)
        self._written += keys * chunk
        self._in_shard += keys * chunk
        if self._in_shard >= self.samples_per_shard:
            self._close_shard()

    def _close_shard(self) -> None:
        f, hashing, tw, url, members, digests, offsets = self._tar
        tw.close()  # writes the tar end blocks through `hashing`
        f.close()
        os.replace(self.out / (url + ".tmp"), self.out / url)
        self.shards.append(ShardInfo(url, sum(members), members, hashing.size, hashing.hexdigest(),
                                     digests, offsets))
        self._tar, self._in_shard = None, 0

    def close(self) -> Manifest:
        """Flush, write manifest.json (atomically), remove stale shards; returns the Manifest."""
        self._drain(final=True)
        if self._tar is not None:
            self._close_shard()
        for name, top in self.top.items():
            if name not in self.fixed_vocab:
                self.fields[name].vocab = top + 1 if top >= 0 else 0
        _remove_stale(self.out, self.prefix, len(self.shards))
        manifest = Manifest(self.layout, self.chunk, self.fields, self.shards,
                            preprocessing=self.preprocessing)
        write_manifest(manifest, self.out)
        return manifest


_ZEROS = bytes(tarfile.BLOCKSIZE)


class FastTarWriter:
    """A WebDataset tar writer for regular-file members: the bytes `webdataset.TarWriter` writes
    (USTAR headers, mode 0444, owner bigdata, mtime TAR_MTIME, keys' members in sorted suffix
    order, the end padded to tarfile's 10 KiB record), with each header patched from a template
    instead of built by tarfile (tarfile spends ~0.3 ms per member, as much as the rest of a
    table conversion)."""

    def __init__(self, fileobj):
        self.fileobj = fileobj
        info = tarfile.TarInfo("")
        info.mode, info.mtime, info.uname, info.gname = 0o444, TAR_MTIME, "bigdata", "bigdata"
        template = bytearray(info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape"))
        template[124:136] = bytes(12)  # size: set per member
        template[148:156] = b" " * 8  # the checksum counts its own field as spaces
        self._template = bytes(template)
        self._sum = sum(template)  # + the name's and the size's bytes = each header's checksum
        self._headers: dict[tuple[str, int, int], tuple[bytes, int, bytes]] = {}
        self.offset = 0

    def _header(self, name: bytes, size: int) -> bytes:
        if len(name) > 100:
            raise ValueError(f"tar member name longer than 100 bytes: {name[:40]!r}...")
        size_field = b"%011o\x00" % size
        checksum = b"%06o\x00 " % (self._sum + sum(name) + sum(size_field))
        t = self._template
        return b"".join((name, t[len(name) : 124], size_field, t[136:148], checksum, t[156:]))

    def header_for(self, name: bytes, size: int) -> bytes:
        """The 512-byte header of a member `name` of `size` bytes."""
        return self._header(name, size)

    def write_raw(self, data) -> None:
        """Bytes already laid out as tar members (ShardSink._write_keys)."""
        self.fileobj.write(data)
        self.offset += len(data)

    def write(self, sample: dict) -> None:
        """One key's members, in sorted suffix order, as one write (header, payload, padding).
        A member's value is its bytes, or a list of buffers that make them (`npy_parts`)."""
        self.write_key(sample["__key__"], [
            (suffix, [v] if isinstance(v, (bytes, bytearray, memoryview)) else v)
            for suffix, v in sorted((k, v) for k, v in sample.items() if k != "__key__")
        ])

    def write_key(self, key: str, members: list[tuple[str, list]]) -> None:
        """`write` for members given as (suffix, [buffers]) already in sorted suffix order. A
        header is cached per (suffix, size, key length) without the key, whose bytes and their
        checksum share are added per key (~1 us a member instead of building each header)."""
        key_bytes = key.encode()
        key_sum = sum(key_bytes)
        parts = []
        for suffix, pieces in members:
            size = sum(len(p) for p in pieces)
            cached = self._headers.get((suffix, size, len(key_bytes)))
            if cached is None:
                header = self._header(key_bytes + b"." + suffix.encode(), size)
                cached = (header[len(key_bytes) : 148], int(header[148:154], 8) - key_sum, header[156:])
                if len(self._headers) < 4096:
                    self._headers[(suffix, size, len(key_bytes))] = cached
            before, base, after = cached
            parts += (key_bytes, before, b"%06o\x00 " % (base + key_sum), after)
            parts += pieces
            parts.append(_ZEROS[: -size % tarfile.BLOCKSIZE])
        data = b"".join(parts)
        self.fileobj.write(data)
        self.offset += len(data)

    def close(self) -> None:
        end = self.offset + 2 * tarfile.BLOCKSIZE
        self.fileobj.write(b"\x00" * (2 * tarfile.BLOCKSIZE + (-end % tarfile.RECORDSIZE)))


def _remove_stale(out: Path, prefix: str, count: int) -> None:
    pattern = re.compile(re.escape(prefix) + r"-(\d{6})\.tar$")
    for p in out.iterdir():
        m = pattern.match(p.name)
        if m and int(m.group(1)) >= count:
            p.unlink()
