"""TaskSampler: the target probabilities are hit, every rank draws the same, resume is exact."""

from __future__ import annotations

import json
import multiprocessing
import os

import numpy as np
import pytest

from manytask.config import SamplerConfig
from manytask.schema import ConfigError
from manytask.trainer.task_sampler import TaskSampler

SOURCES = ["clicks", "orders", "reviews", "returns"]
SIZES = [100_000, 20_000, 3_000, 200]
STEPS, BATCH = 2000, 32


def expected_probs(cfg: SamplerConfig, step: int, max_steps: int) -> np.ndarray:
    """The strategies written out from their definitions, independently of the sampler."""
    n = np.asarray(SIZES, dtype=np.float64)
    if cfg.strategy == "uniform":
        w = np.ones_like(n)
    elif cfg.strategy == "proportional":
        w = n
    elif cfg.strategy == "temperature":
        w = np.minimum(n, cfg.size_cap) ** (1 / cfg.temperature)
    elif cfg.strategy == "annealed":
        frac = min(step / max_steps, 1.0)
        w = n ** (cfg.alpha_start + (cfg.alpha_end - cfg.alpha_start) * frac)
    else:
        w = np.asarray([cfg.weights[s] for s in SOURCES])
    return w / w.sum()


CONFIGS = {
    "uniform": dict(strategy="uniform"),
    "proportional": dict(strategy="proportional"),
    "temperature": dict(strategy="temperature", temperature=3.0, size_cap=50_000),
    "annealed": dict(strategy="annealed", alpha_start=1.0, alpha_end=0.0),
    "manual": dict(strategy="manual", weights={"clicks": 1.0, "orders": 2.0, "reviews": 0.5, "returns": 0.0}),
}


@pytest.mark.parametrize("mode", ["single", "mixed"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_strategy_hits_target_probabilities(name: str, mode: str) -> None:
    cfg = SamplerConfig(mode=mode, **CONFIGS[name])
    sampler = TaskSampler(SOURCES, SIZES, cfg, seed=7, max_steps=STEPS, batch_size=BATCH)
    target = np.zeros(len(SOURCES))
    for step in range(STEPS):
        p = sampler.probs(step)
        if step % 97 == 0:
            np.testing.assert_allclose(p, expected_probs(cfg, step, STEPS), rtol=1e-12)
        counts = sampler.counts(step)
        assert sum(counts) == BATCH
        if mode == "single":
            assert sorted(counts)[-2:] == [0, BATCH]
        else:  # systematic rounding: each count is floor or ceil of its share
            assert all(np.floor(BATCH * p) <= counts) and all(counts <= np.ceil(BATCH * p))
        target += BATCH * p
    got = np.asarray(sampler.samples) / (BATCH * STEPS)
    want = target / (BATCH * STEPS)
    # single: one Bernoulli draw per step (std <= 0.011 at 2000 steps); mixed: exact up to rounding.
    np.testing.assert_allclose(got, want, atol=0.035 if mode == "single" else 0.002)
    if name == "manual":
        assert sampler.samples[3] == 0  # weight 0: never drawn


def test_annealed_schedule_ends_at_alpha_end_and_holds() -> None:
    cfg = SamplerConfig(strategy="annealed", alpha_start=1.0, alpha_end=0.2)
    sampler = TaskSampler(SOURCES, SIZES, cfg, seed=0, max_steps=100, batch_size=8)
    assert sampler.alpha(0) == 1.0 and sampler.alpha(50) == pytest.approx(0.6)
    assert sampler.alpha(100) == pytest.approx(0.2) and sampler.alpha(10_000) == pytest.approx(0.2)


def test_two_instances_draw_identical_sequences_and_seed_matters() -> None:
    cfg = SamplerConfig(strategy="temperature", mode="single")
    a, b, c = (TaskSampler(SOURCES, SIZES, cfg, seed=s, max_steps=100, batch_size=16) for s in (3, 3, 4))
    seq_a = [a.counts(s) for s in range(200)]
    assert seq_a == [b.counts(s) for s in range(200)]
    assert seq_a != [c.counts(s) for s in range(200)]


def test_state_round_trip_gives_identical_future(tmp_path) -> None:
    import torch

    cfg = SamplerConfig(strategy="annealed", mode="mixed")
    make = lambda: TaskSampler(SOURCES, SIZES, cfg, seed=11, max_steps=300, batch_size=24)  # noqa: E731
    first = make()
    for step in range(150):
        first.counts(step)
    torch.save(first.state_dict(), tmp_path / "sampler.pt")
    resumed = make()
    resumed.load_state_dict(torch.load(tmp_path / "sampler.pt", weights_only=True))
    assert resumed.metrics(150) == first.metrics(150)
    for step in range(150, 300):
        assert resumed.counts(step) == first.counts(step)
    assert resumed.metrics(299) == first.metrics(299)
    first.counts(299)  # a repeated step is not counted twice
    assert sum(first.samples) == 300 * 24


def test_metrics_keys() -> None:
    sampler = TaskSampler(SOURCES, SIZES, SamplerConfig(), seed=0, max_steps=10, batch_size=10)
    sampler.counts(0)
    m = sampler.metrics(0)
    assert set(m) == {f"sampler/{s}/{k}" for s in SOURCES for k in ("prob", "samples")}
    assert sum(m[f"sampler/{s}/samples"] for s in SOURCES) == 10
    assert sum(m[f"sampler/{s}/prob"] for s in SOURCES) == pytest.approx(1.0)


def test_manual_weights_name_the_closest_source() -> None:
    typo = SamplerConfig(strategy="manual", weights={"clicks": 1, "order": 1, "reviews": 1, "returns": 1})
    with pytest.raises(ConfigError, match=r"sampler\.weights\.order.*did you mean 'orders'"):
        TaskSampler(SOURCES, SIZES, typo, seed=0, max_steps=10, batch_size=4)
    missing = SamplerConfig(strategy="manual", weights={"clicks": 1, "orders": 1, "reviews": 1})
    with pytest.raises(ConfigError, match="no weight for source 'returns'"):
        TaskSampler(SOURCES, SIZES, missing, seed=0, max_steps=10, batch_size=4)


def _draw_in_process(path: str) -> None:
    """One fresh process (own PID, own hash seed) writes the draws it computes on its own."""
    draws = {}
    for mode in ("single", "mixed"):
        cfg = SamplerConfig(strategy="temperature", mode=mode)
        sampler = TaskSampler(SOURCES, SIZES, cfg, seed=5, max_steps=100, batch_size=16)
        draws[mode] = [sampler.counts(step) for step in range(300)]
    with open(path, "w") as f:
        json.dump(draws, f)


@pytest.mark.slow
def test_two_processes_draw_the_same_sources(tmp_path) -> None:
    # Plain spawned processes, no collective: the sampler must agree without communicating.
    # (This module imports torch lazily so that the workers start in well under a second.)
    ctx = multiprocessing.get_context("spawn")
    paths = [os.fspath(tmp_path / f"rank{r}.json") for r in range(2)]
    procs = [ctx.Process(target=_draw_in_process, args=(p,)) for p in paths]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=60)
        assert proc.exitcode == 0
    rank0, rank1 = (json.loads(open(p).read()) for p in paths)
    assert rank0 == rank1
    assert len({tuple(c) for c in rank0["single"]}) > 1  # not trivially constant
