"""Real-data (and study) datasets for the recipes in configs/, written through the shard writer.

| name                    | source                                             | tasks |
| ----------------------- | -------------------------------------------------- | ----- |
| `italy_power`           | UCR ItalyPowerDemand, committed under assets/      | forecast the last H hours + season (binary) |
| `movielens`             | MovieLens-100k inside the `recbole` wheel (PyPI)   | click = rating >= 4 (binary), rating (regression) |
| `yeast`                 | MULAN yeast, committed under assets/               | 14 gene functions (multilabel; per-label fields too) |
| `diamonds`              | ggplot2's diamonds CSV inside the `plotnine` wheel | ideal cut (binary), log price (regression) |
| `synthetic_correlation` | `synthetic.mmoe_pair` at correlations 1, .9, .5, 0 | two regressions, one dataset dir per correlation |
| `multidataset`          | two synthetic sources with different inputs        | each source its own two tasks |

diamonds (53,940 diamonds, string columns cut / color / clarity; ggplot2's data, MIT licence, as
shipped in plotnine 0.15.9, MIT licence) is converted from the raw CSV by the same code as
`manytask shards write` (`DIAMONDS_FEATURES` / `DIAMONDS_TARGETS` are its column specs).

MovieLens may not be redistributed, so it is never committed: `fetch_wheel` runs
`pip download --no-deps recbole==1.2.1` (the only network use, through pip's own index) into
`data/_wheels` and the ratings are read straight out of the wheel. `DATASETS` is the
synthetic registry plus these; `manytask data prepare NAME` looks names up there.
"""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from manytask.data_pipeline import synthetic
from manytask.data_pipeline.manifest import Manifest
from manytask.data_pipeline.shard_writer import write_shards

ASSETS = Path(__file__).resolve().parent / "assets"
WHEEL_CACHE = Path("data/_wheels")
CORRELATIONS = (1.0, 0.9, 0.5, 0.0)


class DownloadError(FileNotFoundError):
    """A package-registry download failed (a FileNotFoundError, so the CLI reports it plainly)."""


def fetch_wheel(name: str, version: str, cache: str | os.PathLike = WHEEL_CACHE) -> Path:
    """The wheel `name==version`, from `cache` or else `pip download --no-deps` into it."""
    cache = Path(cache)
    found = sorted(cache.glob(f"{name}-{version}-*.whl"))
    if found:
        return found[0]
    cache.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-q", f"{name}=={version}", "-d", str(cache)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(cache.glob(f"{name}-{version}-*.whl"))
    if proc.returncode != 0 or not found:
        detail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise DownloadError(f"could not download {name}=={version} with pip: {' / '.join(detail)}")
    return found[0]


