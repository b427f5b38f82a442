"""manifest.json: what a directory of WebDataset shards holds, readable without opening a shard.

```
{"version": 1, "layout": "chunk", "chunk_size": 1024,
 "fields": {"x": {"dtype": "float32", "shape": [16], "ext": "npy"},
            "label": {"dtype": "int64", "shape": [], "ext": "npy", "vocab": 4}},
 "shards": [{"url": "shard-000000.tar", "samples": 5000, "members": [1024, ..., 904]}]}
```

- `layout`: `chunk` (each tar key holds a block of up to `chunk_size` samples, every field one
  `.npy` array with that leading dim) or `sample` (one sample per key; `.npy`, `.cls`, `.json`).
- `fields`: per-sample dtype and shape; `vocab` (int fields) is max value + 1 when known.
- `shards[].url`: relative to the manifest, absolute, a brace pattern
  (`train-{000000..000009}.tar`, whose `samples` is then an int for each shard or a list, and
  `members` one list for every shard or a list of lists) or anything `webdataset.gopen` opens
  (`pipe:cat x.tar`, `http://...`). `members` lists samples per tar key in tar order; the
  sample layout may omit it (all 1). Optional `offsets`: the byte offset of each key's first
  tar header, so a reader can seek (or ask with an http Range) straight to the keys it needs.

Window sizes, shard splits and resume positions are all computed from this file alone.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from braceexpand import braceexpand

MANIFEST_NAME = "manifest.json"
LAYOUTS = ("sample", "chunk")
EXTS = ("npy", "cls", "json")
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


class ManifestError(ValueError):
    """A manifest.json that is missing or malformed; the message names the file and the key."""


def sample_bytes(field: Any) -> int:
    """Bytes of one sample of a field (a FieldInfo or FieldSpec: dtype and per-sample shape)."""
    return np.dtype(field.dtype).itemsize * int(np.prod(field.shape, dtype=np.int64))


@dataclass
class FieldInfo:
    """One field: per-sample dtype and shape (no batch dim), tar extension, vocab (0 = unknown),
    pad: the padding id of a multi-valued id field `[k]` (pooling skips it; -1 = none)."""

    dtype: str
    shape: tuple[int, ...]
    ext: str = "npy"
    vocab: int = 0
    pad: int = -1

    def suffix(self, name: str) -> str:
        """Tar member suffix after the key: `x.npy`; a field named like its extension is `cls`."""
        return name if name == self.ext else f"{name}.{self.ext}"

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"dtype": self.dtype, "shape": list(self.shape), "ext": self.ext}
        if self.vocab:
            out["vocab"] = int(self.vocab)
        if self.pad >= 0:
            out["pad"] = int(self.pad)
        return out


@dataclass
class ShardInfo:
    """One shard. Optional integrity fields (0 / "" / [] = not recorded, nothing checked):
    bytes: the file's size; xxh3: xxhash.xxh3_64 hex of the whole file; member_xxh3: per tar
    key in tar order, xxh3_64 hex of that key's member payloads concatenated in tar order;
    offsets: per tar key, byte offset of its first tar header (written by the stream reader's
    indexer)."""

    url: str  # as written in the manifest (relative urls resolve against the manifest's folder)
    samples: int
    members: list[int]  # samples per tar key, in tar order
    bytes: int = 0
    xxh3: str = ""
    member_xxh3: list[str] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)


@dataclass
class Manifest:
    layout: str
    chunk_size: int
    fields: dict[str, FieldInfo]
    shards: list[ShardInfo]
    path: str = ""  # where manifest.json lives; relative shard urls resolve against its folder
    version: int = 1
    # How each field was made from raw table columns (`manytask shards write`; see
    # data_pipeline/preprocess.py): field -> {kind, columns, vocab_file, size, mean, std, ...}.
    preprocessing: dict[str, Any] = field(default_factory=dict)

    @property
    def total_samples(self) -> int:
        return sum(s.samples for s in self.shards)

    def shard_url(self, i: int) -> str:
        """The openable url of shard i (relative paths joined to the manifest's folder)."""
        return resolve_url(self.path, self.shards[i].url)

    def to_json(self) -> dict[str, Any]:
        shards = []
        for s in self.shards:
            entry: dict[str, Any] = {"url": s.url, "samples": int(s.samples)}
            if self.layout == "chunk" or any(m != 1 for m in s.members):
                entry["members"] = [int(m) for m in s.members]
            if s.bytes:
                entry["bytes"] = int(s.bytes)
            if s.xxh3:
                entry["xxh3"] = s.xxh3
            if s.member_xxh3:
                entry["member_xxh3"] = list(s.member_xxh3)
            if s.offsets:
                entry["offsets"] = [int(o) for o in s.offsets]
            shards.append(entry)
        out = {
            "version": self.version,
            "layout": self.layout,
            "chunk_size": int(self.chunk_size),
            "fields": {k: v.to_json() for k, v in self.fields.items()},
            "shards": shards,
        }
        if self.preprocessing:
            out["preprocessing"] = self.preprocessing
        return out


def resolve_url(manifest_path: str, url: str) -> str:
    """Join a relative shard path to the manifest's folder; urls with a scheme stay as they are."""
    if _SCHEME.match(url) or os.path.isabs(url) or not manifest_path:
        return url
    return os.path.join(os.path.dirname(manifest_path), url)


def manifest_path(path_or_dir: str | os.PathLike) -> Path:
    """`dir` -> `dir/manifest.json`; a file path is returned unchanged."""
    p = Path(path_or_dir)
    return p / MANIFEST_NAME if p.is_dir() or p.suffix != ".json" else p


def load_manifest(path_or_dir: str | os.PathLike) -> Manifest:
    """Read and validate manifest.json (or `<dir>/manifest.json`).

    Raises ManifestError naming the file and what was expected.
    """
    path = manifest_path(path_or_dir)
    if not path.is_file():
        raise ManifestError(
            f"{path}: no manifest found (expected a directory with manifest.json, or its path); "
            f"write one with `manytask shards index <dir>` (shards from another writer) or "
            f"`manytask shards write TABLE OUT` (a CSV/Parquet table)"
        )
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ManifestError(f"{path}: not valid JSON: {err}") from err
    return manifest_from_dict(data, str(path))


def manifest_from_dict(data: Any, path: str = "") -> Manifest:
    """Validate a parsed manifest; `path` is used for url resolution and error messages."""
    where = path or "manifest"

    def fail(msg: str) -> ManifestError:
        return ManifestError(f"{where}: {msg}")

    if not isinstance(data, dict):
        raise fail("expected a JSON object at the top level")
    if data.get("version", 1) != 1:
        raise fail(f"'version' {data.get('version')!r} is not supported (expected 1)")
    layout = data.get("layout", "sample")
    if layout not in LAYOUTS:
        raise fail(f"'layout' must be one of {LAYOUTS}, got {layout!r}")
    chunk_size = data.get("chunk_size", 1)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise fail(f"'chunk_size' must be a positive int, got {chunk_size!r}")
    fields = _parse_fields(data.get("fields"), layout, fail)
    raw_shards = data.get("shards")
    if not isinstance(raw_shards, list):
        raise fail("'shards' must be a list of {url, samples, members}")
    shards: list[ShardInfo] = []
    for i, entry in enumerate(raw_shards):
        shards.extend(_parse_shard(entry, i, layout, fail))
    preprocessing = data.get("preprocessing", {})
    if not isinstance(preprocessing, dict):
        raise fail("'preprocessing' must be a mapping of field -> how it was made")
    return Manifest(layout, chunk_size, fields, shards, path=path, preprocessing=preprocessing)


def _parse_fields(raw: Any, layout: str, fail) -> dict[str, FieldInfo]:
    if not isinstance(raw, dict) or not raw:
        raise fail("'fields' must be a non-empty mapping of name -> {dtype, shape, ext}")
    fields = {}
    for name, spec in raw.items():
        key = f"fields.{name}"
        if not isinstance(spec, dict):
            raise fail(f"'{key}' must be a mapping with dtype and shape")
        try:
            dtype = np.dtype(spec.get("dtype")).name
        except TypeError as err:
            raise fail(f"'{key}.dtype' {spec.get('dtype')!r} is not a numpy dtype") from err
        shape = spec.get("shape", [])
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise fail(f"'{key}.shape' must be a list of non-negative ints, got {shape!r}")
        ext = spec.get("ext", "npy")
        if ext not in EXTS:
            raise fail(f"'{key}.ext' must be one of {EXTS}, got {ext!r}")
        if layout == "chunk" and ext != "npy":
            raise fail(f"'{key}.ext' is {ext!r} but the chunk layout stores every field as npy")
        vocab = spec.get("vocab", 0)
        if isinstance(vocab, bool) or not isinstance(vocab, int) or vocab < 0:
            raise fail(f"'{key}.vocab' must be a non-negative int, got {vocab!r}")
        pad = spec.get("pad", -1)
        if isinstance(pad, bool) or not isinstance(pad, int) or pad < -1:
            raise fail(f"'{key}.pad' must be a non-negative int, got {pad!r}")
        fields[str(name)] = FieldInfo(dtype, tuple(shape), ext, vocab, pad)
    return fields


def _parse_shard(entry: Any, i: int, layout: str, fail) -> list[ShardInfo]:
    key = f"shards[{i}]"
    if not isinstance(entry, dict) or not isinstance(entry.get("url"), str):
        raise fail(f"'{key}' must be a mapping with a string 'url'")
    urls = list(braceexpand(entry["url"]))
    samples = entry.get("samples")
    members = entry.get("members")
    per_samples = samples if isinstance(samples, list) else [samples] * len(urls)
    if members is None or (members and isinstance(members[0], list)):
        per_members = members or [None] * len(urls)
    else:
        per_members = [members] * len(urls)
    if len(per_samples) != len(urls) or len(per_members) != len(urls):
        raise fail(f"'{key}': {len(urls)} urls from {entry['url']!r} but "
                   f"{len(per_samples)} 'samples' / {len(per_members)} 'members' entries")
    out = []
    for url, n, mem in zip(urls, per_samples, per_members):
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise fail(f"'{key}.samples' must be a non-negative int, got {n!r}")
        if mem is None:
            if layout == "chunk":
                raise fail(f"'{key}.members' is required in the chunk layout (samples per tar key)")
            mem = [1] * n
        if not isinstance(mem, list) or not all(isinstance(m, int) and m > 0 for m in mem):
            raise fail(f"'{key}.members' must be a list of positive ints")
        if sum(mem) != n:
            raise fail(f"'{key}.members' sums to {sum(mem)} but 'samples' is {n} ({url})")
        if layout == "sample" and any(m != 1 for m in mem):
            raise fail(f"'{key}.members': the sample layout holds exactly 1 sample per key")
        out.append(ShardInfo(url, n, list(mem), *_integrity(entry, len(urls), len(mem), key, fail)))
    return out


def _integrity(entry: dict, n_urls: int, n_keys: int, key: str, fail) -> tuple:
    """(bytes, xxh3, member_xxh3, offsets) of a single-url shard entry; defaults when absent.
    A brace pattern's entry covers several files, so it carries none of them."""
    if n_urls != 1:
        return 0, "", [], []
    size, digest = entry.get("bytes", 0), entry.get("xxh3", "")
    members, offsets = entry.get("member_xxh3", []), entry.get("offsets", [])
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise fail(f"'{key}.bytes' must be a non-negative int, got {size!r}")
    if not isinstance(digest, str):
        raise fail(f"'{key}.xxh3' must be a hex string, got {digest!r}")
    for name, values, kind in (("member_xxh3", members, str), ("offsets", offsets, int)):
        if not isinstance(values, list) or not all(isinstance(v, kind) for v in values):
            raise fail(f"'{key}.{name}' must be a list of {kind.__name__}")
        if values and len(values) != n_keys:
            raise fail(f"'{key}.{name}' has {len(values)} entries for {n_keys} tar keys")
    return size, digest, list(members), list(offsets)


def write_manifest(manifest: Manifest, path_or_dir: str | os.PathLike) -> Path:
    """Write manifest.json atomically (temp file + rename); returns its path."""
    path = manifest_path(path_or_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(manifest.to_json(), indent=1) + "\n")
    os.replace(tmp, path)
    manifest.path = str(path)
    return path

