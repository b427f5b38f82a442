"""Synthetic datasets with known structure, written through the normal shard writer.

- `mmoe_pair`: the MMoE paper's (Ma et al., KDD 2018) regression pair whose task correlation
  is controlled: unit vectors u1 ⟂ u2, w1 = c·u1, w2 = c·(p·u1 + sqrt(1-p²)·u2);
  y_i = w_i·x + Σ_k sin(α_k·w_i·x + β_k) + ε, x ~ N(0, I_d), m = 10 sinusoids shared by both
  tasks. Fields: x float32 [d], y_a / y_b float32 [], click int64 [] = (y_a > median).
- `timeseries`: multi-channel series from K regimes (sine, square, sawtooth, damped chirp)
  with random frequency, phase and amplitude. Fields: series float32 [T, C], forecast
  float32 [H] (next H steps of channel 0), label int64 [] (the regime; vocab K).

`prepare_skewed_mix(out)` writes one large and three small sources (configs/skewed_mix.yaml).
`prepare_demo(out)` writes train/ and val/ for configs/demo.yaml; `DATASETS` maps the names
`manytask data prepare <name>` accepts to their prepare functions.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from manytask.data_pipeline.manifest import Manifest
from manytask.data_pipeline.shard_writer import write_shards


def mmoe_pair(
    n: int, dim: int = 100, correlation: float = 0.5, seed: int = 0, scale: float = 1.0,
    sinusoids: int = 10, noise: float = 0.1, data_seed: int | None = None,
) -> dict[str, np.ndarray]:
    """n samples of the MMoE synthetic pair with task correlation `correlation` in [-1, 1].

    The task weights and sinusoids come from `seed`; the inputs and noise from `data_seed`
    (default seed + 1), so train and val drawn with different data seeds share one task.
    """
    if not -1.0 <= correlation <= 1.0:
        raise ValueError(f"correlation must be in [-1, 1], got {correlation}")
    rng = np.random.default_rng(seed)
    # Two orthogonal unit vectors (Gram-Schmidt on Gaussian draws).
    u1 = rng.standard_normal(dim)
    u1 /= np.linalg.norm(u1)
    u2 = rng.standard_normal(dim)
    u2 -= u2 @ u1 * u1
    u2 /= np.linalg.norm(u2)
    w1 = scale * u1
    w2 = scale * (correlation * u1 + np.sqrt(1.0 - correlation**2) * u2)
    alpha = rng.standard_normal(sinusoids)
    beta = rng.standard_normal(sinusoids)
    data = np.random.default_rng(seed + 1 if data_seed is None else data_seed)
    x = data.standard_normal((n, dim))

    def target(w: np.ndarray) -> np.ndarray:
        z = x @ w
        return z + np.sin(np.outer(z, alpha) + beta).sum(1) + noise * data.standard_normal(n)

    y_a, y_b = target(w1), target(w2)
    click = (y_a > np.median(y_a)).astype(np.int64)
    f32 = np.float32
    return {"x": x.astype(f32), "y_a": y_a.astype(f32), "y_b": y_b.astype(f32), "click": click}


def timeseries(
    n: int, length: int = 64, channels: int = 3, horizon: int = 8, classes: int = 4, seed: int = 0
) -> dict[str, np.ndarray]:
    """n multi-channel series [length, channels], the next `horizon` values of channel 0 and
    the regime label in [0, classes) (regimes cycle through 4 waveform shapes)."""
    rng = np.random.default_rng(seed)
    label = rng.integers(0, classes, n)
    t = np.arange(length + horizon, dtype=np.float64)[None, :, None]  # [1, T+H, 1]
    freq = (0.02 + 0.03 * (label % 4) + 0.01 * (label // 4))[:, None, None] * rng.uniform(0.8, 1.2, (n, 1, 1))
    phase = rng.uniform(0, 2 * np.pi, (n, 1, channels))  # each channel its own phase
    amp = rng.uniform(0.5, 2.0, (n, 1, 1))
    arg = 2 * np.pi * freq * t + phase  # [n, T+H, C]
    shape = (label % 4)[:, None, None]
    wave = np.where(
        shape == 0, np.sin(arg),
        np.where(shape == 1, np.sign(np.sin(arg)),
                 np.where(shape == 2, 2 * ((arg / (2 * np.pi)) % 1.0) - 1, np.exp(-t / 40) * np.sin(arg * (1 + t / 60)))),
    )
    series = amp * wave + 0.1 * rng.standard_normal(wave.shape)
    f32 = np.float32
    return {
        "series": series[:, :length].astype(f32),
        "forecast": series[:, length:, 0].astype(f32),
        "label": label.astype(np.int64),
    }


def _write_split(
    out: Path, arrays: dict[str, np.ndarray], n_train: int, shards: int, chunk: int
) -> dict[str, Manifest]:
    train = {k: v[:n_train] for k, v in arrays.items()}
    val = {k: v[n_train:] for k, v in arrays.items()}
    per_shard = -(-n_train // shards)
    vocab = {k: int(v.max()) + 1 for k, v in arrays.items() if v.dtype.kind == "i"}
    n_val = len(next(iter(val.values())))
    return {
        "train": write_shards(out / "train", train, per_shard, chunk, prefix="train", vocab=vocab),
        "val": write_shards(out / "val", val, max(n_val, 1), chunk, prefix="val", vocab=vocab),
    }


def prepare_demo(
    out: str | os.PathLike = "data/demo", n_train: int = 40_000, n_val: int = 4_000,
    shards: int = 8, chunk_size: int = 1024, correlation: float = 0.5, seed: int = 0,
) -> dict[str, Manifest]:
    """The demo recipe's data: `out/train` (8 shards) and `out/val` (1 shard), chunk layout."""
    arrays = mmoe_pair(n_train + n_val, correlation=correlation, seed=seed)
    return _write_split(Path(out), arrays, n_train, shards, chunk_size)


