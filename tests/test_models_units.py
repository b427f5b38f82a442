"""Model building blocks: batched experts match a looped reference, gates, masked towers,
soft-sharing penalty, params validation, losses."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from manytask.config import ModelConfig
from manytask.models import MODELS, build_model
from manytask.models.encoders import EncoderParams, InputEncoder
from manytask.models.losses import predictions, task_loss, task_losses
from manytask.models.spec import FieldSpec, ModelSpec, TaskSpec
from manytask.schema import ConfigError

torch.set_num_threads(1)

TASKS = {
    "price": TaskSpec("regression", 1),
    "click": TaskSpec("binary", 1),
    "genre": TaskSpec("multiclass", 3),
    "tags": TaskSpec("multilabel", 4),
}


def make_spec(tasks=TASKS) -> ModelSpec:
    inputs = {
        "x": FieldSpec("float32", (6,)),
        "user": FieldSpec("int64", (), vocab=11),
        "items": FieldSpec("int64", (3,), vocab=7),
    }
    return ModelSpec(inputs=inputs, tasks=dict(tasks), sources=["a", "b"])


def make_inputs(B: int = 16, seed: int = 0) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    inputs = {
        "x": torch.randn(B, 6, generator=g),
        "user": torch.randint(0, 11, (B,), generator=g),
        "items": torch.randint(0, 7, (B, 3), generator=g),
    }
    return inputs, torch.randint(0, 2, (B,), generator=g)


def make_labels(B: int = 16, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "price": torch.randn(B, generator=g),
        "click": torch.randint(0, 2, (B,), generator=g),
        "genre": torch.randint(0, 3, (B,), generator=g),
        "tags": torch.randint(0, 2, (B, 4), generator=g).float(),
    }


# -- batched experts == looped reference -------------------------------------------------


def looped_mmoe(model, inputs):
    """MMoE recomputed one expert, one gate, one tower at a time from the model's weights."""
    h = model.encoder(inputs)
    experts = []
    for e in range(model.experts.n):
        z = h
        for layer in model.experts.layers:
            z = torch.relu(z @ layer.weight[e] + layer.bias[e])
        experts.append(z)
    outputs = {}
    for t, name in enumerate(model.task_names):
        w = torch.softmax((h @ model.gates.weight[t].T + model.gates.bias[t]) / model.gates.temperature, -1)
        mixed = sum(w[:, e : e + 1] * experts[e] for e in range(len(experts)))
        for g, members in enumerate(model.towers.group_tasks):
            if t in members:
                i = members.index(t)
                z = mixed
                layers = model.towers.groups[g].layers
                for k, layer in enumerate(layers):
                    z = z @ layer.weight[i] + layer.bias[i]
                    if k < len(layers) - 1:
                        z = torch.relu(z)
                outputs[name] = z
    return outputs


def test_batched_mmoe_matches_looped_reference_forward_and_gradients():
    torch.manual_seed(0)
    params = {"num_experts": 5, "expert_hidden": [12, 8], "tower_hidden": [6], "gate_temperature": 0.7}
    model = build_model(ModelConfig("mmoe", params), make_spec()).double()
    inputs, sid = make_inputs()
    inputs["x"] = inputs["x"].double()
    batched = model(inputs, sid).outputs
    looped = looped_mmoe(model, inputs)
    for name in TASKS:
        torch.testing.assert_close(batched[name], looped[name])

    def grads(outputs):
        model.zero_grad()
        sum((o * (k + 1)).pow(2).sum() for k, o in enumerate(outputs.values())).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    g_batched = grads(model(inputs, sid).outputs)
    g_looped = grads(looped_mmoe(model, inputs))
    for name in g_batched:
        torch.testing.assert_close(g_batched[name], g_looped[name], msg=name)


@pytest.mark.parametrize("chunk_elements", [1 << 20, 40])  # one chunk, and many uneven ones
def test_fused_mixture_tower_layer_matches_plain_path_many_tasks(monkeypatch, chunk_elements):
    """MMoE with 9 same-shaped tasks (+1 of another width): the CPU path that fuses the gate
    mixture into the first tower layer equals mix-then-towers, forward and every gradient."""
    from manytask.models import mixed_linear

    monkeypatch.setattr(mixed_linear, "CHUNK_ELEMENTS", chunk_elements)
    tasks = {f"t{i}": TaskSpec("binary", 1) for i in range(9)} | {"genre": TaskSpec("multiclass", 3)}
    torch.manual_seed(0)
    params = {"num_experts": 3, "expert_hidden": [7], "tower_hidden": [5, 4], "gate_dropout": 0.0}
    model = build_model(ModelConfig("mmoe", params), make_spec(tasks)).double()
    inputs, sid = make_inputs(B=13)
    inputs["x"] = inputs["x"].double()

    def run(fused: bool):
        monkeypatch.setattr("manytask.models.towers.use_fused", lambda w, width: fused)
        model.zero_grad()
        out = model(inputs, sid).outputs
        sum((o * (k + 1)).pow(2).sum() for k, o in enumerate(out.values())).backward()
        return out, {n: p.grad.clone() for n, p in model.named_parameters()}

    out_f, g_f = run(True)
    out_p, g_p = run(False)
    for name in tasks:
        torch.testing.assert_close(out_f[name], out_p[name])
    for name in g_p:
        torch.testing.assert_close(g_f[name], g_p[name], msg=name)


