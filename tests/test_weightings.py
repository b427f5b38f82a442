"""Loss weightings on a toy three-task problem: sane weights, the behaviour each paper
promises, exact agreement between two real ranks, and state that survives a checkpoint."""

from __future__ import annotations

import itertools
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import all_reduce_mean, gloo_group
from torch import nn

from manytask.config import TaskConfig, WeightingConfig
from manytask.schema import ConfigError
from manytask.trainer.weightings import (
    WEIGHTINGS,
    WeightingContext,
    build_weighting,
    min_norm_weights,
)
from manytask.trainer.weightings.base import reduce_losses


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: threads only contend with the other test runs on the machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


TASKS = {"a": TaskConfig("regression"), "b": TaskConfig("regression"), "c": TaskConfig("binary", loss_weight=0.5)}


class Toy(nn.Module):
    """A shared trunk [B, 4] -> [B, 8] and one linear head per task."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Linear(4, 8)
        self.heads = nn.ModuleDict({t: nn.Linear(8, 1) for t in TASKS})

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        z = torch.tanh(self.trunk(x))
        return z, {t: h(z).squeeze(-1) for t, h in self.heads.items()}


def toy_losses(
    model: Toy, gen: torch.Generator, noise: tuple[float, float] = (0.1, 1.0), batch: int = 32
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One batch: a and b are regressions with different label noise, c a classification."""
    x = torch.randn(batch, 4, generator=gen)
    ya = 2 * x[:, 0] + noise[0] * torch.randn(batch, generator=gen)
    yb = x[:, 1] - x[:, 2] + noise[1] * torch.randn(batch, generator=gen)
    yc = (x[:, 3] > 0).float()
    z, out = model(x)
    losses = {
        "a": (out["a"] - ya).pow(2).mean(),
        "b": (out["b"] - yb).pow(2).mean(),
        "c": nn.functional.binary_cross_entropy_with_logits(out["c"], yc),
    }
    return z, losses


def run_steps(
    method: str,
    steps: int,
    params: dict | None = None,
    seed: int = 0,
    all_reduce_mean=None,
    absent: dict[int, set[str]] | None = None,
    weighting=None,
    model: Toy | None = None,
    start: int = 0,
    zero_absent: bool = False,
) -> tuple[list[dict[str, float]], nn.Module, Toy]:
    """Train the toy for `steps` with one weighting; returns the weights of every step.

    absent:      step -> tasks with no labelled sample on this rank: left out of the losses,
                 or with `zero_absent` kept as an in-graph 0 (as models/losses.py does) and
                 flagged by `ctx.local_counts` (what the trainer does).
    """
    torch.manual_seed(0)  # same initial model on every rank
    model = model or Toy()
    weighting = weighting or build_weighting(WeightingConfig(method, params or {}), TASKS)
    gen = torch.Generator().manual_seed(1000 + seed)
    history = []
    for step in range(start, start + steps):
        z, losses = toy_losses(model, gen)
        gone = (absent or {}).get(step, set())
        for t in gone:
            if zero_absent:
                losses[t] = 0 * losses[t]
            else:
                del losses[t]
        ctx = WeightingContext(
            local_counts={t: 0 if t in gone else 32 for t in TASKS} if zero_absent else None,
            step=step,
            representation=z,
            last_shared_layer=list(model.trunk.parameters()),
            shared_params=list(model.trunk.parameters()),
            all_reduce_mean=all_reduce_mean or (lambda x: x),
        )
        total, weights = weighting.combine(losses, ctx)
        params = [*model.parameters(), *weighting.parameters()]
        grads = torch.autograd.grad(total, params, allow_unused=True)
        with torch.no_grad():  # plain SGD by hand: no optimizer state, and no torch.optim import
            for p, g in zip(params, grads):  # (which costs seconds in each spawned rank)
                g = torch.zeros_like(p) if g is None else g
                if all_reduce_mean is not None:  # what DDP and the trainer do
                    g = all_reduce_mean(g)
                p -= 0.05 * g
        history.append(weights)
    return history, weighting, model


