"""Fast reading of one shard's tar members, grouped by key and decoded to numpy, with checks.

Tar members follow the WebDataset convention `<key>.<field>.<ext>` (the key is the path up to
the first dot of the base name). The shard is read sequentially (tarfile stream mode)
over `remote.open_shard(url)`, so local paths, `pipe:` commands and http(s) urls all work; a
reader that needs only some tar keys seeks to the first one's byte offset (the manifest's
`offsets`, when recorded) and stops after the last one; `.npy`
headers are parsed once per distinct header (numpy.lib.format) and payloads wrapped with
`np.frombuffer`, which keeps the chunk layout at memcpy speed.

Anything wrong (missing shard, truncated or corrupt tar, unreadable payload, field missing or
not matching the manifest) raises `ShardError` naming the shard url and the sample key, or,
with `skip_corrupt=True`, yields the member with `data=None` so the caller can count it.
"""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile
import zlib
from collections.abc import Container, Iterator
from typing import Any

import numpy as np
import numpy.lib.format as npformat

from manytask.data_pipeline.integrity import MemberVerifier, size_problem
from manytask.data_pipeline.manifest import FieldInfo, ShardInfo
from manytask.data_pipeline.remote import OpenFiles, local_file, open_shard

log = logging.getLogger(__name__)

NPY_MAGIC = b"\x93NUMPY"
# Errors that mean "this tar cannot be read further" (truncation, bad header, bad gzip, I/O).
_TAR_ERRORS = (tarfile.TarError, EOFError, OSError, zlib.error, ValueError)


class ShardError(ValueError):
    """A shard or sample that cannot be used; the message names the shard url and sample key."""


def split_member_name(name: str) -> tuple[str, str] | None:
    """`dir/key.x.npy` -> (`dir/key`, `x.npy`); None for names without an extension."""
    slash = name.rfind("/")
    dot = name.find(".", slash + 1)
    if dot <= slash + 1:
        return None
    return name[:dot], name[dot + 1 :]


def suffix_field(suffix: str) -> tuple[str, str]:
    """`x.npy` -> (`x`, `npy`); a bare extension `cls` is field `cls` with extension `cls`."""
    name, _, ext = suffix.rpartition(".")
    return (name or ext), ext


class NpyDecoder:
    """Decode `.npy` bytes with `np.frombuffer`; parsed headers are cached (shards repeat them),
    in one cache per process: a reader opens a shard once per shuffle window."""

    _shared: dict[bytes, tuple] = {}

    def __init__(self) -> None:
        self._cache = NpyDecoder._shared

    def __call__(self, buf: bytes) -> np.ndarray:
        if buf[:6] != NPY_MAGIC:
            raise ValueError("not an .npy payload (bad magic bytes)")
        if buf[6] == 1:
            start = 10 + int.from_bytes(buf[8:10], "little")
        else:
            start = 12 + int.from_bytes(buf[8:12], "little")
        header = bytes(buf[:start])  # buf may be a view of a whole key: keep only the header
        spec = self._cache.get(header)
        if spec is None:
            spec = _parse_npy_header(header)
            if len(self._cache) < 256:
                self._cache[header] = spec
        shape, fortran, dtype, count, nbytes = spec
        if len(buf) - start != nbytes:
            raise ValueError(f"payload has {len(buf) - start} bytes, its header says {nbytes}")
        arr = np.frombuffer(buf, dtype=dtype, count=count, offset=start)
        return arr.reshape(shape[::-1]).T if fortran else arr.reshape(shape)


def _parse_npy_header(header: bytes) -> tuple:
    f = io.BytesIO(header)
    version = npformat.read_magic(f)
    if version == (1, 0):
        shape, fortran, dtype = npformat.read_array_header_1_0(f)
    elif version == (2, 0):
        shape, fortran, dtype = npformat.read_array_header_2_0(f)
    else:
        raise ValueError(f"unsupported .npy format version {version}")
    if dtype.hasobject:
        raise ValueError("object arrays are not supported (pickled .npy)")
    count = int(np.prod(shape, dtype=np.int64))
    return tuple(shape), fortran, dtype, count, count * dtype.itemsize