def test_mixed_linear_gradcheck_across_chunks(monkeypatch):
    from manytask.models import mixed_linear

    monkeypatch.setattr(mixed_linear, "CHUNK_ELEMENTS", 50)
    g = torch.Generator().manual_seed(0)
    G, B, E, D, H = 4, 9, 3, 5, 2
    w = torch.softmax(torch.randn(B, G, E, dtype=torch.float64, generator=g), -1).requires_grad_()
    experts = torch.randn(B, E, D, dtype=torch.float64, generator=g).requires_grad_()
    weight = torch.randn(G, D, H, dtype=torch.float64, generator=g, requires_grad=True)
    bias = torch.randn(G, H, dtype=torch.float64, generator=g, requires_grad=True)
    args = (w.transpose(0, 1), experts.transpose(0, 1), weight, bias)
    assert torch.autograd.gradcheck(mixed_linear.mixed_linear, args)


def test_stacked_dot_matches_baddbmm_and_gradchecks():
    """Width-1 stacked layers (every binary/regression tower's last layer) take the M=1 GEMM
    path on CPU: same values as baddbmm, correct gradients, and ReLU may follow in place."""
    from manytask.models.layers import StackedLinear, out_dim_one_fast, stacked_dot

    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 11, 7, dtype=torch.float64, generator=g, requires_grad=True)
    weight = torch.randn(5, 7, 1, dtype=torch.float64, generator=g, requires_grad=True)
    bias = torch.randn(5, 1, dtype=torch.float64, generator=g, requires_grad=True)
    assert out_dim_one_fast(x, weight)
    torch.testing.assert_close(stacked_dot(x, weight, bias), torch.baddbmm(bias.unsqueeze(1), x, weight))
    assert torch.autograd.gradcheck(stacked_dot, (x, weight, bias))
    assert not out_dim_one_fast(x, torch.randn(5, 7, 2, dtype=torch.float64))  # width 2: baddbmm

    (grad_w,) = torch.autograd.grad(stacked_dot(x, weight, bias).sum(), weight)
    assert grad_w.stride() == weight.stride()  # the gradient layout contract DDP relies on

    layer = StackedLinear(5, 7, 1).double()
    scale = torch.arange(11.0, dtype=torch.float64)[:, None]
    for relu in (False, True):
        y = layer(x, relu=relu)
        ref = torch.baddbmm(layer.bias.unsqueeze(1), x, layer.weight)
        ref = ref.relu() if relu else ref
        torch.testing.assert_close(y, ref)
        (grad,) = torch.autograd.grad((y * scale).sum(), x)
        (grad_ref,) = torch.autograd.grad((ref * scale).sum(), x)
        torch.testing.assert_close(grad, grad_ref)


def test_ple_grouped_experts_match_looped_reference():
    from manytask.models.ple import GroupedLinear

    torch.manual_seed(0)
    layer = GroupedLinear(3, 2, 5, 4).double()
    x_shared = torch.randn(7, 5, dtype=torch.float64)
    x_group = torch.randn(3, 7, 5, dtype=torch.float64)
    x_each = torch.randn(3, 2, 7, 5, dtype=torch.float64)
    for x in (x_shared, x_group, x_each):
        y = layer(x)
        assert y.shape == (3, 2, 7, 4)
        for g in range(3):
            for k in range(2):
                xi = x if x.dim() == 2 else x[g] if x.dim() == 3 else x[g, k]
                torch.testing.assert_close(y[g, k], xi @ layer.weight[g, k] + layer.bias[g, k])
        x = x.clone().requires_grad_()
        call = lambda x, w, b: torch.func.functional_call(layer, {"weight": w, "bias": b}, (x,))  # noqa: E731
        assert torch.autograd.gradcheck(call, (x, layer.weight, layer.bias))


