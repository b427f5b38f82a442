"""Shard tools behind `manytask shards index | inspect | verify | write`.

- `index_shards(dir_or_pattern)`: read shards written by any WebDataset writer and write their
  manifest.json (schema, samples per key, sizes and checksums of local shards). Foreign shards
  are taken as the sample layout unless `layout="chunk"` is given (then every field of a key
  is one array whose leading dim is that key's sample count).
- `inspect(dir)`: a human summary: layout, schema, counts and the first sample; every listed
  shard must exist with its recorded size.
- `verify(dir)`: every shard against its recorded size and checksums.
- `convert_table(input, out_dir, features, targets, ...)`: CSV / Parquet / NPZ -> train/ and
  val/ shard folders (data_pipeline/table_to_shards.py; importable from here as before).
"""

from __future__ import annotations

import glob
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from braceexpand import braceexpand
from webdataset import gopen

from manytask.data_pipeline.integrity import (
    file_digest,
    local_path,
    member_digests,
    size_problem,
    verify_shard,
)
from manytask.data_pipeline.manifest import (
    EXTS,
    MANIFEST_NAME,
    FieldInfo,
    Manifest,
    ShardInfo,
    load_manifest,
    manifest_path,
    write_manifest,
)
from manytask.data_pipeline.preprocess import (
    describe,
)
from manytask.data_pipeline.shard_reader import (
    NpyDecoder,
    ShardError,
    decode_field,
    read_shard,
    split_member_name,
    suffix_field,
)

# ---------------------------------------------------------------- index


def _shard_urls(dir_or_pattern: str | os.PathLike) -> tuple[list[str], Path]:
    """(shard urls, folder for manifest.json) of a directory, brace pattern or glob."""
    text = str(dir_or_pattern)
    if os.path.isdir(text):
        urls = sorted(
            str(p) for p in Path(text).iterdir()
            if p.name.endswith((".tar", ".tar.gz", ".tgz")) and not p.name.startswith(".")
        )
        folder = Path(text)
    else:
        urls = [u for pat in braceexpand(text) for u in (sorted(glob.glob(pat)) if any(c in pat for c in "*?[") else [pat])]
        folder = Path(os.path.dirname(urls[0]) if urls else ".")
    if not urls:
        raise ShardError(f"{text}: no .tar shards found")
    return urls, folder


def _scan_keys(url: str) -> Iterator[tuple[str, dict[str, bytes], int]]:
    """(key, {suffix: payload}, byte offset of the key's first header) for every key of a
    shard, in tar order (any WebDataset tar)."""
    try:
        stream = gopen(url, "rb")
    except Exception as err:  # noqa: BLE001
        raise ShardError(f"shard {url}: cannot open ({type(err).__name__}: {err})") from err
    key, raw, at = None, {}, 0
    try:
        with tarfile.open(fileobj=stream, mode="r|*") as tar:
            for info in tar:
                tar.members = []
                parts = split_member_name(info.name) if info.isfile() else None
                if parts is None or suffix_field(parts[1])[1] not in EXTS:
                    continue
                if parts[0] != key:
                    if key is not None:
                        yield key, raw, at
                    key, raw, at = parts[0], {}, info.offset
                raw[parts[1]] = tar.extractfile(info).read()
    except (tarfile.TarError, OSError, EOFError) as err:
        raise ShardError(f"shard {url}: corrupt or truncated tar after sample '{key}' ({err})") from err
    finally:
        stream.close()
    if key is not None:
        yield key, raw, at


