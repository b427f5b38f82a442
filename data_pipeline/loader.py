"""Batches for the trainer: one DataLoader per source, mixed per step, resumable exactly.

- `SourceLoader`: a torch DataLoader (batch_size=None) over the blocks of one source's
  ShardStream; `take(n)` returns the next n samples and records, per DataLoader worker, how far
  the *trainer* has read (prefetched blocks are not counted), so `state_dict()` resumes exactly.
- `MultiSourceLoader(cfg, rank, world_size)`: `next_batch(counts)` takes counts[i] samples from
  source i and builds a `Batch` (inputs by field, zero-filled where a source lacks a field;
  labels and masks by task; source_id per sample).
- `model_inputs`, `source_sizes`, `label_specs`, `task_out_dims`: what the model builder and
  the task sampler need, read from the manifests only.
- `val_batches`: a finite, unshuffled pass over every source's validation split.

Masks: a sample's task mask is False when its source does not label the task, when a float
label holds NaN (any element) and when an integer label is negative; labels are 0 there.
"""

from __future__ import annotations

import atexit
import logging
import signal
import sys
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from manytask.config import Config, SourceConfig
from manytask.data_pipeline.batch import Batch
from manytask.data_pipeline.integrity import nonfinite_message, nonfinite_rows
from manytask.data_pipeline.manifest import Manifest, ManifestError, load_manifest
from manytask.data_pipeline.shard_reader import ShardError, read_shard
from manytask.data_pipeline.stream import (
    START,
    Block,
    Position,
    ShardStream,
    source_salt,
    stack_members,
)
from manytask.models.spec import FieldSpec
from manytask.schema import ConfigError

log = logging.getLogger(__name__)
STATE_VERSION = 1
# Samples per block a worker sends: each block costs a fixed ~1 ms of queue and pickle work,
# so blocks are at least this big even when batches are small.
MIN_BLOCK = 4096


# ---------------------------------------------------------------- manifests and specs


@dataclass
class _Sources:
    """The recipe's sources checked against their manifests (one split: train or val)."""

    manifests: list[Manifest | None]  # None: the source has no such split
    inputs: dict[str, FieldSpec]  # every configured input field
    labels: dict[str, FieldSpec]  # task -> label spec, in recipe task order


def _field_spec(m: Manifest, name: str) -> FieldSpec:
    f = m.fields[name]
    return FieldSpec(f.dtype, tuple(f.shape), f.vocab, f.pad)


def _load(src: SourceConfig, split: str) -> Manifest | None:
    where = getattr(src, split)
    if where is None:
        return None
    try:
        m = load_manifest(where)
    except ManifestError as err:
        from manytask.data_pipeline.prepare import prepare_hint

        raise ConfigError(f"data.sources.{src.name}.{split}: {err}{prepare_hint(where)}") from err
    if m.total_samples == 0:
        raise ConfigError(
            f"data.sources.{src.name}.{split}: {m.path} lists no samples (empty source); "
            f"write shards first (`manytask data prepare NAME` for a bundled recipe, `manytask shards write` for a table)"
        )
    return m


def _check_sources(cfg: Config, split: str = "train") -> _Sources:
    """Load every source's manifest and check the configured fields; raises ConfigError
    naming the source, the manifest and the field."""
    manifests = [_load(src, split) for src in cfg.data.sources]
    inputs: dict[str, tuple[FieldSpec, str]] = {}
    labels: dict[str, tuple[FieldSpec, str]] = {}
    for src, m in zip(cfg.data.sources, manifests):
        if m is None:
            continue
        wanted = [("inputs", f, f) for f in src.inputs] + [
            (f"labels.{t}", f, t) for t, f in src.labels.items()
        ]
        for key, fname, _ in wanted:
            if fname not in m.fields:
                raise ConfigError(
                    f"data.sources.{src.name}.{key}: field '{fname}' is not in {m.path} "
                    f"(fields there: {', '.join(m.fields)})"
                )
        for fname in src.inputs:
            _merge(inputs, fname, _field_spec(m, fname), f"source '{src.name}' ({m.path})", "input field")
        for task, fname in src.labels.items():
            _merge(labels, task, _field_spec(m, fname), f"source '{src.name}' ({m.path}, field '{fname}')", "labels of task")
    order = {t: i for i, t in enumerate(cfg.tasks)}
    ordered = dict(sorted(labels.items(), key=lambda kv: order.get(kv[0], len(order))))
    return _Sources(manifests, {k: v for k, (v, _) in inputs.items()}, {k: v for k, (v, _) in ordered.items()})