# -- gates --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mmoe", "omoe", "ple"])
def test_gate_weights_sum_to_one_and_stats_are_detached(name):
    torch.manual_seed(0)
    params = {"gate_temperature": 2.0}
    if name != "ple":
        params |= {"gate_dropout": 0.5, "gate_input": "embedding", "load_balance_weight": 0.1}
    else:
        params |= {"num_levels": 2, "task_experts": 2}
    model = build_model(ModelConfig(name, params), make_spec())
    model.train()
    out = model(*make_inputs(32))
    keys = {"mmoe": list(TASKS), "omoe": ["(shared)"]}.get(name)
    if name == "ple":  # every level's task gates, and the shared gate of every level but the last
        keys = [f"{t}/level{lv}" for lv in range(2) for t in TASKS] + ["(shared)/level0"]
    assert sorted(out.gate_means) == sorted(keys) == sorted(model.gate_experts())
    for key, means in out.gate_means.items():
        assert not means.requires_grad and means.dim() == 1
        assert means.numel() == len(model.gate_experts()[key])
        torch.testing.assert_close(means.sum(), torch.tensor(1.0))
        ent = out.gate_entropy[key]
        assert 0.0 <= ent.item() <= math.log(means.numel()) + 1e-6
    if name != "ple":
        w = model.gates(model.gate_embedding(model.encoder(make_inputs(32)[0])))
        torch.testing.assert_close(w.sum(-1), torch.ones(w.shape[:2]))
        assert (w == 0).any()  # gate dropout dropped some experts, and the rest renormalised
        assert out.aux_losses["load_balance"].item() >= 0.0
        assert out.shared.shape == (32, 4, 64)  # [B, E, D]


def test_load_balance_is_zero_for_uniform_gates():
    from manytask.models.gates import load_balance_loss

    assert load_balance_loss(torch.full((3, 10, 4), 0.25)).item() == pytest.approx(0.0, abs=1e-7)
    one_hot = torch.zeros(1, 10, 4)
    one_hot[..., 0] = 1
    assert load_balance_loss(one_hot).item() == pytest.approx(3.0)