def index_shards(
    dir_or_pattern: str | os.PathLike, layout: str | None = None, write: bool = True
) -> Manifest:
    """Read every shard and write `manifest.json` beside them (unless write=False).

    dir_or_pattern: a folder of `.tar` shards, a brace pattern (`d/train-{000..009}.tar`) or a
    glob. layout: "sample" (default; one sample per key) or "chunk". Fields are the
    `.npy` / `.cls` / `.json` members of the first key; every key must have the same fields,
    dtypes and per-sample shapes (else ShardError naming shard and key). Integer fields get
    `vocab` = max + 1.
    """
    layout = layout or "sample"
    if layout not in ("sample", "chunk"):
        raise ValueError(f"layout must be 'sample' or 'chunk', got {layout!r}")
    urls, folder = _shard_urls(dir_or_pattern)
    npy = NpyDecoder()
    fields: dict[str, FieldInfo] = {}
    suffixes: dict[str, str] = {}  # field -> member suffix
    vocab: dict[str, int] = {}
    shards = []
    for url in urls:
        members, offsets = [], []
        for key, raw, at in _scan_keys(url):
            offsets.append(at)
            where = f"shard {url}: sample '{key}'"
            if not fields:
                fields, suffixes = _schema(raw, layout, npy, where)
                vocab = {f: -1 for f, i in fields.items() if np.dtype(i.dtype).kind in "iub"}
            if set(raw) != set(suffixes.values()):
                raise ShardError(f"{where}: has members {sorted(raw)}, the first sample had {sorted(suffixes.values())}")
            n = None
            for name, info in fields.items():
                value = np.asarray(decode_field(raw[suffixes[name]], info.ext, npy))
                per_sample = value.shape[1:] if layout == "chunk" else value.shape
                if value.dtype.name != info.dtype or tuple(per_sample) != info.shape:
                    raise ShardError(
                        f"{where}: field '{name}' is {value.dtype.name} {list(per_sample)}, the "
                        f"first sample's is {info.dtype} {list(info.shape)}"
                    )
                rows = value.shape[0] if layout == "chunk" else 1
                if n is not None and rows != n:
                    raise ShardError(f"{where}: fields have different leading dims ({n} and {rows})")
                n = rows
                if name in vocab and value.size:
                    vocab[name] = max(vocab[name], int(value.max()))
            members.append(n)
        shards.append(_with_checksums(ShardInfo(_relative(url, folder), sum(members), members, offsets=offsets), url))
    if not fields:
        raise ShardError(f"{dir_or_pattern}: the shards hold no .npy/.cls/.json members")
    for name, top in vocab.items():
        fields[name].vocab = top + 1 if top >= 0 else 0
    chunk = max((m for s in shards for m in s.members), default=1) if layout == "chunk" else 1
    manifest = Manifest(layout, chunk, fields, shards, path=str(folder / MANIFEST_NAME))
    if write:
        write_manifest(manifest, folder)
    return manifest


def _schema(raw: dict[str, bytes], layout: str, npy: NpyDecoder, where: str):
    fields, suffixes = {}, {}
    for suffix, buf in sorted(raw.items()):
        name, ext = suffix_field(suffix)
        if layout == "chunk" and ext != "npy":
            raise ShardError(f"{where}: member '.{suffix}' is not .npy; the chunk layout needs npy arrays")
        try:
            value = np.asarray(decode_field(buf, ext, npy))
        except ValueError as err:
            raise ShardError(f"{where}: field '{name}': unreadable .{ext}: {err}") from err
        shape = value.shape[1:] if layout == "chunk" else value.shape
        fields[name] = FieldInfo(value.dtype.name, tuple(shape), ext)
        suffixes[name] = suffix
    return fields, suffixes


def _with_checksums(shard: ShardInfo, url: str) -> ShardInfo:
    """The entry with the local file's size, xxh3 and per-key xxh3 (remote shards: unchanged)."""
    path = local_path(url)
    if path is None:
        return shard
    keys = [d for _, d in member_digests(path)]
    if len(keys) == len(shard.members):
        shard.member_xxh3 = keys
    shard.bytes, shard.xxh3 = file_digest(path)
    return shard


def _relative(url: str, folder: Path) -> str:
    if os.path.exists(url):
        return os.path.relpath(url, folder)
    return url


# ---------------------------------------------------------------- inspect