def _merge(table: dict, key: str, spec: FieldSpec, where: str, what: str) -> None:
    if key not in table:
        table[key] = (spec, where)
        return
    old, old_where = table[key]
    if (old.dtype, old.shape) != (spec.dtype, spec.shape):
        raise ConfigError(
            f"{what} '{key}': {old.dtype} {list(old.shape)} in {old_where} but "
            f"{spec.dtype} {list(spec.shape)} in {where}; sources must agree"
        )
    old.vocab = max(old.vocab, spec.vocab)


def model_inputs(cfg: Config) -> dict[str, FieldSpec]:
    """Every input field of every source: field -> FieldSpec (dtype, per-sample shape, vocab)."""
    return _check_sources(cfg).inputs


def source_sizes(cfg: Config) -> list[int]:
    """Training samples per source, in `data.sources` order (for the proportional sampler)."""
    return [m.total_samples for m in _check_sources(cfg).manifests]


def label_specs(cfg: Config) -> dict[str, FieldSpec]:
    """task -> FieldSpec of its label field (dtype, per-sample shape, vocab = classes if known)."""
    return _check_sources(cfg).labels


def task_out_dims(cfg: Config) -> dict[str, int]:
    """task -> model output width: `tasks.<t>.out_dim` if set, else inferred from the label:
    multiclass = vocab, multilabel = shape[-1], forecast = shape[0], others = product of shape."""
    specs = label_specs(cfg)
    out = {}
    for task, tc in cfg.tasks.items():
        spec = specs[task]
        if tc.out_dim > 0:
            out[task] = tc.out_dim
        elif tc.type == "multiclass":
            if spec.vocab <= 1:
                raise ConfigError(
                    f"tasks.{task}: cannot infer the number of classes (the label field's manifest "
                    f"entry has no 'vocab'); set tasks.{task}.out_dim"
                )
            out[task] = spec.vocab
        elif tc.type in ("multilabel", "forecast") and spec.shape:
            out[task] = spec.shape[-1] if tc.type == "multilabel" else spec.shape[0]
        else:
            out[task] = int(np.prod(spec.shape)) if spec.shape else 1
    return out


# ---------------------------------------------------------------- one source


def _worker_init(worker_id: int) -> None:
    """Leave SIGTERM/SIGUSR1 to the trainer (SLURM signals every process of the job, and a
    worker dying on it would crash the step the trainer wants to finish), and die with the
    trainer: an orphaned worker would keep the dead rank's sockets open and stall its peers."""
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _identity(x: Any) -> Any:
    return x


# Loaders still open at interpreter exit are closed first: multiprocessing's exit hook joins
# every child, and a worker that ignores SIGTERM would otherwise hang a crashed trainer there.
# (atexit runs hooks last-registered first; multiprocessing registered its hook on import.)
_OPEN: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _close_open_loaders() -> None:
    for loader in list(_OPEN):
        loader.close()


class _BlockDataset(IterableDataset):
    """The blocks of one ShardStream; DataLoader worker k runs split (k + rotation) % splits."""

    def __init__(self, stream: ShardStream, starts: list[Position], drop: int, rotation: int):
        self.stream, self.starts, self.drop, self.rotation = stream, starts, drop, rotation

    def __iter__(self) -> Iterator[Block]:
        info = get_worker_info()
        worker = ((info.id if info else 0) + self.rotation) % self.stream.splits_per_rank
        drop = self.drop if worker == self.rotation else 0
        for block in self.stream.blocks(worker, self.starts[worker], drop):
            if info is not None:
                block.data = _pack(block.data)
            yield block


