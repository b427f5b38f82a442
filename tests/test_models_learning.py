"""Every architecture learns a small synthetic multi-task problem, in one routed forward per
step, and beats predicting the mean / majority class by a clear margin."""

from __future__ import annotations

import pytest
import torch

from manytask.config import ModelConfig
from manytask.models import build_model
from manytask.models.losses import predictions, task_losses
from manytask.models.single_task import single_task_spec
from manytask.models.spec import FieldSpec, ModelSpec, TaskSpec

torch.set_num_threads(1)

TASKS = {
    "price": TaskSpec("regression", 1),
    "click": TaskSpec("binary", 1),
    "genre": TaskSpec("multiclass", 3),
}


def make_problem(n: int, seed: int):
    """x `[n, 8]` -> price (smooth nonlinear), click (sign of a quadratic form), genre (argmax
    of a linear map). Each task's label is present on ~70% of samples."""
    g = torch.Generator().manual_seed(seed)
    w = torch.Generator().manual_seed(1234)  # the same functions for train and validation
    u, v, W = torch.randn(8, generator=w) / 8**0.5, torch.randn(8, generator=w), torch.randn(8, 3, generator=w)
    x = torch.randn(n, 8, generator=g)
    labels = {
        "price": torch.sin(2 * x @ u) + 0.5 * x[:, 0] * x[:, 1] + 0.1 * torch.randn(n, generator=g),
        "click": ((x @ v + 2 * x[:, 2] * x[:, 3]) > 0).long(),
        "genre": (x @ W).argmax(1),
    }
    masks = {t: torch.rand(n, generator=g) < 0.7 for t in TASKS}
    source_id = torch.randint(0, 2, (n,), generator=g)
    return {"x": x}, labels, masks, source_id


