"""Fast reading of one shard's tar members, grouped by key and decoded to numpy, with checks.

Tar members follow the WebDataset convention `<key>.<field>.<ext>` (the key is the path up to
the first dot of the base name). The shard is read sequentially (tarfile stream mode)
over `webdataset.gopen(url)`, so local paths, `pipe:` commands and http urls all work; `.npy`
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
import tarfile
import zlib
from collections.abc import Container, Iterator
from typing import Any

import numpy as np
import numpy.lib.format as npformat
from webdataset import gopen

from manytask.data_pipeline.integrity import MemberVerifier, size_problem
from manytask.data_pipeline.manifest import FieldInfo, ShardInfo

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
    """Decode `.npy` bytes with `np.frombuffer`; parsed headers are cached (a shard repeats them)."""

    def __init__(self) -> None:
        self._cache: dict[bytes, tuple] = {}

    def __call__(self, buf: bytes) -> np.ndarray:
        if buf[:6] != NPY_MAGIC:
            raise ValueError("not an .npy payload (bad magic bytes)")
        if buf[6] == 1:
            start = 10 + int.from_bytes(buf[8:10], "little")
        else:
            start = 12 + int.from_bytes(buf[8:12], "little")
        header = buf[:start]
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
    select: Container[int] | None = None,
    skip_corrupt: bool = False,
    manifest: str = "",
    shard: ShardInfo | None = None,
) -> Iterator[tuple[int, str | None, dict[str, Any] | None]]:
    """Yield `(member index, key, data)` for the shard's tar keys from `start` on, in tar order.

    fields:  the fields to decode (others are passed over); `members`: samples per key from the
             manifest. data: field -> array `[n, *shape]` (chunk layout) or `shape` (sample
             layout; `.cls` fields are Python ints).
    select:  only these member indices are decoded and yielded (validation splits).
    skip_corrupt: a bad key yields `data=None`; an unreadable tail yields `(i, None, None)` for
             every remaining manifest member. Otherwise ShardError (url, key, manifest, problem).
    shard:   the manifest entry; its recorded size is checked at open and each key read against
             its `member_xxh3` (data_pipeline/integrity.py). A mismatch is a ShardError naming
             the shard and key; with skip_corrupt the rest of the shard is skipped with a warning.
    """
    where = f"shard {url}" + (f" (manifest {manifest})" if manifest else "")
    verify = MemberVerifier(shard) if shard is not None else None
    if shard is not None:
        problem = size_problem(url, shard)
        if problem:
            if skip_corrupt:
                log.warning("%s: %s; skipping the shard", where, problem)
            yield from _all_missing(where, problem, start, len(members), select, skip_corrupt)
            return
    expected = len(members)
    wanted = {info.suffix(name): name for name, info in fields.items()}
    check = _MemberChecker(fields, layout)

    def wanted_member(i: int) -> bool:
        return start <= i < expected and (select is None or i in select)

    def missing_from(i: int, why: str) -> Iterator[tuple[int, None, None]]:
        if not skip_corrupt:
            raise ShardError(f"{where}: {why}")
        for j in range(max(i, start), expected):
            if select is None or j in select:
                yield j, None, None

    try:
        stream = gopen(url, "rb")
    except Exception as err:  # noqa: BLE001 - any opener failure means "cannot open"
        yield from missing_from(0, f"cannot open shard ({type(err).__name__}: {err}); no sample key read")
        return
    index, key, raw = -1, None, {}
    try:
        # A plain local .tar is read sequentially too, but payloads come straight from the file
        # (one copy); tarfile's stream buffer would copy each payload twice more. Pipes, urls
        # and compressed shards use tarfile's stream mode.
        direct = url.endswith(".tar") and _seekable(stream)
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
                if verify:
                    verify.start()
                if index >= expected:
                    raise ShardError(
                        f"{where}: sample '{key}': the tar holds more keys than the {expected} "
                        f"listed in the manifest (stale manifest? re-run `manytask shards index`)"
                    )
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
        yield from _all_missing(where, str(err), index, expected, select, skip_corrupt)
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
            stream.close()
        except Exception:  # noqa: BLE001
            pass
    if wanted_member(index):
        bad = verify.problem(index, key) if verify else None
        if bad:
            if skip_corrupt:
                log.warning("%s: %s; skipping the rest of the shard", where, bad)
            yield from _all_missing(where, bad, index, expected, select, skip_corrupt)
            return
        yield _finish(index, key, raw, members, check, where, skip_corrupt)
    if index + 1 < expected:
        last = f"last complete sample '{key}'" if key is not None else "no sample key read"
        yield from missing_from(
            index + 1,
            f"tar ends after {index + 1} of the {expected} keys the manifest lists "
            f"(truncated or corrupt tar; {last})",
        )


class _Corrupt(Exception):
    """A key whose payloads do not match the manifest's checksum (internal to read_shard)."""


def _all_missing(where, why, first, expected, select, skip_corrupt):
    """ShardError, or with skip_corrupt `(i, None, None)` for members first.. of the shard."""
    if not skip_corrupt:
        raise ShardError(f"{where}: {why}")
    for j in range(max(first, 0), expected):
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