def expected_sum(method: str, weights: dict[str, float], present: set[str]) -> float | None:
    """What each method documents its weights to sum to (None: no fixed sum)."""
    k = len(present)
    return {
        "equal": k,
        "static": sum(TASKS[t].loss_weight for t in present),
        "gradnorm": None,  # sum over all tasks is T; with an absent task, the rest keep their sum
        "dwa": k,
        "mgda": 1.0,
        "worst_case": k,
        "uncertainty": None,
        "pcgrad": k,
        "rlw": k,
        "famo": k,
        "imtl_g": k,
        "db_mtl": None,  # 1 / loss
        "imtl_l": None,  # learned
        "imtl": None,  # K·α·e^s: learned scales
        "cagrad": None,  # K (1 + λ) / (1 + c²)
        "nash_mtl": None,
        "aligned_mtl": None,
        "upgrad": None,  # ≥ K: equal plus the projections' corrections
        "gradvac": None,
    }[method]


def state_is_finite(weighting: nn.Module) -> bool:
    def finite(v) -> bool:
        if isinstance(v, torch.Tensor):
            return bool(torch.isfinite(v).all())
        if isinstance(v, dict):
            return all(finite(x) for x in v.values())
        if isinstance(v, (list, tuple)):
            return all(finite(x) for x in v)
        if isinstance(v, float):
            return math.isfinite(v)
        return True

    return finite(weighting.state_dict())


@pytest.mark.parametrize("method", list(WEIGHTINGS))
def test_weights_are_finite_and_sum_as_documented(method: str) -> None:
    # Steps 3 and 5: c has no labelled sample (on this, the only, rank).
    params = {"window": 2} if method == "dwa" else {}
    history, weighting, _ = run_steps(
        method, 8, params, absent={3: {"c"}, 5: {"c"}}
    )
    for step, weights in enumerate(history):
        assert set(weights) == set(TASKS)
        assert all(math.isfinite(w) and w >= 0 for w in weights.values()), weights
        here = {"a", "b"} if step in (3, 5) else set(TASKS)
        assert all(weights[t] == 0.0 for t in set(TASKS) - here)
        want = expected_sum(method, weights, here)
        if want is not None:
            assert sum(weights.values()) == pytest.approx(want)
    if method == "gradnorm":
        assert sum(history[-1].values()) == pytest.approx(len(TASKS))
    assert state_is_finite(weighting)


@pytest.mark.parametrize("method", ["gradnorm", "dwa", "worst_case", "uncertainty"])
def test_non_finite_loss_does_not_corrupt_state(method: str) -> None:
    _, weighting, model = run_steps(method, 3)
    before = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in weighting.state_dict().items()}
    z, losses = toy_losses(model, torch.Generator().manual_seed(5))
    losses["b"] = losses["b"] * float("nan")
    ctx = WeightingContext(
        step=3, representation=z, last_shared_layer=list(model.trunk.parameters()), shared_params=list(model.trunk.parameters())
    )
    total, weights = weighting.combine(losses, ctx)
    assert not torch.isfinite(total)  # the trainer sees it and skips the step
    after = dict(weighting.state_dict())
    assert str(after) == str(before) and state_is_finite(weighting)


def test_losses_are_averaged_over_the_labelled_samples_of_all_ranks() -> None:
    # Two simulated ranks: rank 1 holds 3 samples of "a" (mean loss 4), rank 0 holds 1 (mean
    # loss 2) and passes "b" as the in-graph 0 of a task it has no sample of.
    rank1 = {"a": torch.tensor(4.0), "b": torch.tensor(1.0), "c": torch.tensor(0.5)}
    captured = []
    ctx1 = WeightingContext(all_reduce_mean=lambda x: captured.append(x) or x, local_counts={"a": 3, "b": 2, "c": 1})
    reduce_losses(list(TASKS), rank1, ctx1, torch.device("cpu"))
    rank0 = {"a": torch.tensor(2.0), "b": torch.tensor(0.0), "c": torch.tensor(0.7)}
    ctx0 = WeightingContext(all_reduce_mean=lambda x: (x + captured[0]) / 2, local_counts={"a": 1, "b": 0, "c": 1})
    reduced = reduce_losses(list(TASKS), rank0, ctx0, torch.device("cpu"))
    assert reduced.loss == pytest.approx([(2 + 3 * 4) / 4, 1.0, 0.6])
    assert reduced.present == [True, True, True]


def test_absent_task_leaves_its_state_alone() -> None:
    methods = {"gradnorm": ("weights", "initial"), "dwa": ("sums", "counts"), "worst_case": ("smoothed", "initial")}
    for method, keys in methods.items():
        _, weighting, model = run_steps(method, 3, {"window": 100} if method == "dwa" else {})
        before = {k: getattr(weighting, k)[2] for k in keys}
        _, weighting, _ = run_steps(
            method, 2, weighting=weighting, model=model, start=3, absent={3: {"c"}, 4: {"c"}}
        )
        assert {k: getattr(weighting, k)[2] for k in keys} == before, method
    assert sum(weighting.smoothed[:2]) > 0