def decode_field(buf: bytes, ext: str, npy: NpyDecoder) -> Any:
    """Decode one member payload: npy -> ndarray, cls -> int, json -> ndarray."""
    if ext == "npy":
        return npy(buf)
    buf = bytes(buf)  # a view of a key's bytes (see _read_keys)
    if ext == "cls":
        return int(buf)
    if ext == "json":
        return np.asarray(json.loads(buf))
    raise ValueError(f"unsupported extension .{ext}")


def _fmt(dtype: Any, shape: tuple) -> str:
    return f"{np.dtype(dtype).name} {list(shape)}"


class _MemberChecker:
    """Turns a key's raw payloads into checked arrays; raises ValueError describing the problem."""

    def __init__(self, fields: dict[str, FieldInfo], layout: str):
        self.fields = fields
        self.chunk = layout == "chunk"
        self.dtypes = {k: np.dtype(v.dtype) for k, v in fields.items()}
        self.npy = NpyDecoder()

    def __call__(self, raw: dict[str, bytes], size: int) -> dict[str, Any]:
        out = {}
        for name, info in self.fields.items():
            buf = raw.get(name)
            if buf is None:
                have = ", ".join(sorted(raw)) or "none"
                raise ValueError(f"missing field '{name}' (.{info.ext}; fields present: {have})")
            try:
                value = decode_field(buf, info.ext, self.npy)
            except ValueError as err:
                raise ValueError(f"field '{name}': unreadable .{info.ext}: {err}") from err
            if info.ext == "cls":
                out[name] = value  # int; stacked as int64 by the caller
                continue
            if info.ext == "json":
                value = value.astype(self.dtypes[name])
            want = (size, *info.shape) if self.chunk else info.shape
            if value.dtype != self.dtypes[name] or value.shape != want:
                raise ValueError(
                    f"field '{name}': got {_fmt(value.dtype, value.shape)}, manifest says "
                    f"{_fmt(info.dtype, want)}"
                )
            out[name] = value
        return out


