"""Adaptive and scheduled task mixing: schedules interpolate as written, floors and ceilings
hold, the adaptive strategies follow the losses, bad recipes name the key, state is exact."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from manytask.config import SamplerConfig, SchedulePoint
from manytask.schema import ConfigError, load_dataclass
from manytask.trainer.loss_signals import project_to_bounds
from manytask.trainer.task_sampler import TaskSampler

SOURCES = ["big", "mid", "small"]
SIZES = [90_000, 9_000, 1_000]
LABELS = {"big": ["ctr"], "mid": ["cvr", "dwell"], "small": ["rating"]}


def sampler(**options) -> TaskSampler:
    return TaskSampler(SOURCES, SIZES, SamplerConfig(**options), seed=3, max_steps=1000, batch_size=64,
                       source_tasks=LABELS)


def sampler_config(data: dict) -> SamplerConfig:
    cfg = load_dataclass(SamplerConfig, data, file="recipe.yaml", prefix="sampler")
    cfg.check_sources(SOURCES, "recipe.yaml")
    return cfg


def test_schedule_interpolates_linearly_between_points_and_holds_outside() -> None:
    warm = {"big": 1.0, "mid": 1.0, "small": 2.0}
    s = sampler(strategy="schedule", schedule=[SchedulePoint(100, weights=warm),
                                               SchedulePoint(300, strategy="proportional")])
    w = np.array([0.25, 0.25, 0.5])
    prop = np.array(SIZES, dtype=float) / sum(SIZES)
    np.testing.assert_array_equal(s.probs(0), w)  # before the first point: the first mixture
    np.testing.assert_array_equal(s.probs(100), w)
    np.testing.assert_allclose(s.probs(150), 0.75 * w + 0.25 * prop, rtol=1e-15)
    np.testing.assert_allclose(s.probs(200), 0.5 * w + 0.5 * prop, rtol=1e-15)
    np.testing.assert_allclose(s.probs(300), prop, rtol=1e-15)
    np.testing.assert_allclose(s.probs(5000), prop, rtol=1e-15)


def test_schedule_hold_keeps_each_mixture_until_the_next_point() -> None:
    s = sampler(strategy="schedule", interpolate="hold",
                schedule=[SchedulePoint(0, strategy="uniform"), SchedulePoint(50, weights={"small": 1.0})])
    np.testing.assert_allclose(s.probs(49), [1 / 3] * 3)
    np.testing.assert_array_equal(s.probs(50), [0.0, 0.0, 1.0])  # an unnamed source gets 0
    assert s.counts(60) == [0, 0, 64]


@pytest.mark.parametrize(
    "data, match",
    [
        ({"strategy": "schedule", "schedule": [{"step": 10, "weights": {"big": 1}}, {"step": 10, "strategy": "uniform"}]},
         r"'sampler\.schedule\.1\.step' in recipe\.yaml: expected steps increasing.*got 10"),
        ({"strategy": "schedule", "schedule": [{"step": 0, "weights": {"smal": 1}}]},
         r"'sampler\.schedule\.0\.weights\.smal' in recipe\.yaml: unknown source; did you mean 'small'"),
        ({"strategy": "schedule", "schedule": [{"step": 0, "strategy": "los_ratio"}]},
         r"'sampler\.schedule\.0\.strategy'.*did you mean 'loss_ratio'.*got 'los_ratio'"),
        ({"strategy": "schedule", "schedule": [{"step": 0}]}, r"'sampler\.schedule\.0'.*not neither"),
        ({"strategy": "schedule"}, r"strategy 'schedule' and a non-empty sampler\.schedule"),
        ({"schedule": [{"step": 0, "strategy": "uniform"}]}, r"got strategy 'proportional' and 1 schedule points"),
        ({"min_prob": 0.4}, r"'sampler\.min_prob' in recipe\.yaml: expected floors summing to at most 1.*got 0\.4"),
        ({"max_prob": {"big": 0.2, "mid": 0.2, "small": 0.2}}, r"'sampler\.max_prob'.*ceilings summing to at least 1"),
        ({"min_prob": {"tiny": 0.1}}, r"'sampler\.min_prob\.tiny'.*unknown source"),
        ({"max_prob": 1.5}, r"'sampler\.max_prob' in recipe\.yaml: expected a probability in \[0, 1\], got 1\.5"),
        ({"ema": 1.0}, r"'sampler\.ema'.*got 1\.0"),
        ({"update_every": 0}, r"'sampler\.update_every'.*got 0"),
    ],
)
def test_bad_sampler_recipes_name_the_key_and_value(data: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        sampler_config(data)


def test_floors_and_ceilings_hold_and_keep_the_other_ratios() -> None:
    s = sampler(strategy="proportional", min_prob={"small": 0.1, "mid": 0.05}, max_prob={"big": 0.8})
    p = s.probs(0)
    assert p.sum() == pytest.approx(1.0, abs=1e-15)
    np.testing.assert_allclose(p, [0.8, 0.1, 0.1], rtol=1e-12)  # big capped, small floored, mid scaled up
    # a projection that touches no bound leaves the mixture alone
    q = np.array([0.5, 0.3, 0.2])
    np.testing.assert_array_equal(project_to_bounds(q, np.full(3, 0.1), np.full(3, 0.6)), q)
    # free sources keep their ratio to each other
    rng = np.random.default_rng(0)
    for _ in range(200):
        p = rng.dirichlet(np.full(5, 0.3))
        lo, hi = np.full(5, 0.05), np.full(5, 0.5)
        q = project_to_bounds(p, lo, hi)
        assert q.sum() == pytest.approx(1.0, abs=1e-12)
        assert (q >= lo - 1e-12).all() and (q <= hi + 1e-12).all()
        free = (q > lo + 1e-9) & (q < hi - 1e-9)
        if free.sum() >= 2:
            ratio = q[free] / p[free]
            np.testing.assert_allclose(ratio, ratio[0], rtol=1e-9)


def losses_at(step: int) -> dict[str, float]:
    """ctr plateaus at once; cvr and dwell keep falling; rating falls slowly; dwell is
    missing (NaN) on odd steps, as when no rank drew a sample labelled with it."""
    return {"ctr": 0.5, "cvr": 1.0 / (1 + 0.05 * step), "dwell": math.nan if step % 2 else 2.0 / (1 + 0.05 * step),
            "rating": 1.0 / (1 + 0.005 * step)}


def test_loss_ratio_gives_more_to_sources_whose_tasks_improved_least() -> None:
    s = sampler(strategy="loss_ratio", update_every=10, ema=0.5, min_prob=0.05)
    np.testing.assert_allclose(s.probs(0), [1 / 3] * 3)  # nothing measured: the base (uniform)
    for step in range(1, 401):
        s.observe(step, losses_at(step))
    p = s.probs(400)
    m = s.metrics(400)
    signal = [m[f"sampler/{src}/signal"] for src in SOURCES]
    # big's only task plateaued (ratio 1), small's improved a little, mid's most
    assert signal[0] == pytest.approx(1.0) and signal[1] < signal[2] < signal[0]
    assert p[0] > p[2] > p[1] >= 0.05 - 1e-12
    np.testing.assert_allclose(p, np.maximum(np.array(signal) / sum(signal), 0), rtol=0.2)
    # only every update_every steps do the probabilities move
    before = s.probs(401)
    s.observe(401, losses_at(401))
    np.testing.assert_array_equal(s.probs(402), before)


def test_progress_moves_mass_from_plateaued_tasks_to_learning_ones_within_bounds() -> None:
    s = sampler(strategy="progress", update_every=10, ema=0.5, min_prob=0.1, max_prob=0.7)
    for step in range(1, 401):
        s.observe(step, losses_at(step))
    p = s.probs(400)
    assert p[0] == pytest.approx(0.1)  # big (ctr plateaued) is held at its floor
    assert p[1] > p[2]  # mid still learns faster than small
    assert p.max() <= 0.7 + 1e-12 and p.sum() == pytest.approx(1.0)


def test_adaptive_state_round_trip_is_bitwise(tmp_path) -> None:
    options = dict(strategy="schedule", schedule=[SchedulePoint(0, strategy="loss_ratio"),
                                                  SchedulePoint(300, strategy="progress")],
                   update_every=7, min_prob=0.02)
    first = sampler(**options)
    for step in range(150):
        first.counts(step)
        first.observe(step + 1, losses_at(step + 1))
    torch.save(first.state_dict(), tmp_path / "sampler.pt")
    resumed = sampler(**options)
    resumed.load_state_dict(torch.load(tmp_path / "sampler.pt", weights_only=True))
    for step in range(150, 400):
        assert resumed.probs(step).tobytes() == first.probs(step).tobytes()
        assert resumed.counts(step) == first.counts(step)
        for s in (first, resumed):
            s.observe(step + 1, losses_at(step + 1))
    assert resumed.metrics(400) == first.metrics(400)
    fixed = sampler()
    with pytest.raises(ValueError, match="no loss signals"):
        sampler(**options).load_state_dict(fixed.state_dict())


def test_val_loss_ratio_moves_only_at_evaluations() -> None:
    s = sampler(strategy="val_loss_ratio", min_prob=0.05)
    val = lambda big, mid, small: {"val/ctr/loss": big, "val/cvr/loss": mid, "val/dwell/loss": mid,  # noqa: E731
                                   "val/rating/loss": small, "val/ctr/auc": 0.5}
    s.observe_eval(0, val(1.0, 2.0, 4.0))
    np.testing.assert_allclose(s.probs(1), [1 / 3] * 3)  # every ratio is 1 at the first evaluation
    for step in range(1, 50):
        s.observe(step, losses_at(step))  # train losses do not move this strategy
    np.testing.assert_allclose(s.probs(50), [1 / 3] * 3)
    s.observe_eval(50, val(0.9, 1.0, 1.0))  # ratios 0.9, 0.5, 0.25
    np.testing.assert_allclose(s.probs(51), np.array([0.9, 0.5, 0.25]) / 1.65, rtol=1e-12)
    assert s.metrics(51)["sampler/small/signal"] == pytest.approx(0.25)