def test_uncertainty_gives_the_less_noisy_task_a_larger_weight() -> None:
    # Two regressions of the same signal by an already-fitted model: what remains of each loss
    # is its label noise (variance 0.01 vs 1), which the log-variances should learn.
    gen = torch.Generator().manual_seed(0)
    two = {"clean": TaskConfig("regression"), "noisy": TaskConfig("regression")}
    weighting = build_weighting(WeightingConfig("uncertainty"), two)
    (log_vars,) = weighting.parameters()  # what the trainer hands to the optimizer
    bias = torch.zeros(2, requires_grad=True)  # a model parameter, so the losses have a graph
    for step in range(300):
        x = torch.randn(64, 4, generator=gen)
        signal = x @ torch.tensor([1.0, -2.0, 0.5, 0.0])
        out = signal[:, None] + bias
        losses = {
            "clean": (out[:, 0] - signal - 0.1 * torch.randn(64, generator=gen)).pow(2).mean(),
            "noisy": (out[:, 1] - signal - 1.0 * torch.randn(64, generator=gen)).pow(2).mean(),
        }
        total, w = weighting.combine(losses, WeightingContext(step=step))
        (grad,) = torch.autograd.grad(total, [log_vars])
        with torch.no_grad():
            log_vars -= 0.05 * grad
    # At the optimum exp(-s_i) = 1 / L_i = 1 / noise²: 100 for clean, 1 for noisy.
    assert w["clean"] > 30 * w["noisy"], w
    assert 0.7 < w["noisy"] < 1.4, w


def test_gradnorm_balances_gradient_norms() -> None:
    torch.manual_seed(0)
    shared = nn.Linear(6, 6)
    gen = torch.Generator().manual_seed(0)
    two = {"small": TaskConfig("regression"), "large": TaskConfig("regression")}
    weighting = build_weighting(WeightingConfig("gradnorm", {"alpha": 0.0, "lr": 0.02}), two)

    def grad_norms(losses: dict[str, torch.Tensor], weights: dict[str, float]) -> list[float]:
        return [
            weights[t] * torch.autograd.grad(losses[t], shared.weight, retain_graph=True)[0].norm().item()
            for t in two
        ]

    ratios = []
    for step in range(150):
        z = shared(torch.randn(64, 6, generator=gen))
        # Same kind of task, but one loss is 10x the scale: its gradients dominate the trunk.
        losses = {"small": z[:, :3].pow(2).mean(), "large": 10 * z[:, 3:].pow(2).mean()}
        ctx = WeightingContext(step=step, representation=z, last_shared_layer=[shared.weight, shared.bias])
        before = dict(zip(two, weighting.weights))
        weighting.combine(losses, ctx)
        g = grad_norms(losses, before)
        ratios.append(g[1] / g[0])
    assert ratios[0] > 5  # unbalanced at the start
    assert 0.5 < sum(ratios[-20:]) / 20 < 2.0, ratios[-20:]
    assert sum(weighting.weights) == pytest.approx(2.0)