def read_shard(
    url: str,
    fields: dict[str, FieldInfo],
    layout: str,
    members: list[int],
    *,
    start: int = 0,
    stop: int | None = None,
    offsets: list[int] | None = None,
    select: Container[int] | None = None,
    skip_corrupt: bool = False,
    manifest: str = "",
    shard: ShardInfo | None = None,
    check_size: bool = True,
    files: OpenFiles | None = None,
) -> Iterator[tuple[int, str | None, dict[str, Any] | None]]:
    """Yield `(member index, key, data)` for the shard's tar keys `start` to `stop` - 1 (default:
    to the end), in tar order; the rest of the tar is not read.

    fields:  the fields to decode (others are passed over); `members`: samples per key from the
             manifest. data: field -> array `[n, *shape]` (chunk layout) or `shape` (sample
             layout; `.cls` fields are Python ints).
    offsets: byte offset of each key's first tar header (manifest `offsets`; empty = unknown):
             with it a plain `.tar` is opened at key `start` instead of read from byte 0.
    select:  only these member indices are decoded and yielded (validation splits).
    skip_corrupt: a bad key yields `data=None`; an unreadable tail yields `(i, None, None)` for
             every remaining manifest member. Otherwise ShardError (url, key, manifest, problem).
    shard:   the manifest entry; its recorded size is checked at open and each key read against
             its `member_xxh3` (data_pipeline/integrity.py). A mismatch is a ShardError naming
             the shard and key; with skip_corrupt the rest of the shard is skipped with a warning.
    check_size: False skips the size check at open (a caller reading the same shard again,
             window after window, checks it on the first read only).
    files:   where a local indexed `.tar` is kept open between calls (instead of opened and
             closed by each).
    """
    where = f"shard {url}" + (f" (manifest {manifest})" if manifest else "")
    expected = len(members)
    end = expected if stop is None else min(stop, expected)
    verify = MemberVerifier(shard) if shard is not None else None
    if shard is not None and check_size:
        problem = size_problem(url, shard)
        if problem:
            if skip_corrupt:
                log.warning("%s: %s; skipping the shard", where, problem)
            yield from _all_missing(where, problem, start, end, select, skip_corrupt)
            return
    wanted = {info.suffix(name): name for name, info in fields.items()}
    check = _MemberChecker(fields, layout)

    def wanted_member(i: int) -> bool:
        return start <= i < end and (select is None or i in select)

    def missing_from(i: int, why: str) -> Iterator[tuple[int, None, None]]:
        if not skip_corrupt:
            raise ShardError(f"{where}: {why}")
        for j in range(max(i, start), end):
            if select is None or j in select:
                yield j, None, None

    def next_wanted(i: int) -> int | None:
        return next((j for j in range(max(i, start), end) if select is None or j in select), None)

    first = next_wanted(start)
    if first is None:
        return
    indexed = bool(offsets) and len(offsets or ()) == expected and url.endswith(".tar")
    seek = first > 0 and indexed
    path = local_file(url) if files is not None and indexed else None
    try:
        if path is not None:  # read by key offsets below (_read_keys seeks before each read)
            stream, at_offset = files.get(path), True  # type: ignore[union-attr]
        else:
            stream, at_offset = open_shard(url, offsets[first] if seek else 0)  # type: ignore[index]
    except Exception as err:  # noqa: BLE001 - any opener failure means "cannot open"
        yield from missing_from(0, f"cannot open shard ({type(err).__name__}: {err}); no sample key read")
        return
    # Keys are counted from the one the stream starts at.
    index, key, raw = (first - 1 if seek and at_offset else -1), None, {}
    done = False  # every key asked for was read
    try:
        # A plain local .tar is read sequentially too, but payloads come straight from the file
        # (one copy); tarfile's stream buffer would copy each payload twice more. Pipes, urls
        # and compressed shards use tarfile's stream mode.
        direct = url.endswith(".tar") and _seekable(stream)
        if direct and indexed:
            # Each wanted key straight from its manifest offset, headers parsed here.
            yield from _read_keys(stream, offsets, range(first, end), select, wanted, members, check, where,  # type: ignore[arg-type]
                                  skip_corrupt, verify, reopen=None if path is None else lambda: files.get(path))
            return
        jump = direct and indexed  # skip unwanted keys by seeking to the next wanted one
        tar = tarfile.open(fileobj=stream, mode="r:" if direct else "r|*")
        source = stream if direct else tar.fileobj
        while True:
            info = tar.next()
            tar.members = []  # stream mode keeps every TarInfo otherwise
            if info is None:
                break
            parts = split_member_name(info.name) if info.isfile() else None
            if parts is None:
                continue
            if parts[0] != key:
                if wanted_member(index):
                    bad = verify.problem(index, key) if verify else None
                    if bad:
                        raise _Corrupt(bad)
                    yield _finish(index, key, raw, members, check, where, skip_corrupt)
                index, key, raw = index + 1, parts[0], {}
                if index >= end and end < expected:
                    break  # past the last key asked for: the rest of the tar is not read
                if verify:
                    verify.start()
                if index >= expected:
                    raise ShardError(
                        f"{where}: sample '{key}': the tar holds more keys than the {expected} "
                        f"listed in the manifest (stale manifest? re-run `manytask shards index`)"
                    )
                if jump and not wanted_member(index):
                    j = next_wanted(index)
                    if j is None:
                        done = True
                        break
                    tar.offset = offsets[j]  # type: ignore[index]  # next() reads the header there
                    index, key = j - 1, None
                    continue
            name = wanted.get(parts[1])
            hashing = verify is not None and verify.enabled
            if not wanted_member(index) or (name is None and not hashing):
                continue
            if direct:
                stream.seek(info.offset_data)
            data = source.read(info.size)  # skips extractfile's per-member file objects
            if len(data) != info.size:
                raise tarfile.ReadError(f"unexpected end of data in {info.name}")
            if hashing:
                verify.update(data)
            if name is not None:
                raw[name] = data
    except ShardError:
        raise
    except _Corrupt as err:
        if skip_corrupt:
            log.warning("%s: %s; skipping the rest of the shard", where, err)
        yield from _all_missing(where, str(err), index, end, select, skip_corrupt)
        return
    except _TAR_ERRORS as err:
        at = f"at sample '{key}'" if key is not None else "before the first sample key"
        why = f"corrupt or truncated tar {at} ({type(err).__name__}: {err})"
        if skip_corrupt:
            log.warning("%s: %s; skipping the rest of the shard", where, why)
        if key is not None and wanted_member(index) and skip_corrupt:
            yield index, key, None
        yield from missing_from(index + 1 if key is not None else 0, why)
        return
    finally:
        # A `pipe:` stream raises on close when its command failed; the short read above has
        # already been reported with a clearer message, so the close error adds nothing.
        try:
            if path is None:  # a kept file stays open for the next call
                stream.close()
        except Exception:  # noqa: BLE001
            pass
    if wanted_member(index):
        bad = verify.problem(index, key) if verify else None
        if bad:
            if skip_corrupt:
                log.warning("%s: %s; skipping the rest of the shard", where, bad)
            yield from _all_missing(where, bad, index, end, select, skip_corrupt)
            return
        yield _finish(index, key, raw, members, check, where, skip_corrupt)
    if index + 1 < end and not done:
        if key is not None:
            last = f"last complete sample '{key}'"
        elif seek and at_offset:
            last = f"no key at byte {offsets[first]}, where the manifest puts key {first}"  # type: ignore[index]
        else:
            last = "no sample key read"
        yield from missing_from(
            index + 1,
            f"tar ends after {index + 1} of the {expected} keys the manifest lists "
            f"(truncated or corrupt tar; {last})",
        )


