"""Shard checksums: what the writer records in manifest.json and what readers check.

A shard entry may carry (see manifest.ShardInfo):
- `bytes`: the file's size — checked when a local shard is opened (a truncated or padded file
  is named before any sample is read);
- `member_xxh3`: per tar key, xxh3_64 over the payloads of that key's members concatenated in
  tar order — checked as each key is read, so a reader that reads only some keys (a sample-level
  slice, a resume in mid-shard) still verifies everything it uses;
- `xxh3`: xxh3_64 of the whole file — checked by `manytask shards verify` (`verify_shard`).

xxh3_64 hashes at ~30 GB/s on data in cache, but the stream hashes each payload once more
right after reading it: ~30 ns per 140-byte sample on a loaded machine, 3-14 % of the
chunk-layout stream's CPU per sample (bench/bench_integrity.py measures it).
"""

from __future__ import annotations

import os
import tarfile
from collections.abc import Iterable, Iterator

import numpy as np
import xxhash

from manytask.data_pipeline.manifest import Manifest, ShardInfo

READ_BLOCK = 1 << 20


def digest(payloads: Iterable[bytes | memoryview]) -> str:
    """xxh3_64 hex digest of `payloads` concatenated (one tar key's members, in tar order)."""
    h = xxhash.xxh3_64()
    for p in payloads:
        h.update(p)
    return h.hexdigest()


class HashingWriter:
    """A write-only file wrapper that counts and hashes every byte written (the writer's side of
    `bytes` and `xxh3`; tarfile's stream mode only ever calls `write`)."""

    def __init__(self, fileobj):
        self.fileobj = fileobj
        self.size = 0
        self._hash = xxhash.xxh3_64()

    def write(self, data) -> int:
        self._hash.update(data)
        self.size += len(data)
        return self.fileobj.write(data)

    def flush(self) -> None:
        self.fileobj.flush()

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


def file_digest(path: str | os.PathLike) -> tuple[int, str]:
    """(size in bytes, xxh3_64 hex) of a local file, read in 1 MiB blocks."""
    h = xxhash.xxh3_64()
    size = 0
    with open(path, "rb") as f:
        while block := f.read(READ_BLOCK):
            h.update(block)
            size += len(block)
    return size, h.hexdigest()


def member_digests(path: str | os.PathLike) -> Iterator[tuple[str, str]]:
    """(key, digest) for every tar key of a local shard, in tar order (for `shards index`)."""
    from manytask.data_pipeline.shard_reader import split_member_name

    key, h = None, None
    with open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
        for info in tar:
            parts = split_member_name(info.name) if info.isfile() else None
            if parts is None:
                continue
            if parts[0] != key:
                if key is not None:
                    yield key, h.hexdigest()
                key, h = parts[0], xxhash.xxh3_64()
            f.seek(info.offset_data)
            h.update(f.read(info.size))
    if key is not None:
        yield key, h.hexdigest()


def local_path(url: str) -> str | None:
    """The file path behind a shard url, or None for pipes and remote urls."""
    if url.startswith("file:"):
        url = url[5:]
    elif ":" in url.split("/", 1)[0] and not os.path.exists(url):
        return None
    return url if os.path.exists(url) else None


def size_problem(url: str, shard: ShardInfo) -> str | None:
    """Why a local shard's size disagrees with the manifest (missing, truncated, grown), or None.
    Remote shards and manifests without `bytes` are not checked here."""
    if not shard.bytes:
        return None
    path = local_path(url)
    if path is None:
        return f"cannot open shard: no such file ({url})" if _looks_local(url) else None
    size = os.path.getsize(path)
    if size != shard.bytes:
        what = "truncated" if size < shard.bytes else "larger than written"
        return f"file is {size} bytes, the manifest records {shard.bytes} ({what})"
    return None


def _looks_local(url: str) -> bool:
    return not (url.startswith(("pipe:", "http:", "https:", "s3:", "gs:")) or "://" in url)


