"""`manytask data prepare NAME`: write the shards a recipe reads (synthetic data is generated
locally; real data comes from committed assets or, for MovieLens, a wheel from the package index)."""

from __future__ import annotations

from pathlib import Path

from manytask.data_pipeline.real_data import DATASETS  # the synthetic registry + real data
from manytask.schema import closest


def prepare(name: str, out: str | None = None, force: bool = False) -> Path:
    """Write dataset `name` to `out` (default `data/<name>`); skips work when already there."""
    if name not in DATASETS:
        near = closest(name, DATASETS)
        fix = f"; did you mean '{near}'?" if near else ""
        raise ValueError(f"unknown dataset '{name}'{fix} (available: {', '.join(sorted(DATASETS))})")
    target = Path(out or f"data/{name}")
    marker = target / ".prepared"
    if marker.exists() and not force:
        print(f"{target}: already prepared (--force to rewrite)")
        return target
    manifests = DATASETS[name](target)
    for split, manifest in manifests.items():
        print(f"{target / split}: {manifest.total_samples} samples in {len(manifest.shards)} shards "
              f"({manifest.layout} layout)")
    marker.write_text(name + "\n")  # written last: an interrupted prepare is redone
    return target