class _Corrupt(Exception):
    """A key whose payloads do not match the manifest's checksum (internal to read_shard)."""


def _all_missing(where, why, first, end, select, skip_corrupt):
    """ShardError, or with skip_corrupt `(i, None, None)` for members first..end-1 of the shard."""
    if not skip_corrupt:
        raise ShardError(f"{where}: {why}")
    for j in range(max(first, 0), end):
        if select is None or j in select:
            yield j, None, None


def _seekable(stream: Any) -> bool:
    try:
        return bool(stream.seekable()) and hasattr(stream, "fileno")
    except (AttributeError, OSError, ValueError):
        return False


def _finish(index, key, raw, members, check, where, skip_corrupt):
    try:
        return index, key, check(raw, members[index])
    except ValueError as err:
        if skip_corrupt:
            return index, key, None
        raise ShardError(f"{where}: sample '{key}': {err}") from None


def _read_keys(f: Any, offsets: list[int], keys: range, select: Container[int] | None, wanted: dict[str, str],
               members: list[int], check: _MemberChecker, where: str, skip_corrupt: bool,
               verify: MemberVerifier | None = None, reopen: Any = None,
               ) -> Iterator[tuple[int, str | None, dict[str, Any] | None]]:
    """The keys of a seekable plain tar read by their byte offsets; a bad key does not stop
    the others (with skip_corrupt it yields data None, else ShardError naming key and byte).
    A key whose payloads do not match the manifest's checksum is a ShardError; with
    skip_corrupt the rest of the keys asked for are skipped with a warning (as in stream mode).
    reopen: returns the file again before each key (a kept file, see OpenFiles: while this
    generator is suspended, reads of other shards may have closed it to make room)."""
    expected = len(offsets)
    hashing = verify is not None and verify.enabled
    for j in keys:
        if select is not None and j not in select:
            continue
        key, raw = None, {}
        if hashing:
            verify.start()
        try:
            # The key's bytes in one positioned read (its headers and payloads; to the end of
            # the file for the shard's last key), parsed in memory: payloads are views of them.
            start = offsets[j]
            if reopen is not None:
                f = reopen()
            fd = f.fileno()
            stop = offsets[j + 1] if j + 1 < expected else os.fstat(fd).st_size
            blob = memoryview(os.pread(fd, max(stop - start, 0), start))
            for name, size, at in _tar_members(blob, start):
                parts = split_member_name(name)
                if parts is None:
                    continue
                if key is None:
                    key = parts[0]
                elif parts[0] != key:
                    raise ShardError(
                        f"{where}: key {j} ('{key}') runs into key '{parts[0]}' before the next key's "
                        f"manifest offset (stale manifest? re-run `manytask shards index`)"
                    )
                field = wanted.get(parts[1])
                if field is not None or hashing:
                    data = blob[at : at + size]
                    if len(data) != size:
                        raise tarfile.ReadError(f"unexpected end of data in {name}")
                    if hashing:
                        verify.update(data)
                    if field is not None:
                        raw[field] = data
            if key is None:
                raise EOFError(f"no key at byte {offsets[j]}, where the manifest puts key {j}")
        except ShardError:
            raise
        except _TAR_ERRORS as err:
            if skip_corrupt:
                log.warning("%s: corrupt or truncated tar at key %d (byte %d; %s: %s); skipping that key",
                            where, j, offsets[j], type(err).__name__, err)
                yield j, key, None
                continue
            at_key = f"at sample '{key}'" if key is not None else f"at key {j}"
            if isinstance(err, EOFError):
                raise ShardError(f"{where}: tar ends after {j} of the {expected} keys the manifest lists "
                                 f"(truncated or corrupt tar; {err})") from None
            raise ShardError(f"{where}: corrupt or truncated tar {at_key} (byte {offsets[j]}; "
                             f"{type(err).__name__}: {err})") from None
        bad = verify.problem(j, key) if hashing else None
        if bad:
            if skip_corrupt:
                log.warning("%s: %s; skipping the rest of the shard", where, bad)
            yield from _all_missing(where, bad, j, keys.stop, select, skip_corrupt)
            return
        yield _finish(j, key, raw, members, check, where, skip_corrupt)