def write_train_val(
    out: Path, train: dict[str, np.ndarray], val: dict[str, np.ndarray],
    train_shards: int, chunk_size: int, val_shards: int = 1,
) -> dict[str, Manifest]:
    """`out/train` in `train_shards` shards and `out/val`, chunk layout; integer fields get the
    same vocab (max id + 1 over both splits) in both manifests."""
    vocab = {k: int(max(v.max(), val[k].max())) + 1 for k, v in train.items() if v.dtype.kind == "i"}
    n_train, n_val = len(next(iter(train.values()))), len(next(iter(val.values())))
    return {
        "train": write_shards(out / "train", train, -(-n_train // train_shards), chunk_size,
                              prefix="train", vocab=vocab),
        "val": write_shards(out / "val", val, -(-n_val // val_shards), chunk_size,
                            prefix="val", vocab=vocab),
    }


def _take(arrays: dict[str, np.ndarray], idx: np.ndarray) -> dict[str, np.ndarray]:
    return {k: v[idx] for k, v in arrays.items()}


# ---------------------------------------------------------------- ItalyPowerDemand


def read_ts(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """A univariate, equal-length `.ts` file -> (values `[n, T]` float32, class labels `[n]` str)."""
    rows, labels = [], []
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", "@")):
            continue
        values, label = line.rsplit(":", 1)
        rows.append([float(v) for v in values.split(",")])
        labels.append(label)
    return np.asarray(rows, dtype=np.float32), np.asarray(labels)


def italy_power_arrays(values: np.ndarray, labels: np.ndarray, horizon: int) -> dict[str, np.ndarray]:
    """Days `[n, 24]` -> series `[n, 24-H, 1]` (the input), forecast `[n, H]` (the last H hours),
    season int64 `[n]`: UCR class 1 -> 0, class 2 -> 1 (October-March vs April-September)."""
    if not 0 < horizon < values.shape[1]:
        raise ValueError(f"horizon must be in [1, {values.shape[1] - 1}], got {horizon}")
    cut = values.shape[1] - horizon
    return {
        "series": values[:, :cut, None],
        "forecast": values[:, cut:],
        "season": (labels.astype(np.int64) - 1),
    }


def prepare_italy_power(
    out: str | os.PathLike = "data/italy_power", horizon: int = 4, assets: Path = ASSETS / "italy_power"
) -> dict[str, Manifest]:
    """The official UCR split: TRAIN (67 days) -> `out/train` in 4 shards (so up to 4 ranks x
    workers can read it), TEST (1029 days) -> `out/val`."""
    train = italy_power_arrays(*read_ts(assets / "ItalyPowerDemand_TRAIN.ts"), horizon)
    val = italy_power_arrays(*read_ts(assets / "ItalyPowerDemand_TEST.ts"), horizon)
    return write_train_val(Path(out), train, val, train_shards=4, chunk_size=8)


# ---------------------------------------------------------------- MovieLens-100k


def _atomic(z: zipfile.ZipFile, member: str) -> list[list[str]]:
    """RecBole's atomic file (tab-separated, a `name:type` header) as rows of strings."""
    lines = z.read(member).decode("utf-8", errors="replace").splitlines()
    return [line.split("\t") for line in lines[1:] if line]


def movielens_arrays(wheel: Path) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Every rating of ml-100k as arrays, and its timestamp `[n]`.

    Fields: user_id, item_id, gender, occupation int64 `[n]` (contiguous ids from 0), age
    float32 `[n, 1]` (years / 100), genres float32 `[n, G]` multi-hot, click int64 `[n]`
    (rating >= 4), rating float32 `[n]` (1..5).
    """
    root = "recbole/dataset_example/ml-100k/ml-100k"
    with zipfile.ZipFile(wheel) as z:
        inter, items, users = (_atomic(z, f"{root}.{ext}") for ext in ("inter", "item", "user"))
    user_ids = {row[0]: i for i, row in enumerate(users)}
    item_ids = {row[0]: i for i, row in enumerate(items)}
    genre_names = sorted({g for row in items for g in row[3].split()})
    genres = np.zeros((len(items), len(genre_names)), np.float32)
    for i, row in enumerate(items):
        genres[i, [genre_names.index(g) for g in row[3].split()]] = 1.0
    genders = sorted({row[2] for row in users})
    jobs = sorted({row[3] for row in users})
    u_age = np.array([float(row[1]) / 100 for row in users], np.float32)
    u_gender = np.array([genders.index(row[2]) for row in users], np.int64)
    u_job = np.array([jobs.index(row[3]) for row in users], np.int64)

    user = np.array([user_ids[row[0]] for row in inter], np.int64)
    item = np.array([item_ids[row[1]] for row in inter], np.int64)
    rating = np.array([float(row[2]) for row in inter], np.float32)
    time = np.array([float(row[3]) for row in inter], np.float64)
    arrays = {
        "user_id": user, "item_id": item, "gender": u_gender[user], "occupation": u_job[user],
        "age": u_age[user, None], "genres": genres[item],
        "click": (rating >= 4).astype(np.int64), "rating": rating,
    }
    return arrays, time


def latest_per_user(user: np.ndarray, time: np.ndarray, fraction: float) -> np.ndarray:
    """Boolean `[n]`: each user's latest `fraction` of ratings (at least one), by timestamp.

    A per-user time split asks "what will this user think next" without cold-start users,
    which a global time cut would make most of the validation set (71% on ml-100k)."""
    order = np.lexsort((time, user))  # by user, then time
    sorted_user = user[order]
    starts = np.flatnonzero(np.r_[True, sorted_user[1:] != sorted_user[:-1]])
    counts = np.diff(np.r_[starts, len(user)])
    rank = np.arange(len(user)) - np.repeat(starts, counts)  # 0 = a user's oldest rating
    keep = np.repeat(np.maximum(1, np.round(counts * fraction)).astype(int), counts)
    latest = np.zeros(len(user), bool)
    latest[order] = rank >= np.repeat(counts, counts) - keep
    return latest


def prepare_movielens(
    out: str | os.PathLike = "data/movielens", cache: str | os.PathLike = WHEEL_CACHE,
    val_fraction: float = 0.1, seed: int = 0,
) -> dict[str, Manifest]:
    """ml-100k from the recbole 1.2.1 wheel (downloaded once into `cache`): each user's latest
    `val_fraction` of ratings -> `out/val`, the rest, shuffled, -> `out/train` (8 shards)."""
    arrays, time = movielens_arrays(fetch_wheel("recbole", "1.2.1", cache))
    is_val = latest_per_user(arrays["user_id"], time, val_fraction)
    # Shuffle the training rows once: the stream only shuffles within windows, and rows in
    # user order would give batches of one user.
    train_idx = np.random.default_rng(seed).permutation(np.flatnonzero(~is_val))
    return write_train_val(Path(out), _take(arrays, train_idx), _take(arrays, np.flatnonzero(is_val)),
                           train_shards=8, chunk_size=1024)


# ---------------------------------------------------------------- yeast


def yeast_arrays(path: Path = ASSETS / "yeast" / "yeast.csv.gz") -> tuple[np.ndarray, np.ndarray]:
    """(features `[2417, 103]` float32, labels `[2417, 14]` int64 0/1) from the committed csv."""
    with gzip.open(path, "rt") as f:
        header = f.readline().strip().split(",")
        table = np.loadtxt(f, delimiter=",", dtype=np.float64)
    n_labels = sum(name.startswith("Class") for name in header)
    return table[:, :-n_labels].astype(np.float32), table[:, -n_labels:].astype(np.int64)


def prepare_yeast(
    out: str | os.PathLike = "data/yeast", n_train: int = 1500, seed: int = 0
) -> dict[str, Manifest]:
    """A seeded random split of the MULAN sizes (1500 train, 917 val). Fields: x float32
    `[103]` standardised with the training mean/std, labels int64 `[14]`, and each label alone
    as label_00..label_13 int64 `[]` (for per-label binary tasks and single-task baselines)."""
    x, y = yeast_arrays()
    idx = np.random.default_rng(seed).permutation(len(x))
    tr, va = idx[:n_train], idx[n_train:]
    mean, std = x[tr].mean(0), x[tr].std(0) + 1e-6
    arrays = {"x": ((x - mean) / std).astype(np.float32), "labels": y}
    arrays.update({f"label_{j:02d}": y[:, j] for j in range(y.shape[1])})
    return write_train_val(Path(out), _take(arrays, tr), _take(arrays, va), train_shards=4, chunk_size=64)


# ---------------------------------------------------------------- diamonds (a raw table)

DIAMONDS_WHEEL = ("plotnine", "0.15.9")
DIAMONDS_CSV = "plotnine/data/diamonds.csv"
# The column specs of `manytask shards write` (see data_pipeline/preprocess.py): string columns
# color / clarity get vocabularies from the training split, numbers are standardised; cut is
# the label of the binary task (Ideal or not), log1p(price) the regression target.
DIAMONDS_FEATURES = ["carat:num", "color:cat", "clarity:cat", "depth:num", "table:num",
                     "x:num", "y:num", "z:num"]
DIAMONDS_TARGETS = ["ideal=cut:eq=Ideal", "log_price=price:num:log"]


def diamonds_csv(cache: str | os.PathLike = WHEEL_CACHE) -> Path:
    """The raw diamonds.csv, extracted from the plotnine wheel (downloaded once into `cache`)."""
    wheel = fetch_wheel(*DIAMONDS_WHEEL, cache)
    target = Path(cache) / "diamonds.csv"
    if not target.exists():
        with zipfile.ZipFile(wheel) as z:
            tmp = target.with_suffix(".tmp")
            tmp.write_bytes(z.read(DIAMONDS_CSV))
            os.replace(tmp, target)
    return target


def prepare_diamonds(
    out: str | os.PathLike = "data/diamonds", cache: str | os.PathLike = WHEEL_CACHE, seed: int = 0
) -> dict[str, Manifest]:
    """diamonds.csv -> `out/train` (90 %, 8 shards) and `out/val` (10 %), as
    `manytask shards write diamonds.csv OUT --features ... --targets ...` would write them."""
    from manytask.data_pipeline.table_to_shards import convert_table

    return convert_table(diamonds_csv(cache), out, DIAMONDS_FEATURES, DIAMONDS_TARGETS,
                         samples_per_shard=6_100, chunk_size=256, val_fraction=0.1, seed=seed,
                         force=True)


# ---------------------------------------------------------------- synthetic studies


def prepare_synthetic_correlation(
    out: str | os.PathLike = "data/synthetic_correlation", n_train: int = 20_000, n_val: int = 4_000,
    dim: int = 100, seed: int = 0,
) -> dict[str, Manifest]:
    """The MMoE paper's study data: `out/corr_<c>/{train,val}` for c in CORRELATIONS, the same
    seed (inputs, sinusoids, task A) at every correlation so only the task relation changes."""
    manifests = {}
    for c in CORRELATIONS:
        arrays = synthetic.mmoe_pair(n_train + n_val, dim=dim, correlation=c, seed=seed)
        split = write_train_val(Path(out) / f"corr_{c}", _take(arrays, np.arange(n_train)),
                                _take(arrays, np.arange(n_train, n_train + n_val)),
                                train_shards=4, chunk_size=1024)
        manifests.update({f"corr_{c}/{k}": m for k, m in split.items()})
    return manifests


def multidataset_arrays(n: int, dim: int, seed: int, prefix: str) -> dict[str, np.ndarray]:
    """One synthetic source: input `x_<prefix>` `[dim]`, `<prefix>_value` regression and
    `<prefix>_click` binary (from an MMoE pair), `<prefix>_band` int64 quartile of the value."""
    pair = synthetic.mmoe_pair(n, dim=dim, correlation=0.5, seed=seed)
    band = np.searchsorted(np.quantile(pair["y_a"], [0.25, 0.5, 0.75]), pair["y_a"]).astype(np.int64)
    return {f"x_{prefix}": pair["x"], f"{prefix}_value": pair["y_b"], f"{prefix}_click": pair["click"],
            f"{prefix}_band": band}


def prepare_multidataset(
    out: str | os.PathLike = "data/multidataset", n_wide: int = 20_000, n_narrow: int = 8_000,
    seed: int = 0,
) -> dict[str, Manifest]:
    """Two sources with different inputs and sizes, for task conditioning: `out/wide` (x_wide
    `[32]`, tasks wide_value + wide_click) and `out/narrow` (x_narrow `[12]`, tasks
    narrow_value + narrow_band); each `{train,val}` with a 10% validation split."""
    manifests = {}
    for name, n, dim, s in (("wide", n_wide, 32, seed + 1), ("narrow", n_narrow, 12, seed + 2)):
        arrays = multidataset_arrays(n + n // 10, dim, s, name)
        split = write_train_val(Path(out) / name, _take(arrays, np.arange(n)),
                                _take(arrays, np.arange(n, n + n // 10)), train_shards=4, chunk_size=512)
        manifests.update({f"{name}/{k}": m for k, m in split.items()})
    return manifests


DATASETS: dict[str, Callable[..., dict[str, Manifest]]] = {
    **synthetic.DATASETS,
    "italy_power": prepare_italy_power,
    "movielens": prepare_movielens,
    "yeast": prepare_yeast,
    "diamonds": prepare_diamonds,
    "synthetic_correlation": prepare_synthetic_correlation,
    "multidataset": prepare_multidataset,
}
