"""The recipe's sources checked against their manifests, once per run.

`check_sources(cfg, split)` loads every source's manifest of `split` (train or val), checks the
configured fields and returns `Sources`: the manifests, every input field's spec and every
task's label spec. The result is kept for the process (keyed by the sources' config and the
manifests' file stamps), so the model builder, the sampler, the loader and every evaluation
share one reading of the manifests instead of re-reading them.

`model_inputs`, `source_sizes`, `label_specs`, `task_out_dims`: what the model builder and the
task sampler need, from the manifests only.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

import numpy as np

from manytask.config import Config, SourceConfig
from manytask.data_pipeline.fields import FieldSpec
from manytask.data_pipeline.manifest import Manifest, ManifestError, load_manifest, manifest_path
from manytask.schema import ConfigError


@dataclass
class Sources:
    """The recipe's sources checked against their manifests (one split: train or val)."""

    manifests: list[Manifest | None]  # None: the source has no such split
    inputs: dict[str, FieldSpec]  # every configured input field
    labels: dict[str, FieldSpec]  # task -> label spec, in recipe task order

    @property
    def sizes(self) -> list[int]:
        """Samples per source (0 for a source without this split)."""
        return [m.total_samples if m is not None else 0 for m in self.manifests]


_CACHE: dict[str, Sources] = {}


def check_sources(cfg: Config, split: str = "train") -> Sources:
    """Every source's manifest of `split`, checked against the recipe; raises ConfigError
    naming the source, the manifest and the field. Cached while the manifests are unchanged."""
    key = _cache_key(cfg, split)
    got = _CACHE.get(key)
    if got is None:
        got = _check(cfg, split)
        if len(_CACHE) > 16:
            _CACHE.clear()
        _CACHE[key] = got
    return got


def _cache_key(cfg: Config, split: str) -> str:
    stamps = []
    for src in cfg.data.sources:
        where = getattr(src, split)
        try:
            st = os.stat(manifest_path(where)) if where is not None else None
        except OSError:
            st = None
        stamps.append(None if st is None else (st.st_mtime_ns, st.st_size, st.st_ino))
    return json.dumps([split, [asdict(s) for s in cfg.data.sources], list(cfg.tasks), stamps], default=str)


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


def _check(cfg: Config, split: str) -> Sources:
    manifests = [_load(src, split) for src in cfg.data.sources]
    inputs: dict[str, tuple[FieldSpec, str]] = {}
    labels: dict[str, tuple[FieldSpec, str]] = {}
    for src, m in zip(cfg.data.sources, manifests):
        if m is None:
            continue
        wanted = [("inputs", f) for f in src.inputs] + [(f"labels.{t}", f) for t, f in src.labels.items()]
        for key, fname in wanted:
            if fname not in m.fields:
                raise ConfigError(
                    f"data.sources.{src.name}.{key}: field '{fname}' is not in {m.path} "
                    f"(fields there: {', '.join(m.fields)})"
                )
        for fname in src.inputs:
            _merge(inputs, fname, FieldSpec.of(m.fields[fname]), f"source '{src.name}' ({m.path})", "input field")
        for task, fname in src.labels.items():
            _merge(labels, task, FieldSpec.of(m.fields[fname]), f"source '{src.name}' ({m.path}, field '{fname}')", "labels of task")
    order = {t: i for i, t in enumerate(cfg.tasks)}
    ordered = dict(sorted(labels.items(), key=lambda kv: order.get(kv[0], len(order))))
    return Sources(manifests, {k: v for k, (v, _) in inputs.items()}, {k: v for k, (v, _) in ordered.items()})


def _merge(table: dict, key: str, spec: FieldSpec, where: str, what: str) -> None:
    if key not in table:
        table[key] = (spec, where)
        return
    old, old_where = table[key]
    wider = np.promote_types(old.dtype, spec.dtype)  # (ints promote to float only with uint64)
    if old.vocab and spec.vocab and old.shape == spec.shape and wider.kind in "iu":
        # Id fields are written in the narrowest type of their id space (`shards write`), so
        # sources whose vocabularies differ in size may hold int8 and int16 ids: the batch
        # carries the wider type (the batch builder casts the narrower source's rows).
        old.dtype = wider.name
    elif (old.dtype, old.shape) != (spec.dtype, spec.shape):
        raise ConfigError(
            f"{what} '{key}': {old.dtype} {list(old.shape)} in {old_where} but "
            f"{spec.dtype} {list(spec.shape)} in {where}; sources must agree"
        )
    old.vocab = max(old.vocab, spec.vocab)


def model_inputs(cfg: Config) -> dict[str, FieldSpec]:
    """Every input field of every source: field -> FieldSpec (dtype, per-sample shape, vocab)."""
    return check_sources(cfg).inputs


def source_sizes(cfg: Config) -> list[int]:
    """Training samples per source, in `data.sources` order (for the proportional sampler)."""
    return check_sources(cfg).sizes


def label_specs(cfg: Config) -> dict[str, FieldSpec]:
    """task -> FieldSpec of its label field (dtype, per-sample shape, vocab = classes if known)."""
    return check_sources(cfg).labels


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