def prepare_demo_few_click(
    out: str | os.PathLike = "data/demo_few_click", n_train: int = 40_000, n_val: int = 4_000,
    shards: int = 8, chunk_size: int = 1024, label_fraction: float = 0.05, seed: int = 0,
) -> dict[str, Manifest]:
    """The demo's samples with `click` labelled on `label_fraction` of the training samples
    only (-1 = no label; validation keeps every label): the "add a task with few labels"
    example (configs/demo_add_click.yaml)."""
    arrays = mmoe_pair(n_train + n_val, correlation=0.5, seed=seed)
    hide = np.random.default_rng(seed + 1).random(n_train) >= label_fraction
    arrays["click"][:n_train][hide] = -1
    return _write_split(Path(out), arrays, n_train, shards, chunk_size)


def prepare_timeseries(
    out: str | os.PathLike = "data/timeseries", n_train: int = 20_000, n_val: int = 2_000,
    shards: int = 8, chunk_size: int = 512, seed: int = 0,
) -> dict[str, Manifest]:
    """Multi-channel series with a forecast target and a regime class: `out/train`, `out/val`."""
    arrays = timeseries(n_train + n_val, seed=seed)
    return _write_split(Path(out), arrays, n_train, shards, chunk_size)


# source -> training samples of the skewed mix: one large source, three small ones (80:4:2:1)
SKEWED_MIX = {"large": 40_000, "small_a": 2_000, "small_b": 1_000, "small_c": 500}


def prepare_skewed_mix(
    out: str | os.PathLike = "data/skewed_mix", sizes: dict[str, int] | None = None, n_val: int = 2_000,
    dim: int = 32, seed: int = 0,
) -> dict[str, Manifest]:
    """One large source and several small ones, for comparing task-mixing strategies
    (configs/skewed_mix.yaml): `out/<source>/{train,val}`, every source with input `x` `[dim]`
    and its own MMoE pair (its own task weights; fields y_a, y_b, click), so each source's
    tasks are related to but not the same as the others'. Validation: `n_val` samples per
    source whatever its training size, so every task is measured equally well."""
    manifests = {}
    for i, (name, n) in enumerate((sizes or SKEWED_MIX).items()):
        arrays = mmoe_pair(n + n_val, dim=dim, correlation=0.5, seed=seed + 10 * i)
        split = _write_split(Path(out) / name, arrays, n, shards=max(1, min(4, n // 500)), chunk=256)
        manifests.update({f"{name}/{k}": m for k, m in split.items()})
    return manifests


DATASETS: dict[str, Callable[..., dict[str, Manifest]]] = {
    "demo": prepare_demo,
    "skewed_mix": prepare_skewed_mix,
    "demo_few_click": prepare_demo_few_click,
    "timeseries": prepare_timeseries,
}
