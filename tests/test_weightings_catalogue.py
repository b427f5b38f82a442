"""The modern weightings against their papers on hand-computable gradients, and every weighting
exact across two real ranks: a fixed global batch split over 2 gloo ranks (one task absent
from one rank's half) trains to the same parameters as one process on the whole batch."""

from __future__ import annotations

import math
import os
import random

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from conftest import all_reduce_mean, gloo_group
from torch import nn

from manytask.config import TaskConfig, WeightingConfig
from manytask.trainer.weightings import WEIGHTINGS, WeightingContext, build_weighting, cagrad
from manytask.trainer.weightings.aligned_mtl import aligned_coefficients
from manytask.trainer.weightings.cagrad import cagrad_coefficients
from manytask.trainer.weightings.db_mtl import balanced_direction
from manytask.trainer.weightings.famo import famo_weights
from manytask.trainer.weightings.gradvac import gradvac_coefficients
from manytask.trainer.weightings.imtl import imtl_g_alpha
from manytask.trainer.weightings.nash_mtl import nash_alpha
from manytask.trainer.weightings.pcgrad import pcgrad_coefficients
from manytask.trainer.weightings.rlw import rlw_draw
from manytask.trainer.weightings.task_gradients import gram_matrix
from manytask.trainer.weightings.upgrad import upgrad_coefficients

D64 = torch.float64


def gram(*rows) -> torch.Tensor:
    g = torch.tensor(rows, dtype=D64)
    return g @ g.T


# --------------------------------------------------------------------------- the papers' cases
def test_gram_matrix_is_a_sum_of_block_products() -> None:
    g = torch.randn(3, 10, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(gram_matrix(g, block=3), g.double() @ g.double().T)


def test_imtl_g_equal_projections() -> None:
    # g1 = (1, 0), g2 = (0, 2): unit vectors e1, e2; equal projections need α1 = 2 α2.
    torch.testing.assert_close(imtl_g_alpha(gram([1, 0], [0, 2])), torch.tensor([2 / 3, 1 / 3], dtype=D64))
    g = torch.randn(3, 5, generator=torch.Generator().manual_seed(1), dtype=D64)
    alpha = imtl_g_alpha(g @ g.T)
    d = alpha @ g
    proj = g @ d / g.norm(dim=1)
    torch.testing.assert_close(proj, proj[0].expand(3))
    assert float(alpha.sum()) == pytest.approx(1.0)


def test_nash_mtl_solves_the_bargaining_condition() -> None:
    # Orthogonal g1 = (1, 0), g2 = (0, 2): α_t = 1 / ||g_t||, d = (1, 1).
    alpha = nash_alpha(gram([1, 0], [0, 2]))
    torch.testing.assert_close(alpha, torch.tensor([1.0, 0.5], dtype=D64))
    g = torch.randn(3, 6, generator=torch.Generator().manual_seed(2), dtype=D64)
    m = g @ g.T
    alpha = nash_alpha(m)
    assert bool((alpha > 0).all())
    torch.testing.assert_close((m @ alpha) * alpha, torch.ones(3, dtype=D64))


def test_aligned_mtl_makes_an_orthogonal_equal_norm_system() -> None:
    # M = diag(1, 4): B = 1 · diag(1, 1/2), c = (1, 1/2), d = (1, 1).
    torch.testing.assert_close(aligned_coefficients(gram([1, 0], [0, 2])), torch.tensor([1.0, 0.5], dtype=D64))
    g = torch.randn(3, 6, generator=torch.Generator().manual_seed(3), dtype=D64)
    m = g @ g.T
    lam, vec = torch.linalg.eigh(m)
    b = lam.min().sqrt() * (vec * lam.rsqrt()) @ vec.T
    aligned = b @ g
    torch.testing.assert_close(aligned @ aligned.T, lam.min() * torch.eye(3, dtype=D64))
    torch.testing.assert_close(aligned_coefficients(m) @ g, aligned.sum(0))


def test_upgrad_projects_each_gradient_onto_the_dual_cone() -> None:
    # g1 = (1, 0), g2 = (-1, 1) conflict: π(g1) = (0.5, 0.5), π(g2) = (0, 1), d = (0.5, 1.5).
    g = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=D64)
    c = upgrad_coefficients(g @ g.T)
    torch.testing.assert_close(c, torch.tensor([2.0, 1.5], dtype=D64))
    torch.testing.assert_close(c @ g, torch.tensor([0.5, 1.5], dtype=D64))
    assert bool((g @ (c @ g) >= -1e-12).all())  # no loss increases to first order
    agree = torch.tensor([[1.0, 0.0], [1.0, 1.0]], dtype=D64)
    torch.testing.assert_close(upgrad_coefficients(agree @ agree.T), torch.ones(2, dtype=D64))


