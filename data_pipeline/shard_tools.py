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

import glob
import math
import os
import shutil
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
    field_infos,
    make_encoders,
    parse_spec,
    preprocessing_record,
    resolve_specs,
)
from manytask.data_pipeline.shard_reader import (
    NpyDecoder,
    ShardError,
    decode_field,
    read_shard,
    split_member_name,
    suffix_field,
)
from manytask.data_pipeline.shard_writer import ShardSink
from manytask.data_pipeline.table_reader import open_table, read_ahead

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


# ---------------------------------------------------------------- convert


def read_table(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Columns of a (small) CSV/TSV, Parquet or NPZ table read whole: name -> array [n, ...]."""
    source = open_table(path)
    parts = list(source.batches(list(source.columns), batch_rows=1 << 30))
    out = {}
    for name in source.columns:
        cols = [b[name] for b in parts]
        out[name] = np.concatenate([np.asarray(c.to_numpy(zero_copy_only=False)) if hasattr(c, "to_numpy")
                                    else np.asarray(c) for c in cols]) if cols else np.zeros(0)
    return out


class OutputNotEmptyError(ValueError):
    """`shards write` into a folder that already holds files, without force."""


def take_rows(a: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """a[rows] for a [n, ...] array; a row of several values is moved as one opaque item
    (numpy gathers a [n, 4] int64 array ~8x faster so than element by element)."""
    if a.ndim > 1 and a.flags.c_contiguous and a.size:
        row = np.dtype((np.void, a.itemsize * (a.size // len(a))))
        return np.take(a.reshape(len(a), -1).view(row)[:, 0], rows).view(a.dtype).reshape((len(rows),) + a.shape[1:])
    return np.take(a, rows, axis=0)


def val_rows(n: int, val_fraction: float, seed: int):
    """A function rows -> bool mask "goes to val/" that picks exactly round(n * val_fraction) of
    rows 0..n-1, spread evenly over the table, in O(1) memory: row i is in val when
    (a * i + b) mod n < n_val, a bijection of 0..n-1 for a coprime to n."""
    n_val = int(round(n * val_fraction))
    rng = np.random.default_rng(seed)
    b = int(rng.integers(n)) if n else 0
    a = int(n * 0.6180339887498949) | 1 if n > 2 else 1
    while n and math.gcd(a, n) != 1:
        a += 2
    a %= max(n, 1)

    def is_val(rows: np.ndarray) -> np.ndarray:
        if n_val == 0:
            return np.zeros(len(rows), bool)
        pos = (rows.astype(object) * a + b) % n if n > 3_000_000_000 else (rows * a + b) % n
        return np.asarray(pos < n_val, bool)

    return is_val, n_val


def convert_table(
    input: str | os.PathLike,
    out_dir: str | os.PathLike,
    features: list[str],
    targets: list[str],
    samples_per_shard: int = 100_000,
    chunk_size: int = 1024,
    val_fraction: float = 0.1,
    seed: int = 0,
    layout: str = "chunk",
    force: bool = False,
    min_count: int = 1,
    max_vocab: int = 0,
    batch_rows: int = 131_072,
) -> dict[str, Manifest]:
    """Convert a table (file, directory or glob of CSV / TSV / Parquet, or one NPZ) to
    `out_dir/train` and `out_dir/val` (shards + manifest.json + vocabulary files each).

    features / targets: column specs (data_pipeline/preprocess.py). The table is streamed in
    record batches of `batch_rows` (memory is bounded by the batch): pass 1 (only when some field
    needs a vocabulary or statistics) reads the training rows, pass 2 encodes and writes.
    Exactly round(n * val_fraction) rows go to val/, spread over the table (`val_rows`); the
    training rows of each batch are shuffled with `seed`. An `out_dir` that already holds files
    is refused unless `force`. Returns {"train": Manifest, "val": Manifest} (no val/ when 0).
    """
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not force:
        raise OutputNotEmptyError(
            f"{out}: the folder is not empty; `manytask shards write` would replace what is there. "
            "Choose another folder, or pass --force (force=True) to overwrite it"
        )
    source = open_table(input)
    specs = [parse_spec(t, "input", min_count, max_vocab) for t in features]
    specs += [parse_spec(t, "target", min_count, max_vocab) for t in targets]
    encoders = make_encoders(resolve_specs(specs, source.columns))
    columns = list(dict.fromkeys(c for e in encoders for c in e.spec.columns))
    strings = {e.spec.columns[0] for e in encoders if e.spec.kind in ("cat", "hash", "eq")
               or (e.spec.kind == "multi" and source.columns[e.spec.columns[0]] == "string")}
    # Vocabulary columns are read as dictionaries where the format stores them so (Parquet).
    dictionaries = {e.spec.columns[0] for e in encoders if e.spec.kind in ("cat", "multi")}
    n = source.count_rows()
    if n == 0:
        raise ValueError(f"{input}: the table has no rows")
    is_val, n_val = val_rows(n, val_fraction, seed)

    def batches(wanted: list[str]):
        row0 = 0
        for cols in read_ahead(source.batches(wanted, strings & set(wanted), batch_rows, dictionaries)):
            rows = len(next(iter(cols.values())))
            yield row0, rows, cols
            row0 += rows

    fitting = [e for e in encoders if e.needs_fit]
    if fitting:
        fit_columns = list(dict.fromkeys(c for e in fitting for c in e.spec.columns))
        for row0, rows, cols in batches(fit_columns):
            train = ~is_val(np.arange(row0, row0 + rows))
            for e in fitting:
                e.fit(cols, train)
    for e in fitting:
        e.finish()
    record = preprocessing_record(encoders)
    splits = {"train": out / "train"} | ({"val": out / "val"} if n_val else {})
    for folder in splits.values():
        if folder.exists() and force:
            shutil.rmtree(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for e in encoders:
            e.write_files(folder)
    sinks: dict[str, ShardSink] = {}
    tops: dict[str, int] = {}
    fixed = {k for e in encoders for k in e.vocab_sizes()}
    for b, (row0, rows, cols) in enumerate(batches(columns)):
        arrays: dict[str, np.ndarray] = {}
        for e in encoders:
            arrays.update(e.encode(cols, row0))
        if not sinks:
            fields = field_infos(arrays, encoders, layout)
            sinks = {s: ShardSink(folder, dict(fields), samples_per_shard, chunk_size, layout,
                                  prefix=s, preprocessing=record)
                     for s, folder in splits.items()}
        for name, a in arrays.items():
            if name not in fixed and a.dtype.kind in "iu" and a.size:
                tops[name] = max(tops.get(name, -1), int(a.max()))
        val = is_val(np.arange(row0, row0 + rows))
        train_idx = np.flatnonzero(~val)
        train_idx = train_idx[np.random.default_rng([seed, b]).permutation(len(train_idx))]
        sinks["train"].add({k: take_rows(v, train_idx) for k, v in arrays.items()})
        if "val" in sinks:
            sinks["val"].add({k: take_rows(v, np.flatnonzero(val)) for k, v in arrays.items()})
    for sink in sinks.values():
        for name, top in tops.items():
            sink.fields[name].vocab = top + 1 if top >= 0 else 0
            sink.fixed_vocab.add(name)
    return {s: sink.close() for s, sink in sinks.items()}