class MemberVerifier:
    """Checks one shard's keys against `member_xxh3` as a reader streams them.

    `start()` before a key's members, `update(payload)` for each member in tar order,
    `problem(index, key)` after its last member: None when the digest matches (or nothing is
    recorded), else a message naming the key and both digests.
    """

    def __init__(self, shard: ShardInfo):
        self.expected = shard.member_xxh3
        self.enabled = bool(self.expected)
        self._hash = xxhash.xxh3_64()
        # The hasher's own methods, bound once: no Python wrapper call per member.
        self.start = self._hash.reset if self.enabled else _nothing
        self.update = self._hash.update if self.enabled else _nothing

    def problem(self, index: int, key: str | None) -> str | None:
        if not self.enabled or index >= len(self.expected):
            return None
        got = self._hash.intdigest()
        want = self.expected[index]
        if got == int(want, 16):
            return None
        return (f"sample '{key}': checksum mismatch (xxh3 {got:016x}, manifest records "
                f"{want}): the shard is corrupt")


def _nothing(*_: object) -> None:
    """What a MemberVerifier does with a shard whose manifest records no checksums."""


def verify_shard(manifest: Manifest, i: int) -> list[str]:
    """Every problem of shard i against its manifest entry (size, whole-file xxh3, per-key
    xxh3, key count); [] when it verifies. Remote shards are read through webdataset's gopen."""
    shard = manifest.shards[i]
    url = manifest.shard_url(i)
    problems = []
    size_issue = size_problem(url, shard)
    if size_issue:
        return [size_issue]
    path = local_path(url)
    if path is None:
        return [] if not _looks_local(url) else [f"shard file is missing ({url})"]
    if shard.xxh3:
        _, got = file_digest(path)
        if got != shard.xxh3:
            problems.append(f"whole-file xxh3 {got}, the manifest records {shard.xxh3}")
    if shard.member_xxh3:
        try:
            keys = list(member_digests(path))
        except (tarfile.TarError, OSError, EOFError) as err:
            return problems + [f"unreadable tar ({type(err).__name__}: {err})"]
        if len(keys) != len(shard.member_xxh3):
            problems.append(f"{len(keys)} tar keys, the manifest lists {len(shard.member_xxh3)}")
        for (key, got), want in zip(keys, shard.member_xxh3):
            if got != want:
                problems.append(f"sample '{key}': xxh3 {got}, the manifest records {want}")
                break
    return problems


def nonfinite_rows(data: dict, fields: list[str], chunk: bool) -> tuple[str, np.ndarray] | None:
    """The first of `fields` (float input fields) holding NaN/inf in one decoded key, with a
    bool mask of its bad rows ([n] in the chunk layout, [1] for a sample); None if all finite."""
    bad_any = None
    first = None
    for name in fields:
        value = np.asarray(data[name])
        finite = np.isfinite(value)
        if finite.all():
            continue
        bad = ~finite.reshape(len(value), -1).all(1) if chunk else np.ones(1, bool)
        first = first or name
        bad_any = bad if bad_any is None else bad_any | bad
    return None if first is None else (first, bad_any)


def nonfinite_message(source: str, url: str, key: str | None, field: str, row: int, chunk: bool) -> str:
    where = f"sample key '{key}'" + (f" row {row} (of that chunk)" if chunk else "")
    return (f"source '{source}': non-finite value (NaN or inf) in input field '{field}' at {where} "
            f"of shard {url}; fix the data, or set data.on_nonfinite_input: skip to drop such samples")


def log_data_warnings_to(path: str | os.PathLike) -> None:
    """Send the data pipeline's warnings (a shard skipped as corrupt, samples skipped for
    non-finite inputs) to `path` as well (the run's train.log); replaces an earlier target, so
    several runs in one process do not write each other's logs. DataLoader workers forked
    after this call inherit it."""
    import logging

    logger = logging.getLogger("manytask.data_pipeline")
    for handler in [h for h in logger.handlers if getattr(h, "_manytask_run_log", False)]:
        logger.removeHandler(handler)
        handler.close()
    handler = logging.FileHandler(path, delay=True)
    handler._manytask_run_log = True  # type: ignore[attr-defined]
    handler.setLevel(logging.WARNING)
    handler.setFormatter(logging.Formatter("warning: %(message)s"))
    logger.addHandler(handler)
