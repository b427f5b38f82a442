"""Shard tools behind `manytask shards index | inspect | verify | write`.

- `index_shards(dir_or_pattern)`: read shards written by any WebDataset writer and write their
  manifest.json (schema, samples per key, sizes and checksums of local shards). Foreign shards
  are taken as the sample layout unless `layout="chunk"` is given (then every field of a key
  is one array whose leading dim is that key's sample count).
- `inspect(dir)`: a human summary: layout, schema, counts and the first sample; every listed
  shard must exist with its recorded size.
- `verify(dir)`: every shard against its recorded size and checksums.
- `convert_table(input, out_dir, features, targets, ...)`: CSV / Parquet / NPZ -> train/ and
  val/ shard folders. A column spec is `col` (field `col`, per-sample shape []),
  `name=c1,c2,...` or `name=prefix*` (field `name`, shape [k], columns in order).
"""

from __future__ import annotations

import fnmatch
import glob
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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
from manytask.data_pipeline.shard_reader import (
    NpyDecoder,
    ShardError,
    decode_field,
    read_shard,
    split_member_name,
    suffix_field,
)
from manytask.data_pipeline.shard_writer import write_shards

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


def _scan_keys(url: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {suffix: payload}) for every key of a shard, in tar order (any WebDataset tar)."""
    try:
        stream = gopen(url, "rb")
    except Exception as err:  # noqa: BLE001
        raise ShardError(f"shard {url}: cannot open ({type(err).__name__}: {err})") from err
    key, raw = None, {}
    try:
        with tarfile.open(fileobj=stream, mode="r|*") as tar:
            for info in tar:
                tar.members = []
                parts = split_member_name(info.name) if info.isfile() else None
                if parts is None or suffix_field(parts[1])[1] not in EXTS:
                    continue
                if parts[0] != key:
                    if key is not None:
                        yield key, raw
                    key, raw = parts[0], {}
                raw[parts[1]] = tar.extractfile(info).read()
    except (tarfile.TarError, OSError, EOFError) as err:
        raise ShardError(f"shard {url}: corrupt or truncated tar after sample '{key}' ({err})") from err
    finally:
        stream.close()
    if key is not None:
        yield key, raw


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
        members = []
        for key, raw in _scan_keys(url):
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
        shards.append(_with_checksums(ShardInfo(_relative(url, folder), sum(members), members), url))
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
                if (p := size_problem(m.shard_url(i), m.shards[i]))]
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


def verify(dir_or_manifest: str | os.PathLike) -> tuple[int, list[str]]:
    """Check every shard of a manifest against its recorded size, whole-file and per-key xxh3.

    Returns (shards checked, problems as "url: what"); shards without recorded checksums are
    counted but only their existence is checked.
    """
    m = load_manifest(dir_or_manifest)
    problems = []
    for i, shard in enumerate(m.shards):
        url = m.shard_url(i)
        if not (shard.bytes or shard.xxh3 or shard.member_xxh3) and local_path(url) is None \
                and not _is_remote(url):
            problems.append(f"{shard.url}: no such file")
            continue
        problems += [f"{shard.url}: {p}" for p in verify_shard(m, i)]
    return len(m.shards), problems


def _is_remote(url: str) -> bool:
    return url.startswith("pipe:") or "://" in url


def _short(v: np.ndarray) -> str:
    with np.printoptions(precision=4, threshold=8, edgeitems=3, linewidth=90):
        return np.array2string(v, separator=", ").replace("\n", " ")


# ---------------------------------------------------------------- convert


def read_table(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Columns of a CSV/TSV (pandas), Parquet (pyarrow) or NPZ file: name -> array [n, ...]."""
    p = str(path)
    low = p.lower()
    if low.endswith(".npz"):
        with np.load(p, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    import pandas as pd  # optional dependency (dev extra); only the table formats need it

    if low.endswith((".parquet", ".pq")):
        df = pd.read_parquet(p)
    elif low.endswith((".csv", ".csv.gz", ".tsv", ".tsv.gz", ".txt")):
        df = pd.read_csv(p, sep="\t" if ".tsv" in low else ",")
    else:
        raise ValueError(f"{p}: unsupported table format (use .csv, .tsv, .parquet or .npz)")
    return {str(c): df[c].to_numpy() for c in df.columns}


def _parse_specs(specs: list[str] | dict[str, list[str]], columns: list[str], what: str) -> dict[str, list[str]]:
    """['a', 'x=f1,f2', 'y=t*'] or {'x': ['f1', 'f2']} -> field -> columns."""
    items = specs.items() if isinstance(specs, dict) else [
        (s.split("=", 1) if "=" in s else (s, s)) for s in specs
    ]
    out: dict[str, list[str]] = {}
    for name, cols in items:
        cols = cols.split(",") if isinstance(cols, str) else list(cols)
        picked = []
        for c in (c.strip() for c in cols):
            match = fnmatch.filter(columns, c) if any(ch in c for ch in "*?[") else [c] if c in columns else []
            if not match:
                raise ValueError(f"{what} '{name}': no column '{c}' (columns: {', '.join(columns[:20])})")
            picked += match
        out[name.strip()] = picked
    return out


def _field_array(name: str, cols: list[str], table: dict[str, np.ndarray], single: bool) -> np.ndarray:
    parts = []
    for c in cols:
        a = table[c]
        if a.dtype.kind not in "biuf":
            raise ValueError(f"column '{c}' ({a.dtype}) is not numeric; encode it as numbers first")
        parts.append(a if single else a.reshape(len(a), -1))
    arr = parts[0] if single else np.concatenate(parts, axis=1)
    if arr.dtype.kind == "f":
        return arr.astype(np.float32)
    return arr.astype(np.int64)


def convert_table(
    input: str | os.PathLike,
    out_dir: str | os.PathLike,
    features: list[str] | dict[str, list[str]],
    targets: list[str] | dict[str, list[str]],
    samples_per_shard: int = 100_000,
    chunk_size: int = 1024,
    val_fraction: float = 0.1,
    seed: int = 0,
    layout: str = "chunk",
) -> dict[str, Manifest]:
    """Convert a table to `out_dir/train` and `out_dir/val` (shards + manifest.json each).

    features/targets: column specs (see module doc); floats become float32 (NaN = missing
    label), integers and bools int64. Rows are shuffled with `seed`; `val_fraction` of them
    go to val/ (no val/ when 0). Returns {"train": Manifest, "val": Manifest}.
    """
    table = read_table(input)
    columns = list(table)
    specs = {**_parse_specs(features, columns, "feature"), **_parse_specs(targets, columns, "target")}
    arrays: dict[str, Any] = {}
    for name, cols in specs.items():
        single = len(cols) == 1 and (name == cols[0] or table[cols[0]].ndim > 1)
        arrays[name] = _field_array(name, cols, table, single)
    n = len(next(iter(arrays.values())))
    if n == 0:
        raise ValueError(f"{input}: the table has no rows")
    order = np.random.default_rng(seed).permutation(n)
    n_val = int(round(n * val_fraction))
    splits = {"train": order[n_val:], "val": np.sort(order[:n_val])}
    vocab = {k: int(v.max()) + 1 for k, v in arrays.items() if v.dtype.kind == "i" and v.max() >= 0}
    out = {}
    for split, idx in splits.items():
        if len(idx) == 0:
            continue
        out[split] = write_shards(
            Path(out_dir) / split, {k: v[idx] for k, v in arrays.items()},
            samples_per_shard, chunk_size, layout, prefix=split, vocab=vocab,
        )
    return out