_ZERO_BLOCK = bytes(512)


def _tar_members(buf: memoryview, base: int) -> Iterator[tuple[str, int, int]]:
    """(name, size, payload offset in `buf`) of the regular-file members whose headers lie in
    `buf`, the bytes of a tar from byte `base` on (to the archive's end or the next key). ustar,
    GNU long names and pax path records are understood; a bad header raises tarfile.ReadError
    naming its byte in the tar."""
    pos, long_name, end = 0, None, len(buf)
    while pos < end:
        hdr = bytes(buf[pos : pos + 512])
        if hdr == _ZERO_BLOCK:
            return
        if len(hdr) < 512:
            raise tarfile.ReadError("unexpected end of data in a header")
        try:
            stored = int(hdr[148:156].split(b"\0", 1)[0].strip(), 8)
        except ValueError:
            stored = -1
        if stored != 256 + sum(hdr[:148]) + sum(hdr[156:]):
            raise tarfile.ReadError(f"not a tar header (bad checksum) at byte {base + pos}")
        raw_size = hdr[124:136]
        size = tarfile.nti(raw_size) if raw_size[0] & 0x80 else int(raw_size.split(b"\0", 1)[0].strip() or b"0", 8)
        kind = hdr[156:157]
        at = pos + 512
        pos = at + -(-size // 512) * 512
        if kind in (b"x", b"L"):  # the next member's long name (pax record or GNU)
            data = bytes(buf[at : at + size])
            long_name = _pax_path(data) if kind == b"x" else data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            continue
        if long_name is not None:
            name, long_name = long_name, None
        else:
            name = hdr[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            if hdr[257:262] == b"ustar" and hdr[345] != 0:
                name = hdr[345:500].split(b"\0", 1)[0].decode("utf-8", "surrogateescape") + "/" + name
        if kind in (b"0", b"\0", b"7"):
            yield name, size, at


def _pax_path(data: bytes) -> str | None:
    """The `path` record of a pax extended header, if any."""
    for line in data.split(b"\n"):
        _, _, record = line.partition(b" ")
        k, _, v = record.partition(b"=")
        if k == b"path":
            return v.decode("utf-8", "surrogateescape")
    return None