@pytest.mark.parametrize("name", ["multi_head", "mmoe", "omoe", "ple", "conditioned"])
def test_every_task_loss_reaches_the_shared_representation(name):
    """MGDA-UB differentiates each task's loss against `out.shared`: it must lie upstream of every
    tower (a detached view gives no gradient, and MGDA then silently weighs tasks uniformly)."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(name, {}), make_spec())
    out = model(*make_inputs())
    assert out.shared is not None and out.shared.shape[0] == 16  # leading batch dim
    masks = {t: torch.ones(16, dtype=torch.bool) for t in TASKS}
    losses = task_losses(out.outputs, make_labels(), masks, model_spec_tasks(model))
    for task, loss in losses.items():
        (g,) = torch.autograd.grad(loss, out.shared, retain_graph=True, allow_unused=True)
        assert g is not None and g.abs().sum() > 0, f"{name}: {task}'s loss does not reach out.shared"


# -- masked task: exactly zero gradient on its tower ------------------------------------------


@pytest.mark.parametrize("name", ["multi_head", "soft_sharing", "mmoe", "omoe", "ple", "conditioned"])
def test_masked_task_gets_exactly_zero_gradient_on_its_parameters(name):
    torch.manual_seed(0)
    # soft sharing couples the bodies through its penalty; without it they are independent
    params = {"penalty_weight": 0.0} if name == "soft_sharing" else {}
    model = build_model(ModelConfig(name, params), make_spec())
    inputs, sid = make_inputs()
    out = model(inputs, sid)
    masks = {t: torch.ones(16, dtype=torch.bool) for t in TASKS}
    masks["genre"] = torch.zeros(16, dtype=torch.bool)
    losses = task_losses(out.outputs, make_labels(), masks, model_spec_tasks(model))
    (sum(losses.values()) + sum(out.aux_losses.values())).backward()
    owned = model.task_parameters()
    assert set(owned) == set(TASKS)
    for task, params_of_task in owned.items():
        for p, i in params_of_task:
            g = p.grad if i is None else p.grad[i]
            if task == "genre":
                assert torch.equal(g, torch.zeros_like(g)), f"{task} got a gradient"
            else:
                assert g.abs().sum() > 0, f"{task} got no gradient"
    assert all(p.grad is not None for p in model.parameters())  # DDP sees every parameter


def model_spec_tasks(model) -> dict[str, TaskSpec]:
    return dict(TASKS)


def test_parameter_roles_cover_every_parameter_once():
    for name in ["multi_head", "soft_sharing", "mmoe", "omoe", "ple", "conditioned"]:
        model = build_model(ModelConfig(name, {}), make_spec())
        whole = [id(p) for p in model.shared_parameters()]
        sliced = set()
        for params in model.task_parameters().values():
            whole += [id(p) for p, i in params if i is None]
            sliced |= {id(p) for p, i in params if i is not None}
        assert len(whole) == len(set(whole)), name
        assert set(whole) | sliced == {id(p) for p in model.parameters()}, name
        assert not set(whole) & sliced, name
        assert model.last_shared_parameters(), name


# -- soft sharing --------------------------------------------------------------------------


def test_soft_sharing_penalty_zero_for_equal_towers_positive_otherwise():
    torch.manual_seed(0)
    model = build_model(ModelConfig("soft_sharing", {"penalty_weight": 0.5, "hidden": [8, 8]}), make_spec())
    with torch.no_grad():
        for p in model.bodies.parameters():
            p.copy_(p[:1].expand_as(p))
    out = model(*make_inputs())
    assert out.aux_losses["soft_sharing"].item() == 0.0
    with torch.no_grad():
        model.bodies.layers[0].weight[2, 0, 0] += 0.1
    out = model(*make_inputs())
    # one entry differs by 0.1 from 3 other members: 3 pairs of 0.01 over 6 pairs, x 0.5
    assert out.aux_losses["soft_sharing"].item() == pytest.approx(0.5 * 3 * 0.01 / 6, rel=1e-4)
    out.aux_losses["soft_sharing"].backward()
    assert model.bodies.layers[0].weight.grad[2, 0, 0] > 0


# -- params validation ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, params, wanted",
    [
        ("mmoe", {"num_expert": 4}, "model.params.num_experts"),
        ("mmoe", {"encoder": {"embeding_dim": 4}}, "model.params.encoder.embedding_dim"),
        ("multi_head", {"tower_hiden": [8]}, "model.params.tower_hidden"),
        ("ple", {"shared_expert": 2}, "model.params.shared_experts"),
        ("conditioned", {"combine": "concatenate"}, "'concat'"),
        ("soft_sharing", {"penalty_wieght": 1.0}, "model.params.penalty_weight"),
        ("timeseries", {"residual_forcast": True}, "model.params.residual_forecast"),
        ("single_task", {"hiden": [8]}, "model.params.hidden"),
    ],
)
def test_typo_in_params_names_the_closest_key(name, params, wanted):
    with pytest.raises(ConfigError, match="did you mean") as err:
        build_model(ModelConfig(name, params), make_spec())
    assert wanted in str(err.value)


def test_unknown_model_and_wrong_types_are_config_errors():
    with pytest.raises(ConfigError, match="did you mean 'mmoe'"):
        build_model(ModelConfig("mmeo", {}), make_spec())
    with pytest.raises(ConfigError, match="num_experts"):
        build_model(ModelConfig("mmoe", {"num_experts": "four"}), make_spec())
    with pytest.raises(ConfigError, match="exactly one task"):
        build_model(ModelConfig("single_task", {}), make_spec())
    assert set(MODELS) >= {"multi_head", "soft_sharing", "mmoe", "omoe", "ple", "conditioned",
                           "timeseries", "single_task"}


# -- encoder -------------------------------------------------------------------------------


def test_encoder_parts_and_pooling():
    spec = make_spec()
    spec.inputs["series"] = FieldSpec("float32", (9, 2))
    inputs, _ = make_inputs(5)
    inputs["series"] = torch.randn(5, 9, 2)
    enc = InputEncoder(spec.inputs, EncoderParams(embedding_dim=4, rnn="lstm", rnn_hidden=3, dense_hidden=[10]))
    assert enc.dense_fields == ["x"] and enc.categorical_fields == ["user", "items"]
    assert enc.sequence_fields == ["series"]
    assert enc(inputs).shape == (5, 10 + 4 + 4 + 3) == (5, enc.out_dim)
    only = InputEncoder(spec.inputs, EncoderParams(fields=["items"], embedding_dim=4, pooling="sum"))
    table = only.embeddings[0].weight
    torch.testing.assert_close(only(inputs), table[inputs["items"]].sum(1))
    spec.inputs |= {"age": FieldSpec("float32", ()), "visits": FieldSpec("int32", (2,))}  # no vocab
    inputs |= {"age": torch.rand(5), "visits": torch.randint(0, 9, (5, 2), dtype=torch.int32)}
    dense = InputEncoder(spec.inputs, EncoderParams(fields=["x", "age", "visits"]))
    assert dense.dense_fields == ["x", "age", "visits"] and dense(inputs).shape == (5, 6 + 1 + 2)
    with pytest.raises(ConfigError, match="did you mean 'items'"):
        InputEncoder(spec.inputs, EncoderParams(fields=["itemz"]))


# -- losses --------------------------------------------------------------------------------


@pytest.mark.parametrize("task", list(TASKS) + ["horizon"])
def test_loss_with_all_false_mask_is_zero_finite_and_in_the_graph(task):
    spec = TASKS.get(task, TaskSpec("forecast", 5))
    out = torch.randn(8, spec.out_dim, requires_grad=True)
    label = torch.full((8, 5) if task == "horizon" else make_labels(8)[task].shape, float("nan"))
    if spec.type == "multiclass":
        label = torch.full((8,), -100, dtype=torch.long)  # garbage ids where masked
    loss = task_loss(spec, out, label, torch.zeros(8, dtype=torch.bool))
    assert loss.item() == 0.0 and torch.isfinite(loss)
    loss.backward()
    assert torch.equal(out.grad, torch.zeros_like(out))


def test_losses_match_torch_on_valid_samples_and_ignore_masked_labels():
    torch.manual_seed(0)
    mask = torch.tensor([True, False, True, True, False, True])
    labels = make_labels(6)
    outputs = {t: torch.randn(6, s.out_dim) for t, s in TASKS.items()}
    poisoned = {t: v.clone().float() if t != "genre" else v.clone() for t, v in labels.items()}
    for t in poisoned:
        poisoned[t][~mask] = 0 if t == "genre" else float("nan")
    losses = task_losses(outputs, poisoned, {t: mask for t in TASKS}, TASKS)
    m = mask
    expect = {
        "price": F.mse_loss(outputs["price"][m, 0], labels["price"][m]),
        "click": F.binary_cross_entropy_with_logits(outputs["click"][m, 0], labels["click"][m].float()),
        "genre": F.cross_entropy(outputs["genre"][m], labels["genre"][m]),
        "tags": F.binary_cross_entropy_with_logits(outputs["tags"][m], labels["tags"][m]),
    }
    for t in TASKS:
        torch.testing.assert_close(losses[t], expect[t])
    # label shapes [B, 1] work as well as [B]
    torch.testing.assert_close(
        task_loss(TASKS["click"], outputs["click"], labels["click"].view(6, 1), mask), expect["click"]
    )
    assert predictions(TASKS["click"], outputs["click"]).shape == (6,)
    torch.testing.assert_close(predictions(TASKS["genre"], outputs["genre"]).sum(1), torch.ones(6))
    assert predictions(TASKS["price"], outputs["price"]).shape == (6,)


def test_stacked_losses_of_same_shaped_tasks_equal_one_by_one():
    """Same-typed tasks go through one stacked loss: values and gradients equal the per-task
    losses, NaN labels under the mask stay harmless, an all-masked task is an exact 0."""
    g = torch.Generator().manual_seed(0)
    B = 10
    specs = {f"c{i}": TaskSpec("binary", 1) for i in range(4)} | {
        f"r{i}": TaskSpec("regression", 1) for i in range(3)
    } | {"genre": TaskSpec("multiclass", 3), "genre2": TaskSpec("multiclass", 3)}
    outputs = {t: torch.randn(B, s.out_dim, generator=g, dtype=torch.float64, requires_grad=True)
               for t, s in specs.items()}
    labels = {t: torch.randint(0, 2, (B,), generator=g).double() for t in specs if t[0] == "c"}
    labels |= {t: torch.randn(B, generator=g, dtype=torch.float64) for t in specs if t[0] == "r"}
    labels |= {t: torch.randint(0, 3, (B,), generator=g) for t in ("genre", "genre2")}
    masks = {t: torch.rand(B, generator=g) < 0.6 for t in specs}
    masks["c2"] = torch.zeros(B, dtype=torch.bool)
    for t in specs:
        if labels[t].is_floating_point():
            labels[t][~masks[t]] = float("nan")
    together = task_losses(outputs, labels, masks, specs)
    one_by_one = {t: task_loss(specs[t], outputs[t], labels[t], masks[t]) for t in specs}
    assert list(together) == list(specs) and together["c2"].item() == 0.0
    for t in specs:
        torch.testing.assert_close(together[t], one_by_one[t])
    grads = torch.autograd.grad(sum(together.values()), list(outputs.values()))
    expect = torch.autograd.grad(sum(one_by_one.values()), list(outputs.values()))
    for a, b in zip(grads, expect):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b)
