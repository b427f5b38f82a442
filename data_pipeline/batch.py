"""The one batch structure every model, loss and weighting speaks, and how it is built."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from manytask.data_pipeline.fields import FieldSpec
from manytask.data_pipeline.manifest import sample_bytes

if TYPE_CHECKING:
    from manytask.config import Config
    from manytask.data_pipeline.sources import Sources

# (block, lo, hi): rows lo..hi-1 of a block's arrays (a `stream.Block`: `data`, `at`, `rows`).
Piece = tuple[Any, int, int]
# Up to this many spans a batch is joined from slices; beyond, gathered by index (see gather_spans).
FEW_SPANS = 4


@dataclass
class Spans:
    """A batch's rows as spans of blocks, in batch order (sources in recipe order): span k is
    rows lo[k]..lo[k]+n[k]-1 of blocks[k], a block of source source[k]; rows[k]: where each
    gatherable output's rows of that block start in the pool's row views (-1: copy them)."""

    source: np.ndarray  # [spans] int64
    lo: np.ndarray  # [spans] int64
    n: np.ndarray  # [spans] int64
    rows: np.ndarray  # [spans, gatherable outputs] int64
    blocks: list[Any]


@dataclass
class Batch:
    """A training or validation batch of B samples, possibly from several sources.

    inputs:    field name -> tensor [B, ...]; a field a sample's source lacks is zero-filled.
    labels:    task name -> tensor [B, ...]; zero where the task is masked.
    masks:     task name -> bool tensor [B]; True where the sample carries that task's label.
    source_id: long tensor [B]; index of the sample's source in `data.sources` (also the
               task descriptor used by task-conditioned models).
    Every task of the recipe is present in `labels` and `masks` on every rank, even when no
    sample of the batch carries it (mask all False), so all ranks build the same graph.
    """

    inputs: dict[str, torch.Tensor]
    labels: dict[str, torch.Tensor]
    masks: dict[str, torch.Tensor]
    source_id: torch.Tensor

    def __len__(self) -> int:
        return int(self.source_id.shape[0])

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        if self.source_id.device == torch.device(device):
            return self  # already there (CPU training): skip rebuilding four dicts every step
        move = lambda d: {k: v.to(device, non_blocking=non_blocking) for k, v in d.items()}  # noqa: E731
        return Batch(
            inputs=move(self.inputs),
            labels=move(self.labels),
            masks=move(self.masks),
            source_id=self.source_id.to(device, non_blocking=non_blocking),
        )

    def pin_memory(self) -> Batch:
        pin = lambda d: {k: v.pin_memory() for k, v in d.items()}  # noqa: E731
        return Batch(pin(self.inputs), pin(self.labels), pin(self.masks), self.source_id.pin_memory())


class BatchBuilder:
    """Builds a Batch from per-source parts (field -> array [n_i, ...]), sources in recipe order.

    A field a source lacks is zero-filled; a task a source does not label is masked, and so is
    a label holding NaN (float, any element) or a negative value (int), with the label zeroed.
    """

    def __init__(self, cfg: Config, sources: Sources):
        self.inputs = sources.inputs
        self.labels = {t: sources.labels[t] for t in cfg.tasks}
        self.src_inputs = [set(s.inputs) for s in cfg.data.sources]
        self.src_labels = [dict(s.labels) for s in cfg.data.sources]
        self.src_fields = [list(dict.fromkeys([*s.inputs, *s.labels.values()])) for s in cfg.data.sources]
        # per output (input field or task): each source's field for it, or None
        self.input_of = {f: [f if f in s.inputs else None for s in cfg.data.sources] for f in self.inputs}
        self.label_of = {t: [s.labels.get(t) for s in cfg.data.sources] for t in self.labels}
        self.labelled = {t: np.array([f is not None for f in fs], bool) for t, fs in self.label_of.items()}
        self.pin = torch.cuda.is_available()
        # Outputs every source holds with the recipe's dtype and shape: `gather_spans` takes
        # their rows from a worker pool's buffer in one call.
        self.specs = {**self.inputs, **self.labels}
        self.field_of = {**self.input_of, **self.label_of}
        self.gatherable = [
            name for name, spec in self.specs.items()
            if all(m is not None and f is not None and f in m.fields
                   and np.dtype(m.fields[f].dtype) == np.dtype(spec.dtype)
                   and tuple(m.fields[f].shape) == tuple(spec.shape)
                   for m, f in zip(sources.manifests, self.field_of[name]))
        ]
        self.all_gatherable = len(self.gatherable) == len(self.specs)
        # Per source, per gatherable output: (its field, dtype, shape, row bytes), for block_rows.
        self._row_layout = [
            [(self.field_of[name][i], np.dtype(self.specs[name].dtype), tuple(self.specs[name].shape),
              sample_bytes(self.specs[name]))
             for name in self.gatherable]
            for i in range(len(sources.manifests))
        ]
        self._views: tuple[Any, dict] = (None, {})

    def fields(self, i: int) -> list[str]:
        """The fields source i's batches need (its inputs and label fields)."""
        return self.src_fields[i]

    def __call__(self, parts: list[dict[str, np.ndarray] | None], rows: list[int] | None = None) -> Batch:
        """parts[i]: field -> array [n_i, ...] of source i, or None; rows: the n_i if known.
        The arrays are copied (they may be views of a worker's shared memory)."""
        if rows is None:
            rows = [_rows(p) if p is not None else 0 for p in parts]
        present = [(i, p, n) for i, (p, n) in enumerate(zip(parts, rows)) if n > 0]
        stack = lambda name, spec, field_of: _stack(spec, present, sum(rows), field_of)  # noqa: E731
        return self._assemble([i for i, _, n in present], [n for _, _, n in present], stack)

    def gather(self, pieces: list[list[Piece]], counts: list[int], pool: Any = None) -> Batch:
        """The Batch of counts[i] rows of source i, given as pieces (block, lo, hi): rows
        lo..hi-1 of a block's arrays, in order. With a worker `pool` whose buffer holds the
        blocks (see worker_pool) and every output gatherable, see `gather_spans`; otherwise
        the pieces are joined field by field."""
        flat = [(i, p) for i, n in enumerate(counts) if n > 0 for p in pieces[i]]
        if pool is not None and self.all_gatherable:
            spans = Spans(
                np.array([i for i, _ in flat], np.int64),
                np.array([lo for _, (_, lo, _) in flat], np.int64),
                np.array([hi - lo for _, (_, lo, hi) in flat], np.int64),
                np.array([self.block_rows(i, b) for i, (b, _, _) in flat], np.int64).reshape(len(flat), -1),
                [b for _, (b, _, _) in flat],
            )
            return self.gather_spans(spans, counts, pool)
        present = [i for i, n in enumerate(counts) if n > 0]

        def stack(name: str, spec: FieldSpec, field_of: list[str | None]) -> torch.Tensor:
            out = _empty(spec, sum(counts))
            arrays = [
                block.data[f][lo:hi] if (f := field_of[i]) is not None else np.zeros((hi - lo, *spec.shape), spec.dtype)
                for i, (block, lo, hi) in flat
            ]
            if arrays:
                np.concatenate(arrays, out=out.numpy(), casting="same_kind")
            return out

        return self._assemble(present, [counts[i] for i in present], stack)

    def gather_spans(self, spans: Spans, counts: list[int], pool: Any) -> Batch:
        """The Batch whose rows are `spans` in order (their sources in recipe order, counts[i]
        rows of source i), each output taken by one `np.take` from the pool's row view of its
        kind, whatever the number of sources; spans not in the buffer (rows -1) are copied.
        A few spans are joined as slices instead (cheaper than building an index)."""
        n = spans.n
        if len(n) <= FEW_SPANS:
            pieces: list[list[Piece]] = [[] for _ in counts]
            for i, lo, k, block in zip(spans.source.tolist(), spans.lo.tolist(), n.tolist(), spans.blocks):
                pieces[i].append((block, lo, lo + k))
            return self.gather(pieces, [int(k) for k in counts])
        start = np.cumsum(n) - n  # each span's first row in the batch
        first = spans.lo - start
        total = int(start[-1] + n[-1])
        # Each output's row in its view, for every row of the batch: [outputs, total].
        index = np.repeat(spans.rows.T + first, n, axis=1)
        index += np.arange(total, dtype=np.int64)
        copied = (spans.rows[:, 0] < 0).nonzero()[0].tolist()
        views = self._views_of(pool)

        def stack(name: str, spec: FieldSpec, field_of: list[str | None]) -> torch.Tensor:
            out = _empty(spec, total)
            j, view = views[name]
            view.take(index[j], axis=0, out=out.numpy(), mode="clip")
            for k in copied:  # a piece copied out of the buffer, or a block not laid out for this
                at, lo, rows = int(start[k]), int(spans.lo[k]), int(n[k])
                out.numpy()[at : at + rows] = spans.blocks[k].data[field_of[int(spans.source[k])]][lo : lo + rows]
            return out

        c = np.asarray(counts, np.int64)
        present = c.nonzero()[0]
        return self._assemble(present, c[present], stack)

    def _views_of(self, pool: Any) -> dict[str, tuple[int, np.ndarray]]:
        """Per gatherable output: (its column in Spans.rows, the pool's row view of its kind)."""
        if self._views[0] is not pool:
            self._views = (pool, {name: (j, pool.rows(self.specs[name].dtype, self.specs[name].shape))
                                  for j, name in enumerate(self.gatherable)})
        return self._views[1]

    def block_rows(self, source: int, block: Any) -> tuple[int, ...]:
        """Where each gatherable output's rows of `block` (of source `source`) start in the
        pool's row view of its kind (cached on the block); all -1 when the block is not in the
        shared buffer or not laid out for it (then its rows are copied)."""
        rows = block.rows
        if rows is None:
            rows = []
            for f, dtype, shape, row in self._row_layout[source]:
                at, arr = block.at.get(f), block.data.get(f)
                if at is None or arr is None or at % row or arr.dtype != dtype or arr.shape[1:] != shape:
                    rows = [-1] * len(self.gatherable)
                    break
                rows.append(at // row)
            rows = block.rows = tuple(rows)
        return rows

    def _assemble(self, present: Any, sizes: Any, stack: Any) -> Batch:
        """The Batch, given the present sources (recipe order), their row counts, and
        stack(name, spec, field_of) -> tensor [total, ...] of one input field or label."""
        total = int(np.sum(sizes))
        ids = torch.empty(total, dtype=torch.long)
        source_of_row = ids.numpy()
        if len(present):
            source_of_row[:] = np.repeat(np.asarray(present, np.int64), sizes)
        inputs = {name: stack(name, spec, self.input_of[name]) for name, spec in self.inputs.items()}
        labels, masks = {}, {}
        for task, spec in self.labels.items():
            y = stack(task, spec, self.label_of[task])
            has = self.labelled[task][source_of_row]
            labels[task], masks[task] = y, torch.from_numpy(_clean_label(y.numpy(), has))
        batch = Batch(inputs, labels, masks, ids)
        return batch.pin_memory() if self.pin else batch


def _rows(part: dict[str, Any]) -> int:
    return int(next(iter(part.values())).shape[0]) if part else 0


def _empty(spec: FieldSpec, total: int) -> torch.Tensor:
    """A fresh tensor [total, ...] for one field. Always a fresh torch allocation, never a view
    into a block: a view's offset (and so its alignment) depends on where a resumed stream's
    first block starts, which changes SIMD reduction order and the last bit of a loss."""
    dtype = _TORCH_DTYPES.get(spec.dtype)
    if dtype is None:
        dtype = _TORCH_DTYPES[spec.dtype] = torch.from_numpy(np.empty(0, spec.dtype)).dtype
    return torch.empty((total, *spec.shape), dtype=dtype)


_TORCH_DTYPES: dict[Any, torch.dtype] = {}  # numpy dtype (as a FieldSpec holds it) -> torch dtype


def _stack(spec: FieldSpec, present: list, total: int, field_of: list[str | None]) -> torch.Tensor:
    """One fresh tensor [total, ...] from the present sources' fields (`field_of[source]`;
    zeros where None)."""
    out = _empty(spec, total)
    pieces = [p[f] if (f := field_of[i]) is not None else np.zeros((n, *spec.shape), spec.dtype) for i, p, n in present]
    if pieces:
        np.concatenate(pieces, out=out.numpy(), casting="same_kind")
    return out


def _clean_label(y: np.ndarray, has: np.ndarray) -> np.ndarray:
    """Mask [n] of usable labels (the source labels the task, no NaN float, no negative int);
    `y` is zeroed in place where the mask is False."""
    if y.dtype == np.bool_:
        bad = np.zeros(len(y), dtype=bool)
    else:
        bad = np.isnan(y) if y.dtype.kind == "f" else y < 0
        if y.ndim > 1:
            bad = bad.reshape(len(y), -1).any(1)
    mask = has & ~bad
    if not mask.all():
        y[~mask] = 0
    return mask