def test_cagrad_maximises_the_worst_improvement_in_the_ball() -> None:
    g = torch.tensor([[1.0, 0.2], [-0.6, 1.0]], dtype=D64)
    torch.testing.assert_close(cagrad_coefficients(g @ g.T, c=0.0), torch.ones(2, dtype=D64))  # c = 0: equal
    c = 0.5
    d = cagrad_coefficients(g @ g.T, c=c, rescale=False) @ g / 2  # the paper's d (mean scale)
    g0 = g.mean(0)
    radius = c * float(g0.norm())
    assert float((d - g0).norm()) <= radius + 1e-6
    # Brute force over the ball's boundary (the optimum of a linear min lies there).
    angles = torch.linspace(0, 2 * math.pi, 200001, dtype=D64)
    ring = g0 + radius * torch.stack([angles.cos(), angles.sin()], 1)
    best = float((ring @ g.T).min(1).values.max())
    assert float((g @ d).min()) == pytest.approx(best, abs=1e-6)


def test_gradvac_reaches_the_target_similarity_and_starts_as_pcgrad() -> None:
    m = gram([1, 0], [0, 1])  # cosine 0, below a target of 0.5
    coeff, targets = gradvac_coefficients(m, [[0.0, 0.5], [0.5, 0.0]], beta=0.5, order_seed=0)
    g = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=D64)
    g1 = g[0] + (coeff[1] - 1) * g[1]  # adjusted g1: g1 + w g2 (both adjust symmetrically here)
    assert float(g1 @ g[1] / g1.norm()) == pytest.approx(0.5)
    assert targets[0][1] == pytest.approx(0.25)  # (1 - β) 0.5 + β 0
    conflict = gram([1, 0], [-1, 1])
    zero = [[0.0, 0.0], [0.0, 0.0]]
    torch.testing.assert_close(gradvac_coefficients(conflict, zero, 0.5, 3)[0], pcgrad_coefficients(conflict, 3))


def test_famo_weights_and_logit_update() -> None:
    # Uniform logits, losses (1, 2): w ∝ z / L = (1, 0.5), scaled to sum 2.
    assert famo_weights([0.0, 0.0], [1.0, 2.0], 0.0) == pytest.approx([4 / 3, 2 / 3])
    two = {"fast": TaskConfig("regression"), "slow": TaskConfig("regression")}
    famo = build_weighting(WeightingConfig("famo"), two)
    for step, (fast, slow) in enumerate([(1.0, 1.0), (0.5, 0.99), (0.25, 0.98)]):
        losses = {"fast": torch.tensor(fast), "slow": torch.tensor(slow)}
        _, w = famo.combine(losses, WeightingContext(step=step))
    assert famo.logits[1] > famo.logits[0]  # the task whose loss falls slowest gains weight


def test_db_mtl_rescales_every_gradient_to_the_largest_norm() -> None:
    buffer = torch.tensor([[3.0, 0.0], [0.0, 1.0]])
    torch.testing.assert_close(balanced_direction(buffer, [0, 1]), torch.tensor([3.0, 3.0]))