def inspect(dir_or_manifest: str | os.PathLike, samples: int = 1) -> str:
    """A printable summary of a shard folder: layout, counts, schema and the first sample(s).

    Without a manifest.json the shards are indexed in memory (nothing is written).
    """
    path = manifest_path(dir_or_manifest)
    note = ""
    if path.is_file():
        m = load_manifest(path)
    else:
        m = index_shards(dir_or_manifest, write=False)
        note = "  (no manifest.json: indexed in memory; `manytask shards index` writes one)"
    problems = [f"  {m.shards[i].url}: {p}" for i in range(len(m.shards))
                if (p := size_problem(m.shard_url(i), m.shards[i]) or _absent(m.shard_url(i)))]
    if problems:
        raise ShardError(f"{m.path}: {len(problems)} of {len(m.shards)} shards do not match the "
                         "manifest:\n" + "\n".join(problems))
    sizes = [s.samples for s in m.shards]
    lines = [
        f"manifest: {m.path}{note}",
        f"layout:   {m.layout}" + (f" (chunk_size {m.chunk_size})" if m.layout == "chunk" else ""),
        f"shards:   {len(m.shards)}  samples: {m.total_samples}"
        + (f"  (per shard {min(sizes)}..{max(sizes)})" if sizes else ""),
        "fields:",
    ]
    width = max(len(n) for n in m.fields)
    for name, f in m.fields.items():
        vocab = f"  vocab {f.vocab}" if f.vocab else ""
        lines.append(f"  {name:<{width}}  {f.dtype:<8} {list(f.shape)!s:<10} .{f.ext}{vocab}")
    if m.preprocessing:
        lines.append("preprocessing (from raw columns; vocabularies beside the manifest):")
        lines += [f"  {name:<{width}}  {describe(rec)}" for name, rec in m.preprocessing.items()]
    checked = sum(1 for s in m.shards if s.member_xxh3 or s.xxh3)
    lines.append(f"checksums: {checked} of {len(m.shards)} shards (`manytask shards verify` checks them)")
    shown = 0
    for s in range(len(m.shards)):
        if shown >= samples:
            break
        for _, key, data in read_shard(m.shard_url(s), m.fields, m.layout, m.shards[s].members,
                                       shard=m.shards[s], manifest=m.path):
            rows = m.shards[s].members[0] if m.layout == "chunk" else 1
            for r in range(min(rows, samples - shown)):
                lines.append(f"sample {shown} (key '{key}' of {m.shards[s].url}):")
                for name, value in data.items():
                    v = np.asarray(value)[r] if m.layout == "chunk" else np.asarray(value)
                    lines.append(f"  {name} = {_short(v)}")
                shown += 1
            break
    return "\n".join(lines)


def _absent(url: str) -> str | None:
    """"no such file" for a local shard path that does not exist (remote urls: None)."""
    return "no such file" if local_path(url) is None and not _is_remote(url) else None


def verify(dir_or_manifest: str | os.PathLike) -> tuple[int, list[str]]:
    """Check every shard of a manifest against its recorded size, whole-file and per-key xxh3.

    Returns (shards checked, problems as "url: what"); shards without recorded checksums are
    counted but only their existence is checked.
    """
    m = load_manifest(dir_or_manifest)
    problems = []
    for i, shard in enumerate(m.shards):
        url = m.shard_url(i)
        if _absent(url):
            problems.append(f"{shard.url}: no such file")
            continue
        problems += [f"{shard.url}: {p}" for p in verify_shard(m, i)]
    return len(m.shards), problems


def _is_remote(url: str) -> bool:
    return url.startswith("pipe:") or "://" in url


def _short(v: np.ndarray) -> str:
    with np.printoptions(precision=4, threshold=8, edgeitems=3, linewidth=90):
        return np.array2string(v, separator=", ").replace("\n", " ")


# `shards write` moved to its own module; these names stay importable from here.
from manytask.data_pipeline.table_to_shards import (  # noqa: E402, F401
    OutputNotEmptyError,
    convert_table,
    read_table,
    take_rows,
    val_rows,
)