@pytest.mark.parametrize("seed", range(5))
def test_mgda_finds_the_min_norm_convex_combination(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    g1, g2 = torch.randn(2, 5, 3, generator=gen, dtype=torch.float64)
    g2 = g2 + (seed - 2) * g1  # from opposed to aligned gradients
    z = torch.zeros(5, 3, dtype=torch.float64, requires_grad=True)
    losses = {"a": (g1 * z).sum(), "b": (g2 * z).sum()}  # dL/dz is exactly g1, g2
    two = {"a": TaskConfig("regression"), "b": TaskConfig("regression")}
    _, weights = build_weighting(WeightingConfig("mgda"), two).combine(losses, WeightingContext(representation=z))
    grid = torch.linspace(0, 1, 20001, dtype=torch.float64)
    norms = (grid[:, None, None] * g1 + (1 - grid[:, None, None]) * g2).pow(2).sum((1, 2))
    best = float(grid[norms.argmin()])
    assert weights["a"] == pytest.approx(best, abs=1e-4)
    assert weights["a"] + weights["b"] == pytest.approx(1.0)


def test_min_norm_solver_three_tasks_matches_brute_force() -> None:
    gen = torch.Generator().manual_seed(3)
    g = torch.randn(3, 4, generator=gen, dtype=torch.float64)
    alpha = min_norm_weights(g @ g.T, max_iter=2000, tol=0.0)
    steps = 200
    grid = torch.tensor(
        [(i / steps, j / steps, 1 - (i + j) / steps) for i, j in itertools.product(range(steps + 1), repeat=2) if i + j <= steps],
        dtype=torch.float64,
    )
    brute = (grid @ g).pow(2).sum(1).min()
    assert float((alpha @ g).pow(2).sum()) <= float(brute) + 1e-6
    assert float(alpha.sum()) == pytest.approx(1.0) and bool((alpha >= 0).all())


def test_pcgrad_projects_conflicting_gradients_off_each_other() -> None:
    from manytask.trainer.weightings.pcgrad import project_conflicts

    g = torch.tensor([[1.0, 0.0], [-1.0, 1.0], [0.0, 0.0]])  # a, b conflict; c has no labels
    torch.testing.assert_close(project_conflicts(g, order_seed=3), torch.tensor([0.5, 1.5]))
    agree = torch.tensor([[1.0, 0.0], [1.0, 1.0]])  # no conflict: the plain sum
    torch.testing.assert_close(project_conflicts(agree, order_seed=0), agree.sum(0))


def test_pcgrad_rewrites_shared_gradients_and_leaves_task_parameters_alone() -> None:
    """Through combine -> backward -> before_step, as the trainer calls them: the shared
    parameter ends with the projected sum (mean over two micro-batches), a task head with its
    ordinary gradient, and for two conflicting tasks the result conflicts with neither."""
    w = nn.Parameter(torch.zeros(2))  # shared
    head = nn.Parameter(torch.ones(()))  # task a's own parameter
    u, v = torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 1.0])
    weighting = build_weighting(WeightingConfig("pcgrad"), TASKS)
    for _micro in range(2):
        losses = {"a": head * (w @ u) + head, "b": w @ v, "c": 0 * w.sum()}
        ctx = WeightingContext(step=5, shared_params=[w], local_counts={"a": 4, "b": 4, "c": 0})
        total, weights = weighting.combine(losses, ctx)
        (total / 2).backward()
    assert weights == {"a": 1.0, "b": 1.0, "c": 0.0}  # c is labelled nowhere
    weighting.before_step()
    torch.testing.assert_close(w.grad, torch.tensor([0.5, 1.5]))
    assert float(w.grad @ u) >= 0 and float(w.grad @ v) >= 0
    assert head.grad.item() == 1.0  # d/dhead of (w·u + 1) at w = 0, summed over 2 halves


def test_pcgrad_runs_under_deepspeed_and_db_mtl_not_under_zero3(tmp_path) -> None:
    from manytask.config import load_config

    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "data: {sources: [{name: s, train: t, inputs: [x], labels: {a: y}}]}\n"
        "tasks: {a: {type: regression}}\nengine: {name: deepspeed}\nweighting: {name: pcgrad}\n"
    )
    assert load_config(recipe).weighting.name == "pcgrad"
    with pytest.raises(ConfigError, match=r"'weighting.name' in .*r.yaml: db_mtl runs under DeepSpeed only at ZeRO stages 0, 1, 2, not stage 3"):
        load_config(recipe, ["weighting.name=db_mtl", "engine.deepspeed.zero_optimization.stage=3"])


def test_worst_case_puts_most_weight_on_the_worst_task() -> None:
    raw = build_weighting(WeightingConfig("worst_case", {"normalize": False, "temperature": 1.0}), TASKS)
    for step in range(5):
        losses = {"a": torch.tensor(1.0), "b": torch.tensor(2.0), "c": torch.tensor(5.0)}
        _, w = raw.combine(losses, WeightingContext(step=step))
    assert max(w, key=w.get) == "c" and w["c"] > w["a"] + w["b"]
    # Normalised: b has made the least progress relative to its first loss, though a's is larger.
    rel = build_weighting(WeightingConfig("worst_case", {"ema": 0.0, "temperature": 0.2}), TASKS)
    rel.combine({"a": torch.tensor(10.0), "b": torch.tensor(1.0), "c": torch.tensor(1.0)}, WeightingContext())
    _, w = rel.combine({"a": torch.tensor(2.0), "b": torch.tensor(0.9), "c": torch.tensor(0.5)}, WeightingContext())
    assert max(w, key=w.get) == "b"