def test_rlw_draws_the_same_weights_for_a_seed_and_step() -> None:
    assert rlw_draw(7, 3, 4) == rlw_draw(7, 3, 4)
    assert rlw_draw(7, 3, 4) != rlw_draw(7, 4, 4)
    draws = torch.tensor([rlw_draw(0, s, 3) for s in range(2000)], dtype=D64)
    assert torch.allclose(draws.sum(1), torch.full((2000,), 3.0, dtype=D64))
    assert torch.allclose(draws.mean(0), torch.ones(3, dtype=D64), atol=0.05)  # unbiased per task


def test_imtl_l_scales_every_loss_to_one() -> None:
    two = {"small": TaskConfig("regression"), "large": TaskConfig("regression")}
    imtl = build_weighting(WeightingConfig("imtl_l"), two)
    (s,) = imtl.parameters()
    bias = torch.zeros(2, requires_grad=True)
    for step in range(400):
        losses = {"small": 0.1 + bias[0] ** 2, "large": 10.0 + bias[1] ** 2}
        total, w = imtl.combine(losses, WeightingContext(step=step))
        (grad,) = torch.autograd.grad(total, [s])
        with torch.no_grad():
            s -= 0.05 * grad / grad.abs().clamp_min(1e-3)  # sign-like steps: scale-free
    assert w["small"] * 0.1 == pytest.approx(1.0, rel=0.1) and w["large"] * 10 == pytest.approx(1.0, rel=0.1)


def test_imtl_hybrid_balances_the_scaled_gradients_and_learns_the_scales() -> None:
    """Shared θ [2] at 0, L_a = 0.5 + θ·(1, 0), L_b = 3 + θ·(0, 2), scales s = (ln 2, 0): the
    scaled gradients (2, 0) and (0, 2) have equal norms, so α = (1/2, 1/2) and c = K·α·e^s =
    (2, 1); the shared gradient (2, 2) projects equally on both tasks' directions, and
    ∂/∂s_t = e^{s_t} L_t − 1 = (0, 2). With s = 0 it is IMTL-G: α = (2/3, 1/3), c = (4/3, 2/3)."""
    two = {"a": TaskConfig("regression"), "b": TaskConfig("regression")}
    for scales, coeffs, s_grad in [([math.log(2), 0.0], [2.0, 1.0], [0.0, 2.0]), ([0.0, 0.0], [4 / 3, 2 / 3], [-0.5, 2.0])]:
        imtl = build_weighting(WeightingConfig("imtl"), two)
        (s,) = imtl.parameters()
        with torch.no_grad():
            s.copy_(torch.tensor(scales))
        theta = torch.zeros(2, requires_grad=True)
        losses = {"a": 0.5 + theta @ torch.tensor([1.0, 0.0]), "b": 3.0 + theta @ torch.tensor([0.0, 2.0])}
        total, weights = imtl.combine(losses, WeightingContext(shared_params=[theta]))
        assert [weights["a"], weights["b"]] == pytest.approx(coeffs)
        d_theta, d_s = torch.autograd.grad(total, [theta, s])
        torch.testing.assert_close(d_theta, coeffs[0] * torch.tensor([1.0, 0.0]) + coeffs[1] * torch.tensor([0.0, 2.0]))
        torch.testing.assert_close(d_s, torch.tensor(s_grad))
    assert d_theta.tolist() == pytest.approx([4 / 3, 4 / 3])  # equal projections on (1, 0), (0, 1)


# --------------------------------------------------------------------------- the [T, T] solvers
def random_gradients(seed: int, tasks: int, size: int) -> torch.Tensor:
    """[tasks, size] float64: a common direction plus noise, norms spread over ~e^±4, so that
    some pairs conflict and some agree."""
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(tasks, size, generator=gen, dtype=D64) + torch.randn(1, size, generator=gen, dtype=D64) * (seed % 3 - 1)
    return g * torch.exp(2 * torch.randn(tasks, 1, generator=gen, dtype=D64))


