"""The validation reader: one finite, unshuffled pass over every source's `val` split."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from manytask.config import Config
from manytask.data_pipeline.batch import Batch, BatchBuilder
from manytask.data_pipeline.integrity import nonfinite_message, nonfinite_rows
from manytask.data_pipeline.manifest import FieldInfo, Manifest
from manytask.data_pipeline.shard_reader import ShardError, read_shard
from manytask.data_pipeline.sources import check_sources
from manytask.data_pipeline.stream import stack_members
from manytask.schema import ConfigError


def val_batches(
    cfg: Config,
    rank: int = 0,
    world_size: int = 1,
    batch_size: int | None = None,
    max_batches: int | None = None,
) -> Iterator[Batch]:
    """One pass over every source's `val` split, in manifest order, no shuffle.

    Each rank reads the tar keys (members) whose index over the whole manifest is
    ≡ rank (mod world_size), so every validation sample is read by exactly one rank (also with
    a single shard). Batches hold one source each; the last one per source may be short, and
    ranks may get different numbers of batches. batch_size defaults to data.val_batch_size;
    max_batches (default data.val_max_batches, 0 = all) limits batches per source.
    """
    train = check_sources(cfg)
    val = check_sources(cfg, "val")
    for what, got, ref_table in [("input field", val.inputs, train.inputs), ("labels of task", val.labels, train.labels)]:
        for key, spec in got.items():
            ref = ref_table.get(key)
            if ref is not None and (ref.dtype, ref.shape) != (spec.dtype, spec.shape):
                raise ConfigError(
                    f"{what} '{key}': validation data has {spec.dtype} {list(spec.shape)} but "
                    f"training data {ref.dtype} {list(ref.shape)}"
                )
    build = BatchBuilder(cfg, train)
    batch_size = batch_size or cfg.data.val_batch_size
    limit = cfg.data.val_max_batches if max_batches is None else max_batches
    n_src = len(cfg.data.sources)
    for i, m in enumerate(val.manifests):
        if m is None:
            continue
        fields = {f: m.fields[f] for f in build.fields(i)}
        emitted = 0
        policy = cfg.data.on_nonfinite_input
        check = [] if policy == "allow" else [
            f for f in cfg.data.sources[i].inputs if np.dtype(fields[f].dtype).kind == "f"
        ]
        for arrays in _val_arrays(m, fields, rank, world_size, batch_size, cfg.data.skip_corrupt,
                                  (cfg.data.sources[i].name, check, policy)):
            parts: list[dict | None] = [None] * n_src
            parts[i] = arrays
            yield build(parts)
            emitted += 1
            if limit and emitted >= limit:
                break


def _val_arrays(m: Manifest, fields: dict[str, FieldInfo], rank: int, world: int, batch_size: int,
                skip_corrupt: bool, finite: tuple[str, list[str], str] = ("", [], "allow"),
                ) -> Iterator[dict[str, np.ndarray]]:
    """This rank's members of manifest `m`, as arrays of batch_size rows (last one shorter).
    finite: (source name, float input fields to check, data.on_nonfinite_input policy)."""
    pending: list[dict] = []
    carry: dict[str, np.ndarray] | None = None
    rows = 0
    first = 0
    for s, shard in enumerate(m.shards):
        select = {q for q in range(len(shard.members)) if (first + q) % world == rank}
        first += len(shard.members)
        if not select:
            continue
        for _q, key, data in read_shard(
            m.shard_url(s), fields, m.layout, shard.members, select=select,
            skip_corrupt=skip_corrupt, manifest=m.path, shard=shard,
        ):
            if data is None:
                continue
            source, check, policy = finite
            chunk = m.layout == "chunk"
            found = nonfinite_rows(data, check, chunk) if check else None
            if found is not None:
                field, bad = found
                if policy != "skip":
                    raise ShardError(nonfinite_message(source, m.shard_url(s), key, field, int(np.argmax(bad)), chunk))
                if bad.all():
                    continue
                data = {k: v[~bad] for k, v in data.items()} if chunk else data
            pending.append(data)
            rows += len(next(iter(data.values()))) if chunk else 1
            if rows >= batch_size:
                carry = _with_carry(carry, stack_members(pending, fields, m.layout))
                pending = []
                while len(next(iter(carry.values()))) >= batch_size:
                    yield {k: v[:batch_size] for k, v in carry.items()}
                    carry = {k: v[batch_size:] for k, v in carry.items()}
                rows = len(next(iter(carry.values())))
    if pending:
        carry = _with_carry(carry, stack_members(pending, fields, m.layout))
    if carry is not None and len(next(iter(carry.values()))):
        yield carry


def _with_carry(carry: dict | None, new: dict) -> dict:
    return new if carry is None else {k: np.concatenate([carry[k], new[k]]) for k in new}
