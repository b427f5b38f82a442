"""The per-member expert layout ZeRO-3 builds (`expert_layout`): one module per expert, so ZeRO-3
gathers and reduces one expert at a time — the same model as the stacked layout: same initial
values, same outputs and gradients, same random stream afterwards; `auto` picks it only inside
`sharded_layout()` (what `engines.model_construction` enters for ZeRO-3)."""

from __future__ import annotations

import torch
from test_models_units import make_inputs, make_labels, make_spec

from manytask.config import ModelConfig
from manytask.models import build_model
from manytask.models.layers import MemberLinear, StackedLinear, StackedMLP, sharded_layout
from manytask.models.losses import task_losses

torch.set_num_threads(1)

PARAMS = {"num_experts": 3, "expert_hidden": [8, 5], "tower_hidden": [4]}


def build(layout: str, seed: int = 7) -> tuple[torch.nn.Module, torch.Tensor]:
    """The MMoE in `layout`, and the next draw of the global generator after building it."""
    torch.manual_seed(seed)
    model = build_model(ModelConfig("mmoe", {**PARAMS, "expert_layout": layout}), make_spec())
    return model, torch.rand(4)


def test_per_member_layout_is_the_stacked_model_one_expert_per_module():
    stacked, after_stacked = build("stacked")
    members, after_members = build("per_member")
    assert torch.equal(after_stacked, after_members)  # the random stream continues identically
    assert not any(isinstance(m, StackedLinear) for m in members.experts.modules())
    per_expert = [[m for m in member.modules() if isinstance(m, MemberLinear)] for member in members.experts.members]
    assert [len(layers) for layers in per_expert] == [2, 2, 2]  # experts x layers, each its own module
    for j, layer in enumerate(stacked.experts.layers):  # member i's layer j is slice i, value for value
        assert torch.equal(layer.weight, torch.stack([per_expert[i][j].weight for i in range(3)]))
        assert torch.equal(layer.bias, torch.stack([per_expert[i][j].bias for i in range(3)]))
    shared = {n: p for n, p in stacked.named_parameters() if not n.startswith("experts.")}
    assert all(torch.equal(p, dict(members.named_parameters())[n]) for n, p in shared.items())

    inputs, source = make_inputs()
    outs = [model(inputs, source) for model in (stacked, members)]
    for task, y in outs[0].outputs.items():
        torch.testing.assert_close(outs[1].outputs[task], y, rtol=1e-6, atol=1e-6)
    masks = {t: torch.ones(16, dtype=torch.bool) for t in make_spec().tasks}
    for out in outs:
        sum(task_losses(out.outputs, make_labels(), masks, make_spec().tasks).values()).backward()
    for j, layer in enumerate(stacked.experts.layers):
        torch.testing.assert_close(torch.stack([per_expert[i][j].weight.grad for i in range(3)]), layer.weight.grad,
                                   rtol=1e-5, atol=1e-6)
    # GradNorm's "last shared layer": every expert's last layer, as the stacked last layer is
    assert [p.shape for p in members.last_shared_parameters()] == [torch.Size([8, 5]), torch.Size([5])] * 3


def test_auto_layout_is_per_member_only_when_built_for_a_sharding_engine():
    assert isinstance(build("auto")[0].experts.layers[0], StackedLinear)
    with sharded_layout():
        sharded = build("auto")[0]
        assert isinstance(build("stacked")[0].experts.layers[0], StackedLinear)  # an explicit choice wins
    assert sharded.experts.members is not None and len(sharded.experts.layers) == 0
    assert isinstance(build("auto")[0].experts.layers[0], StackedLinear)  # the context is left behind


def test_member_parameters_are_whole_tensors_in_the_per_member_layout():
    mlp = StackedMLP(4, 6, [3], per_member=True)
    params = mlp.member_parameters(2)
    assert [(p.shape, idx) for p, idx in params] == [(torch.Size([6, 3]), None), (torch.Size([3]), None)]
    assert all(p is q for (p, _), q in zip(params, mlp.members[2].parameters()))


def test_state_dicts_do_not_depend_on_the_layout():
    """Checkpoints, export and init_from read the stacked names and shapes from either layout."""
    stacked, _ = build("stacked")
    members, _ = build("per_member", seed=8)  # other values, to see them overwritten
    saved = members.state_dict()
    assert set(stacked.state_dict()) == set(saved)
    assert not torch.equal(saved["experts.layers.1.weight"], stacked.state_dict()["experts.layers.1.weight"])
    members.load_state_dict(stacked.state_dict())  # stacked -> per member
    for name, value in stacked.state_dict().items():
        assert torch.equal(members.state_dict()[name], value), name
    fresh, _ = build("stacked", seed=9)
    fresh.load_state_dict(members.state_dict())  # per member -> stacked
    inputs, source = make_inputs()
    torch.testing.assert_close(fresh(inputs, source).outputs["price"], members(inputs, source).outputs["price"])
    # live parameters (keep_vars=True, what init_from writes into) keep their own names
    assert "experts.members.0.0.weight" in members.state_dict(keep_vars=True)