def visited(tasks: int, zero: set[int], rng: random.Random) -> list[list[int]]:
    """The other tasks each task visits: one shuffle per task in turn (PCGrad's random order)."""
    orders = []
    for i in range(tasks):
        others = [j for j in range(tasks) if j != i and j not in zero]
        rng.shuffle(others)
        orders.append(others)
    return orders


@pytest.mark.parametrize("seed", range(6))
def test_pcgrad_and_gradvac_coefficients_equal_the_per_pair_definition(seed: int) -> None:
    """On gradient vectors, pair by pair (PCGrad Alg. 1 line 6; GradVac's update), in the same
    random orders, with one zero gradient: the vectorised solvers on the Gram matrix give the
    same direction to 1e-9 relative (float64; rounding differs only in summation order)."""
    T = [3, 8, 32][seed % 3]
    g = random_gradients(seed, T, 40)
    g[1] = 0.0  # a task without labels: neither moves nor is projected on
    projected = g.clone()
    for i, others in enumerate(visited(T, {1}, random.Random(seed))):
        for j in others:
            dot = projected[i] @ g[j]
            if dot < 0:
                projected[i] -= dot / (g[j] @ g[j]) * g[j]
    torch.testing.assert_close(pcgrad_coefficients(g @ g.T, seed) @ g, projected.sum(0), rtol=1e-9, atol=1e-9 * float(g.norm()))

    targets = [[0.0] * T for _ in range(T)]
    beta = 0.3
    for step in range(3):  # targets carried over steps, as the weighting does
        expected = [row[:] for row in targets]
        adjusted = g.clone()
        for i, others in enumerate(visited(T, {1}, random.Random(seed + step))):
            for j in others:
                if float(adjusted[i].norm()) == 0:
                    continue
                phi = min(1.0, max(-1.0, float(adjusted[i] @ g[j] / (adjusted[i].norm() * g[j].norm()))))
                target = expected[i][j]
                if phi < target:
                    adjusted[i] += g[j] * float(adjusted[i].norm()) * (
                        target * math.sqrt(1 - phi**2) - phi * math.sqrt(1 - target**2)
                    ) / (float(g[j].norm()) * math.sqrt(1 - target**2))
                expected[i][j] = (1 - beta) * target + beta * phi
        coeff, targets = gradvac_coefficients(g @ g.T, targets, beta, seed + step)
        torch.testing.assert_close(coeff @ g, adjusted.sum(0), rtol=1e-9, atol=1e-9 * float(g.norm()))
        torch.testing.assert_close(torch.tensor(targets, dtype=D64), torch.tensor(expected, dtype=D64), rtol=0, atol=1e-9)
        assert any(t != 0 for row in targets for t in row)


def cagrad_problem(gram_: torch.Tensor, c: float):
    """CAGrad's dual as `cagrad_weights` poses it: (M scaled, b, φ, f)."""
    K = gram_.shape[0]
    m = (gram_ / (gram_.trace() / K)).numpy()
    b = m.sum(1) / K
    phi = c * math.sqrt(m.sum()) / K
    return m, b, phi, lambda w: float(w @ b + phi * math.sqrt(max(float(w @ m @ w), 0.0)))