def test_dwa_favours_the_task_whose_loss_falls_slowest() -> None:
    dwa = build_weighting(WeightingConfig("dwa", {"window": 2, "temperature": 0.5}), TASKS)
    for step in range(7):  # windows 0, 1, 2 closed after step 6 begins window 3
        k = step // 2
        losses = {"a": 0.5**k, "b": 0.9**k, "c": 0.99**k}
        _, w = dwa.combine({t: torch.tensor(v) for t, v in losses.items()}, WeightingContext(step=step))
    assert w["c"] > w["b"] > w["a"]
    assert sum(w.values()) == pytest.approx(3.0)


@pytest.mark.parametrize("method", list(WEIGHTINGS))
def test_state_round_trip_gives_identical_future(method: str, tmp_path) -> None:
    params = {"window": 2} if method == "dwa" else {}
    _, first, model = run_steps(method, 5, params)
    torch.save({"weighting": first.state_dict(), "model": model.state_dict()}, tmp_path / "ckpt.pt")
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    resumed = build_weighting(WeightingConfig(method, params), TASKS)
    resumed.load_state_dict(ckpt["weighting"])
    model_copy = Toy()
    model_copy.load_state_dict(ckpt["model"])
    # Both continue from step 5 on the same data (plain SGD: no optimizer state to carry).
    a, _, _ = run_steps(method, 4, params, seed=9, weighting=first, model=model, start=5)
    b, _, _ = run_steps(method, 4, params, seed=9, weighting=resumed, model=model_copy, start=5)
    assert a == b


def test_typos_name_the_closest_key() -> None:
    with pytest.raises(ConfigError, match=r"weighting\.params\.alpah.*did you mean 'weighting\.params\.alpha'"):
        build_weighting(WeightingConfig("gradnorm", {"alpah": 1.0}), TASKS)
    with pytest.raises(ConfigError, match=r"expected float"):
        build_weighting(WeightingConfig("dwa", {"temperature": "hot"}), TASKS)
    with pytest.raises(ConfigError, match=r"did you mean 'worst_case'"):
        build_weighting(WeightingConfig("worstcase"), TASKS)
    with pytest.raises(ConfigError, match=r"weighting\.params\.weights\.bb.*did you mean 'weighting\.params\.weights\.b'"):
        build_weighting(WeightingConfig("static", {"weights": {"bb": 2.0}}), TASKS)
    with pytest.raises(ConfigError, match=r"unknown key 'weighting\.params\.temperature'"):
        build_weighting(WeightingConfig("equal", {"temperature": 1.0}), TASKS)


# No collective: a task is present where it has a loss, so with the trainer's in-graph 0 for a
# task labelled nowhere they weigh it as usual (its loss is 0: nothing trains).
LOCAL_PRESENCE = {"equal", "static", "rlw"}


def _rank_weights(rank: int, world: int, store: str) -> None:
    with gloo_group(rank, world, store):
        for method, zero_absent in itertools.product(WEIGHTINGS, (False, True)):
            if method in LOCAL_PRESENCE and not zero_absent:
                continue  # they see only this rank's losses; the trainer always passes every task
            params = {"window": 2} if method == "dwa" else {}
            # Step 2: c only on rank 0. Step 4: c nowhere. Everything else on both ranks.
            absent = {2: {"c"} if rank == 1 else set(), 4: {"c"}}
            history, weighting, _ = run_steps(
                method, 7, params, seed=rank, all_reduce_mean=all_reduce_mean, absent=absent,
                zero_absent=zero_absent,
            )
            mine = torch.tensor([[h[t] for t in TASKS] for h in history], dtype=torch.float64)
            everyone = [torch.empty_like(mine) for _ in range(world)]
            dist.all_gather(everyone, mine)
            assert torch.equal(everyone[0], everyone[1]), f"{method}: ranks disagree\n{everyone}"
            assert bool(torch.isfinite(mine).all())
            if method not in LOCAL_PRESENCE:  # the all-reduced count says c is labelled nowhere
                assert bool((mine[4, 2] == 0).all()), method
            assert state_is_finite(weighting)


@pytest.mark.slow
def test_two_ranks_agree_on_weights(tmp_path) -> None:
    mp.spawn(_rank_weights, args=(2, os.fspath(tmp_path / "store")), nprocs=2, join=True)