def _pack(data: dict[str, np.ndarray]) -> tuple[list, bytes]:
    """Arrays -> (meta, one bytes payload) for the trip from a worker.

    One pickled bytes object is far cheaper to send than torch's shared-memory tensors
    (a file descriptor and an mmap per tensor) or pickled numpy arrays.
    """
    meta = [(k, v.dtype.str, v.shape) for k, v in data.items()]
    return meta, b"".join(np.ascontiguousarray(v).data for v in data.values())


def _unpack(packed: tuple[list, bytes]) -> dict[str, np.ndarray]:
    """(meta, payload) -> field -> read-only array views of the payload."""
    meta, payload = packed
    out, offset = {}, 0
    for name, dtype, shape in meta:
        dt = np.dtype(dtype)
        count = int(np.prod(shape, dtype=np.int64))
        out[name] = np.frombuffer(payload, dt, count, offset).reshape(shape)
        offset += count * dt.itemsize
    return out


class SourceLoader:
    """One source on one rank: its DataLoader, and the position the trainer has consumed.

    torch's DataLoader asks its workers in turn (0, 1, ..., 0, ...) and always starts at worker
    0, so on resume the logical worker whose block is due next is placed on DataLoader worker 0.
    A half-consumed block is re-read from its start position minus the samples already used.
    """

    def __init__(self, stream: ShardStream, num_workers: int = 0):
        self.stream = stream
        self.num_workers = num_workers
        self.splits = stream.splits_per_rank
        self._positions = [START] * self.splits  # per logical worker, consumed by the trainer
        self._next = 0  # logical worker whose block comes next
        self._drop = 0  # samples of that worker's next block already consumed
        self._skipped_base = 0  # skipped samples recorded under an older split layout
        self._head: Block | None = None
        self._used = 0
        self._iter: Iterator[Block] | None = None
        _OPEN.add(self)

    def _start(self) -> None:
        ds = _BlockDataset(self.stream, list(self._positions), self._drop, self._next)
        if self.num_workers == 0:
            # In-process, a DataLoader would only add its per-item profiler hooks.
            self._iter = iter(ds)
            return
        loader = DataLoader(
            ds, batch_size=None, num_workers=self.num_workers, collate_fn=_identity,
            prefetch_factor=2, worker_init_fn=_worker_init,
        )
        self._iter = iter(loader)

    def take(self, n: int) -> dict[str, np.ndarray]:
        """The next n samples: field -> writable array [n, ...] (safe for torch.from_numpy)."""
        parts: list[dict[str, np.ndarray]] = []
        while n > 0:
            if self._head is None:
                if self._iter is None:
                    self._start()
                block = next(self._iter)
                if block.worker != self._next:  # the round-robin contract resume depends on
                    raise RuntimeError(
                        f"source '{self.stream.name}': got a block of worker {block.worker}, "
                        f"expected worker {self._next}"
                    )
                if isinstance(block.data, tuple):
                    block.data = _unpack(block.data)
                self._head, self._used = block, 0
            head = self._head
            k = min(n, head.size - self._used)
            if k:
                parts.append({f: a[self._used : self._used + k] for f, a in head.data.items()})
            self._used += k
            n -= k
            if self._used == head.size:  # fully consumed: the worker's position moves on
                self._positions[head.worker] = head.after
                self._next = (head.worker + 1) % self.splits
                self._drop, self._head = 0, None
        if not parts:
            return {f: np.zeros((0, *i.shape), i.dtype) for f, i in self.stream.fields.items()}
        if len(parts) == 1:
            return {f: a if a.flags.writeable else a.copy() for f, a in parts[0].items()}
        return {f: np.concatenate([p[f] for p in parts]) for f in parts[0]}

    @property
    def skipped(self) -> int:
        """Corrupt samples skipped so far (consumed blocks only)."""
        return self._skipped_base + sum(p.skipped for p in self._positions)

    @property
    def epoch(self) -> int:
        """The epoch of the slowest worker."""
        return min(p.epoch for p in self._positions)

    def state_dict(self) -> dict[str, Any]:
        drop = self._drop if self._head is None else self._head.offset + self._used
        m = self.stream.manifest
        return {
            "world_size": self.stream.world_size,
            "splits_per_rank": self.splits,
            "shards": len(m.shards),
            "samples": m.total_samples,
            "block_size": self.stream.block_size,
            "positions": [list(p) for p in self._positions],
            "next_worker": self._next,
            "drop": drop,
            "skipped_base": self._skipped_base,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a position. A state from another world size, worker count or manifest
        restarts its slowest epoch from the beginning under the new split (with a warning)."""
        self.close()
        positions = [Position(*p) for p in state["positions"]]
        same = (
            state["world_size"] == self.stream.world_size
            and state["splits_per_rank"] == self.splits
            and state["shards"] == len(self.stream.manifest.shards)
            and state["samples"] == self.stream.manifest.total_samples
        )
        if same:
            # Block boundaries decide how workers interleave: keep the saved ones.
            self.stream.block_size = int(state.get("block_size", self.stream.block_size))
            self._positions = positions
            self._next, self._drop = int(state["next_worker"]), int(state["drop"])
            self._skipped_base = int(state["skipped_base"])
            return
        epoch = min(p.epoch for p in positions)
        log.warning(
            "source '%s': the saved data position was recorded with world_size=%s x %s workers "
            "over %s shards; now %s x %s over %s. Restarting epoch %d from its beginning under "
            "the new split (samples of that epoch already seen are replayed).",
            self.stream.name, state["world_size"], state["splits_per_rank"], state["shards"],
            self.stream.world_size, self.splits, len(self.stream.manifest.shards), epoch,
        )
        self._positions = [Position(epoch, 0, 0)] * self.splits
        self._next, self._drop = 0, 0
        self._skipped_base = int(state["skipped_base"]) + sum(p.skipped for p in positions)

    def close(self) -> None:
        """Stop the DataLoader workers and forget prefetched blocks (the position is kept)."""
        if self._head is not None:  # keep the partial block as "drop" so nothing is lost
            self._drop = self._head.offset + self._used
            self._head = None
        it, self._iter = self._iter, None
        shutdown = getattr(it, "_shutdown_workers", None)
        if shutdown is not None:
            workers = list(getattr(it, "_workers", []))
            shutdown()
            for w in workers:  # they ignore SIGTERM (see _worker_init), so DataLoader's
                if w.is_alive():  # terminate() fallback cannot stop a stuck one
                    w.kill()
                    w.join(timeout=5)


# ---------------------------------------------------------------- batches


class _BatchBuilder:
    """Builds a Batch from per-source parts (field -> tensor [n_i, ...])."""

    def __init__(self, cfg: Config, sources: _Sources):
        self.cfg = cfg
        self.inputs = sources.inputs
        self.labels = {t: sources.labels[t] for t in cfg.tasks}
        self.src_inputs = [set(s.inputs) for s in cfg.data.sources]
        self.src_labels = [dict(s.labels) for s in cfg.data.sources]
        self.pin = torch.cuda.is_available()

    def fields(self, i: int) -> list[str]:
        src = self.cfg.data.sources[i]
        return list(dict.fromkeys([*src.inputs, *src.labels.values()]))

    def __call__(self, parts: list[dict[str, np.ndarray] | None]) -> Batch:
        """parts[i]: field -> writable array [n_i, ...] of source i, or None."""
        present = [
            (i, {k: torch.from_numpy(v) for k, v in p.items()}, _rows(p))
            for i, p in enumerate(parts) if p is not None and _rows(p) > 0
        ]
        inputs = {}
        for name, spec in self.inputs.items():
            pieces = [p[name] if name in self.src_inputs[i] else _zeros(n, spec) for i, p, n in present]
            inputs[name] = _cat(pieces, spec)
        labels, masks = {}, {}
        for task, spec in self.labels.items():
            ys, ms = [], []
            for i, p, n in present:
                field = self.src_labels[i].get(task)
                if field is None:
                    ys.append(_zeros(n, spec))
                    ms.append(torch.zeros(n, dtype=torch.bool))
                else:
                    y, m = _clean_label(p[field])
                    ys.append(y)
                    ms.append(m)
            labels[task] = _cat(ys, spec)
            masks[task] = torch.cat(ms) if ms else torch.zeros(0, dtype=torch.bool)
        ids = [torch.full((n,), i, dtype=torch.long) for i, _, n in present]
        batch = Batch(inputs, labels, masks, torch.cat(ids) if ids else torch.zeros(0, dtype=torch.long))
        return batch.pin_memory() if self.pin else batch


def _rows(part: dict[str, Any]) -> int:
    return int(next(iter(part.values())).shape[0]) if part else 0


def _zeros(n: int, spec: FieldSpec) -> torch.Tensor:
    return torch.from_numpy(np.zeros((n, *spec.shape), dtype=spec.dtype))


def _cat(pieces: list[torch.Tensor], spec: FieldSpec) -> torch.Tensor:
    if not pieces:
        return _zeros(0, spec)
    # Always a fresh allocation, never a view into a block: a view's offset (and so its
    # alignment) depends on where a resumed stream's first block starts, which changes SIMD
    # reduction order and the last bit of a loss. One memcpy keeps resumed runs bitwise equal.
    return torch.cat(pieces)


def _clean_label(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(label with missing entries zeroed, mask [n]): NaN floats and negative ints are missing."""
    if y.dtype == torch.bool:
        return y, torch.ones(y.shape[0], dtype=torch.bool)
    bad = torch.isnan(y) if y.is_floating_point() else y < 0
    if y.dim() > 1:
        bad = bad.flatten(1).any(1)
    if not bool(bad.any()):
        return y, ~bad
    return y.masked_fill(bad.view(-1, *[1] * (y.dim() - 1)), 0), ~bad


class MultiSourceLoader:
    """Batches mixed from every source of the recipe, for one rank.

    Construction checks every source's manifest against the recipe (ConfigError naming the
    source, manifest and field). Streams are seeded by (seed, source name, epoch, split,
    window); `seed` defaults to `cfg.run.seed`. `block_size`: samples per worker block
    (default max(batch_size, MIN_BLOCK)). Use as a context manager or call `close()`.

    State semantics: `state_dict()` records, per source and DataLoader worker, the samples the
    trainer has consumed, so a resumed loader yields exactly what an uninterrupted one would.
    A state saved with another world size, number of workers or manifest cannot be mapped
    sample by sample; then each source restarts its slowest recorded epoch from the beginning
    under the new split (samples of that epoch are seen again) and a warning is logged. Every
    rank should then load the same state (e.g. rank 0's) so all ranks agree on the epoch.
    """

    def __init__(
        self, cfg: Config, rank: int = 0, world_size: int = 1, seed: int | None = None,
        block_size: int | None = None,
    ):
        self.cfg = cfg
        sources = _check_sources(cfg)
        self.names = [s.name for s in cfg.data.sources]
        self._build = _BatchBuilder(cfg, sources)
        seed = cfg.run.seed if seed is None else seed
        d = cfg.data
        block_size = block_size or max(d.batch_size, MIN_BLOCK)
        self.loaders = []
        for i, (src, m) in enumerate(zip(cfg.data.sources, sources.manifests)):
            stream = ShardStream(
                m, rank, world_size, seed, d.shuffle_buffer, d.skip_corrupt, self._build.fields(i),
                splits_per_rank=d.num_workers, block_size=block_size,
                salt=source_salt(src.name), name=src.name,
                check_finite=list(src.inputs) if d.on_nonfinite_input != "allow" else None,
                on_nonfinite=d.on_nonfinite_input,
            )
            self.loaders.append(SourceLoader(stream, d.num_workers))

    def next_batch(self, counts: list[int]) -> Batch:
        """A Batch of sum(counts) samples: counts[i] from source i, sources in recipe order.

        inputs: field -> [B, ...]; labels: task -> [B, ...]; masks: task -> bool [B];
        source_id: long [B]. Every recipe task is present in labels and masks.
        """
        if len(counts) != len(self.loaders) or any(int(c) < 0 for c in counts):
            raise ValueError(f"counts must be {len(self.loaders)} non-negative ints, got {counts}")
        parts = [ld.take(int(c)) if c else None for ld, c in zip(self.loaders, counts)]
        return self._build(parts)

    def skipped(self) -> dict[str, int]:
        """Corrupt samples skipped so far, per source."""
        return {n: ld.skipped for n, ld in zip(self.names, self.loaders)}

    def epochs(self) -> dict[str, int]:
        """Current (slowest worker's) epoch per source."""
        return {n: ld.epoch for n, ld in zip(self.names, self.loaders)}

    def state_dict(self) -> dict[str, Any]:
        """Plain ints/lists/dicts (loads with `torch.load(weights_only=True)`)."""
        return {"version": STATE_VERSION, "sources": {n: ld.state_dict() for n, ld in zip(self.names, self.loaders)}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state.get("sources", {})
        for name, ld in zip(self.names, self.loaders):
            if name in saved:
                ld.load_state_dict(saved[name])
            else:
                log.warning("source '%s' has no saved data position; it starts from the beginning", name)
        extra = set(saved) - set(self.names)
        if extra:
            log.warning("saved data positions for sources %s not in the recipe are ignored", sorted(extra))

    def close(self) -> None:
        for ld in self.loaders:
            ld.close()

    def __enter__(self) -> MultiSourceLoader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# ---------------------------------------------------------------- validation


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
    train = _check_sources(cfg)
    val = _check_sources(cfg, "val")
    for what, got, ref_table in [("input field", val.inputs, train.inputs), ("labels of task", val.labels, train.labels)]:
        for key, spec in got.items():
            ref = ref_table.get(key)
            if ref is not None and (ref.dtype, ref.shape) != (spec.dtype, spec.shape):
                raise ConfigError(
                    f"{what} '{key}': validation data has {spec.dtype} {list(spec.shape)} but "
                    f"training data {ref.dtype} {list(ref.shape)}"
                )
    build = _BatchBuilder(cfg, train)
    batch_size = batch_size or cfg.data.val_batch_size
    limit = cfg.data.val_max_batches if max_batches is None else max_batches
    n_src = len(cfg.data.sources)
    for i, m in enumerate(val.manifests):
        if m is None:
            continue
        fields = {f: m.fields[f] for f in build.fields(i)}
        emitted = 0
        policy = cfg.data.on_nonfinite_input
        check = [] if policy == "allow" else [f for f in cfg.data.sources[i].inputs if np.dtype(fields[f].dtype).kind == "f"]
        for arrays in _val_arrays(m, fields, rank, world_size, batch_size, cfg.data.skip_corrupt,
                                  (cfg.data.sources[i].name, check, policy)):
            parts: list[dict | None] = [None] * n_src
            parts[i] = arrays
            yield build(parts)
            emitted += 1
            if limit and emitted >= limit:
                break


def _val_arrays(m: Manifest, fields, rank: int, world: int, batch_size: int, skip_corrupt: bool,
                finite: tuple[str, list[str], str] = ("", [], "allow")):
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
            found = nonfinite_rows(data, check, m.layout == "chunk") if check else None
            if found is not None:
                field, bad = found
                if policy != "skip":
                    raise ShardError(nonfinite_message(source, m.shard_url(s), key, field,
                                                       int(np.argmax(bad)), m.layout == "chunk"))
                if bad.all():
                    continue
                data = {k: v[~bad] for k, v in data.items()} if m.layout == "chunk" else data
            pending.append(data)
            rows += len(next(iter(data.values()))) if m.layout == "chunk" else 1
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