@pytest.mark.parametrize("seed", range(9))
@pytest.mark.parametrize("from_vertex", [False, True])
def test_cagrad_active_set_reaches_the_slsqp_optimum(seed: int, from_vertex: bool, monkeypatch) -> None:
    """The active-set solver against the official code's solver (scipy SLSQP, ftol 1e-14) on
    random full-rank gradients: the same objective to 1e-10 (never worse), a point of the
    simplex, and the KKT certificate (it did not fall back). `from_vertex` starts from the best
    vertex instead of the warm start, which exercises adding and dropping tasks."""
    from scipy.optimize import minimize  # scipy comes with the dev extra (scikit-learn)

    if from_vertex:
        def vertex(m, b, phi):
            w = np.zeros(len(b))
            w[int(np.argmin(b + phi * np.sqrt(np.diag(m))))] = 1.0
            return w, [int(np.argmax(w))]

        monkeypatch.setattr(cagrad, "_warm_start", vertex)
    T, c = [3, 8, 32][seed % 3], [0.05, 0.4, 2.0][seed // 3]
    g = random_gradients(seed, T, 60)
    m, b, phi, f = cagrad_problem(g @ g.T, c)
    w = cagrad.face_weights(m, b, phi)
    assert w is not None
    assert float(w.sum()) == pytest.approx(1.0, abs=1e-12) and bool((w >= 0).all())
    ref = minimize(f, np.full(T, 1 / T), method="SLSQP", bounds=[(0, 1)] * T,
                   constraints={"type": "eq", "fun": lambda x: x.sum() - 1}, options={"ftol": 1e-14, "maxiter": 1000})
    assert f(w) <= f(ref.x) + 1e-10
    assert f(w) == pytest.approx(f(ref.x), abs=1e-6)


def test_cagrad_falls_back_to_frank_wolfe_when_tasks_outnumber_dimensions() -> None:
    """8 gradients in R^3: M is singular on large faces; the Frank-Wolfe fallback still gives a
    point of the simplex no worse than the uniform weights, and finite coefficients."""
    g = random_gradients(1, 8, 3)
    m, b, phi, f = cagrad_problem(g @ g.T, 0.4)
    w = cagrad.cagrad_weights((g @ g.T).numpy(), 0.4)
    assert float(w.sum()) == pytest.approx(1.0) and bool((w >= -1e-12).all())
    assert f(w) <= f(np.full(8, 1 / 8)) + 1e-12
    assert bool(torch.isfinite(cagrad_coefficients(g @ g.T, 0.4)).all())


# --------------------------------------------------------------------------- mixed precision
@pytest.mark.parametrize("method", [m for m, c in WEIGHTINGS.items() if c.gradients != "none"])
def test_gradient_methods_run_finite_under_bf16_autocast(method: str) -> None:
    model = Toy()
    weighting = build_weighting(WeightingConfig(method), TASKS)
    x, y, masks = global_batch(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z, losses = model(x, y, masks)
    ctx = context(model, z, masks, lambda t: t)
    total, weights = weighting.combine(losses, ctx)
    total.backward()
    weighting.before_step()
    assert math.isfinite(float(total.detach())) and all(math.isfinite(w) for w in weights.values())
    assert all(bool(torch.isfinite(p.grad).all()) for p in model.parameters() if p.grad is not None)


# --------------------------------------------------------------------------- exact across ranks
TASKS = {"a": TaskConfig("regression"), "b": TaskConfig("regression"), "c": TaskConfig("regression")}
# No collective: exact only when every rank holds the same number of each task's labels.
NO_COLLECTIVE = {"equal", "static", "rlw"}
STEPS, BATCH = 4, 16


class Toy(nn.Module):
    """Shared trunk [B, 4] -> [B, 6], one linear head per task; masked mean losses."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Linear(4, 6)
        self.heads = nn.ModuleDict({t: nn.Linear(6, 1) for t in TASKS})

    def forward(self, x, y, masks):
        z = torch.tanh(self.trunk(x))
        losses = {}
        for i, (t, head) in enumerate(self.heads.items()):
            err = (head(z).squeeze(-1) - y[:, i]).float().pow(2)
            losses[t] = (err * masks[:, i]).sum() / masks[:, i].sum().clamp_min(1)  # 0 in-graph if none
        return z, losses


def global_batch(step: int, balanced: bool = False):
    """The step's fixed global batch; task c has no label in the second half (rank 1's), and
    b none in the first half at step 2 — unless `balanced`."""
    gen = torch.Generator().manual_seed(100 + step)
    x = torch.randn(BATCH, 4, generator=gen)
    y = torch.stack([2 * x[:, 0], x[:, 1] - x[:, 2], (x[:, 3] > 0).float()], 1) + 0.1 * torch.randn(BATCH, 3, generator=gen)
    masks = torch.ones(BATCH, 3)
    if not balanced:
        masks[BATCH // 2 :, 2] = 0
        if step == 2:
            masks[: BATCH // 2, 1] = 0
    return x, y, masks


def context(model: Toy, z, masks, all_reduce_mean, step: int = 0) -> WeightingContext:
    return WeightingContext(
        step=step, representation=z, last_shared_layer=list(model.trunk.parameters()),
        shared_params=list(model.trunk.parameters()), all_reduce_mean=all_reduce_mean,
        local_counts={t: int(masks[:, i].sum()) for i, t in enumerate(TASKS)},
    )


def train(method: str, rank: int, world: int, all_reduce_mean) -> torch.Tensor:
    """STEPS steps of plain SGD as the trainer does them (backward, ranks' gradients averaged
    like DDP, then before_step); returns every parameter flattened."""
    model = Toy()
    weighting = build_weighting(WeightingConfig(method), TASKS)
    params = [*model.parameters(), *weighting.parameters()]
    for step in range(STEPS):
        x, y, masks = global_batch(step, balanced=method in NO_COLLECTIVE)
        half = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
        z, losses = model(x[half], y[half], masks[half])
        total, _ = weighting.combine(losses, context(model, z, masks[half], all_reduce_mean, step))
        for p in params:
            p.grad = None
        total.backward()
        with torch.no_grad():
            for p in params:
                if p.grad is not None:
                    p.grad.copy_(all_reduce_mean(p.grad))
            weighting.before_step()
            for p in params:
                if p.grad is not None:
                    p -= 0.1 * p.grad
    return torch.cat([p.detach().reshape(-1) for p in params])


def _rank_train(rank: int, world: int, store: str, out) -> None:
    with gloo_group(rank, world, store):
        for method in WEIGHTINGS:
            result = train(method, rank, world, all_reduce_mean)
            if rank == 0:
                out[method] = result.tolist()


@pytest.fixture(scope="module")
def two_rank_params(tmp_path_factory):
    out = mp.Manager().dict()
    store = os.fspath(tmp_path_factory.mktemp("store") / "store")
    mp.spawn(_rank_train, args=(2, store, out), nprocs=2, join=True)
    return dict(out)


@pytest.mark.parametrize("method", list(WEIGHTINGS))
def test_two_ranks_train_like_one_process_on_the_whole_batch(method: str, two_rank_params) -> None:
    """Relative tolerance 1e-5 on every parameter after 4 steps (float32 model; the two runs
    only differ in the order of the sums)."""
    torch.set_num_threads(1)
    one = train(method, 0, 1, lambda t: t)
    two = torch.tensor(two_rank_params[method], dtype=one.dtype)
    moved = train(method, 0, 1, lambda t: t)  # deterministic reference
    torch.testing.assert_close(one, moved, rtol=0, atol=0)
    torch.testing.assert_close(two, one, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- refused at config time
RECIPE = """
data:
  sources:
    - {name: s, train: data/x/train, inputs: [x], labels: {a: y_a, b: y_b}}
tasks:
  a: {type: regression}
  b: {type: binary}
engine: {name: deepspeed, deepspeed: {zero_optimization: {stage: 3}}}
"""


@pytest.mark.parametrize("method", list(WEIGHTINGS))
def test_zero3_and_deepspeed_refusals_follow_each_methods_path(method: str, tmp_path) -> None:
    from manytask.config import load_config
    from manytask.schema import ConfigError

    path = tmp_path / "r.yaml"
    path.write_text(RECIPE)
    cls = WEIGHTINGS[method]
    if 3 not in cls.deepspeed_stages:  # db_mtl: whole per-task gradients as state
        with pytest.raises(ConfigError, match=rf"'weighting.name'.*{method} runs under DeepSpeed only at ZeRO stages 0, 1, 2, not stage 3"):
            load_config(path, [f"weighting.name={method}"])
        load_config(path, [f"weighting.name={method}", "engine.deepspeed.zero_optimization.stage=2"])
    else:  # the others run under ZeRO-3 (tests/test_weightings_zero.py)
        assert load_config(path, [f"weighting.name={method}"]).weighting.name == method
