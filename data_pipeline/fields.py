"""The data contract between shards and models: what one field of a sample is."""

from __future__ import annotations

from dataclasses import dataclass

from manytask.data_pipeline.manifest import FieldInfo


@dataclass
class FieldSpec:
    """An input field as recorded in the sources' manifests (per-sample shape, no batch dim)."""

    dtype: str  # numpy dtype name: float32, int64, ...
    shape: tuple[int, ...]
    vocab: int = 0  # categorical fields: number of ids (max id + 1) when known, else 0
    pad: int = -1  # multi-valued id fields [k]: the padding id pooling skips (-1 = none)

    @classmethod
    def of(cls, info: FieldInfo) -> FieldSpec:
        """The spec of a manifest field."""
        return cls(info.dtype, tuple(info.shape), info.vocab, info.pad)