def train(model, spec: ModelSpec, problem, steps: int = 150, batch: int = 256, lr: float = 5e-3):
    inputs, labels, masks, source_id = problem
    n = source_id.shape[0]
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, n, (batch,), generator=g)
        out = model({k: v[idx] for k, v in inputs.items()}, source_id[idx])  # one forward, all tasks
        losses = task_losses(
            out.outputs, {t: labels[t][idx] for t in spec.tasks}, {t: masks[t][idx] for t in spec.tasks},
            spec.tasks,
        )
        loss = sum(losses.values()) + sum(out.aux_losses.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return model


def scores(model, spec: ModelSpec, problem) -> dict[str, tuple[float, float]]:
    """task -> (model score, trivial baseline score): MSE vs predicting the mean for
    regression, accuracy vs the majority class otherwise."""
    inputs, labels, _, source_id = problem
    with torch.no_grad():
        out = model(inputs, source_id).outputs
    result = {}
    for t, s in spec.tasks.items():
        pred, y = predictions(s, out[t]), labels[t]
        if s.type == "regression":
            result[t] = (((pred - y) ** 2).mean().item(), y.var(unbiased=False).item())
        else:
            hard = (pred > 0.5).long() if s.type == "binary" else pred.argmax(1)
            majority = torch.bincount(y).max().item() / y.numel()
            result[t] = ((hard == y).float().mean().item(), majority)
    return result


def assert_beats_baseline(result: dict[str, tuple[float, float]], spec: ModelSpec) -> None:
    for t, (score, base) in result.items():
        if spec.tasks[t].type == "regression":
            assert score < 0.3 * base, f"{t}: MSE {score:.3f} vs mean-prediction {base:.3f}"
        else:
            assert score > base + 0.3, f"{t}: accuracy {score:.3f} vs majority {base:.3f}"


ARCHITECTURES = {
    "multi_head": {"hidden": [32], "tower_hidden": [16]},
    "soft_sharing": {"hidden": [32], "penalty_weight": 1e-3},
    "mmoe": {"num_experts": 4, "expert_hidden": [32], "tower_hidden": [16]},
    "omoe": {"num_experts": 4, "expert_hidden": [32], "tower_hidden": [16]},
    "ple": {"num_levels": 2, "expert_hidden": [32], "tower_hidden": [16]},
    "conditioned": {"hidden": [32], "post_hidden": [32], "tower_hidden": [16]},
}


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_architecture_learns_all_tasks_from_one_routed_forward(name):
    torch.manual_seed(0)
    spec = ModelSpec(inputs={"x": FieldSpec("float32", (8,))}, tasks=dict(TASKS), sources=["a", "b"])
    model = build_model(ModelConfig(name, ARCHITECTURES[name]), spec)
    train(model, spec, make_problem(4096, seed=0))
    assert_beats_baseline(scores(model, spec, make_problem(2048, seed=1)), spec)


def test_single_task_baseline_learns_its_task():
    torch.manual_seed(0)
    full = ModelSpec(inputs={"x": FieldSpec("float32", (8,))}, tasks=dict(TASKS), sources=["a"])
    for task in ("price", "click"):
        spec = single_task_spec(full, task)
        model = build_model(ModelConfig("single_task", {"hidden": [32, 16]}), spec)
        train(model, spec, make_problem(4096, seed=0))
        assert_beats_baseline(scores(model, spec, make_problem(2048, seed=1)), spec)


# -- task conditioning --------------------------------------------------------------------


def make_conditioned_problem(n: int, seed: int):
    """Two sources that label the same two tasks with opposite rules: without the source id
    the best possible prediction is the trivial one (mean 0, accuracy 0.5)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    source_id = torch.randint(0, 2, (n,), generator=g)
    sign = 1.0 - 2.0 * source_id.float()  # +1 for source 0, -1 for source 1
    labels = {
        "level": sign * (x[:, 0] + 0.5 * torch.tanh(2 * x[:, 1])),
        "flag": ((x[:, 2] * sign) > 0).long(),
    }
    masks = {t: torch.ones(n, dtype=torch.bool) for t in labels}
    return {"x": x}, labels, masks, source_id


@pytest.mark.parametrize(
    "combine, code", [("concat", "onehot"), ("concat", "embedding"), ("add", "embedding"), ("multiply", "onehot")]
)
def test_conditioned_model_learns_tasks_that_need_the_task_id(combine, code):
    torch.manual_seed(0)
    tasks = {"level": TaskSpec("regression", 1), "flag": TaskSpec("binary", 1)}
    spec = ModelSpec(inputs={"x": FieldSpec("float32", (4,))}, tasks=tasks, sources=["up", "down"])
    params = {"combine": combine, "task_code": code, "hidden": [32], "post_hidden": [32], "tower_hidden": [16]}
    model = build_model(ModelConfig("conditioned", params), spec)
    train(model, spec, make_conditioned_problem(4096, seed=0), steps=200)
    result = scores(model, spec, make_conditioned_problem(2048, seed=1))
    assert result["level"][0] < 0.1 * result["level"][1], result
    assert result["flag"][0] > 0.9, result  # majority: ~0.5


# -- time series ----------------------------------------------------------------------------


def make_series(n: int, seed: int, length: int = 24, horizon: int = 4):
    """Noisy sines with random frequency and phase, plus a slow second channel. Forecast the
    next `horizon` values of channel 0; classify fast (frequency > 0.45) vs slow."""
    g = torch.Generator().manual_seed(seed)
    freq = 0.15 + 0.6 * torch.rand(n, 1, generator=g)
    phase = 6.283 * torch.rand(n, 1, generator=g)
    t = torch.arange(length + horizon).float()
    wave = torch.sin(freq * t + phase) + 0.05 * torch.randn(n, length + horizon, generator=g)
    series = torch.stack([wave[:, :length], torch.cos(0.1 * t[:length]).expand(n, length)], dim=2)
    labels = {"next": wave[:, length:], "fast": (freq[:, 0] > 0.45).long()}
    masks = {k: torch.ones(n, dtype=torch.bool) for k in labels}
    return {"series": series}, labels, masks, torch.zeros(n, dtype=torch.long)


def test_timeseries_model_learns_forecast_and_class():
    torch.manual_seed(0)
    spec = ModelSpec(
        inputs={"series": FieldSpec("float32", (24, 2))},
        tasks={"next": TaskSpec("forecast", 4), "fast": TaskSpec("binary", 1)},
        sources=["waves"],
    )
    params = {"encoder": {"rnn": "gru", "rnn_hidden": 32}, "hidden": [32], "tower_hidden": [32]}
    model = build_model(ModelConfig("timeseries", params), spec)
    train(model, spec, make_series(4096, seed=0), steps=150, batch=128, lr=1e-2)
    inputs, labels, _, source_id = make_series(1024, seed=1)
    with torch.no_grad():
        out = model(inputs, source_id).outputs
    target = labels["next"]
    mse = ((out["next"] - target) ** 2).mean().item()
    last_value = ((inputs["series"][:, -1:, 0] - target) ** 2).mean().item()
    mean_value = ((inputs["series"][:, :, 0].mean(1, keepdim=True) - target) ** 2).mean().item()
    assert mse < 0.2 * min(last_value, mean_value), (mse, last_value, mean_value)
    accuracy = ((out["fast"][:, 0] > 0).long() == labels["fast"]).float().mean().item()
    majority = labels["fast"].float().mean().item()
    assert accuracy > max(majority, 1 - majority) + 0.3, (accuracy, majority)
