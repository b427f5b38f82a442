"""Building blocks shared by the architectures: plain MLPs and *stacked* layers.

A stacked layer holds the weights of n same-shaped layers (n experts, or n task towers) in one
tensor `[n, in, out]` and runs all of them in one batched matmul (`baddbmm`), so dozens of
experts or towers cost one kernel instead of a Python loop. Member i of a stacked layer is
`weight[i]`, `bias[i]`: that slice is what `task_parameters()` hands to the trainer.

A `StackedMLP` can instead hold each member as its own modules (`per_member=True`, the
"per-member layout"): the engines that shard per module — DeepSpeed ZeRO-3 gathers a module's
parameters around its forward and its backward — then gather and reduce one member at a time
instead of a whole `[n, in, out]` tensor. Same function, same initial values, n matmuls instead
of one; `expert_layout` in the model params chooses it (`auto`: under ZeRO-2/3, `sharded_layout`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from manytask.models.mixed_linear import mixed_linear

Activation = Literal["relu", "gelu", "silu", "tanh"]

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}

# How experts are held: one stacked tensor per layer, or one module per member; "auto" takes
# the per-member layout while the model is built under `sharded_layout()` (ZeRO-3).
ExpertLayout = Literal["auto", "stacked", "per_member"]
_SHARDED = ContextVar("manytask_sharded_layout", default=False)


@contextmanager
def sharded_layout() -> Iterator[None]:
    """Models built inside resolve `expert_layout: auto` to the per-member layout."""
    token = _SHARDED.set(True)
    try:
        yield
    finally:
        _SHARDED.reset(token)


def per_member(layout: ExpertLayout) -> bool:
    """Whether `layout` (a model's `expert_layout` param) means one module per member here."""
    return layout == "per_member" or (layout == "auto" and _SHARDED.get())


def mlp(
    in_dim: int,
    dims: list[int],
    activation: Activation = "relu",
    last_activation: bool = True,
    dropout: float = 0.0,
) -> nn.Sequential:
    """Linear layers of widths `dims` (`[B, in_dim]` -> `[B, dims[-1]]`; identity when empty).

    Every layer is followed by the activation (and dropout) except the last one when
    `last_activation` is False.
    """
    layers: list[nn.Module] = []
    for i, out_dim in enumerate(dims):
        layers.append(nn.Linear(in_dim, out_dim))
        if last_activation or i < len(dims) - 1:
            layers.append(ACTIVATIONS[activation]())
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
        in_dim = out_dim
    return nn.Sequential(*layers)


def last_linear(module: nn.Module) -> list[nn.Parameter]:
    """Parameters of the last `nn.Linear`, `StackedLinear` or RNN registered in `module`
    ([] when none): the "last shared layer" GradNorm measures gradient norms on."""
    last: nn.Module | None = None
    for sub in module.modules():
        if isinstance(sub, StackedMLP) and sub.members is not None:
            last = sub  # its members' last layers, not one member's
        elif isinstance(sub, (nn.Linear, StackedLinear, nn.RNNBase)):
            last = sub
    if isinstance(last, StackedMLP):
        return last.last_layer_parameters()
    return list(last.parameters()) if last is not None else []


def out_dim_one_fast(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """True where `stacked_dot` replaces `baddbmm`: width-1 outputs from per-member inputs,
    on CPU without autocast (GPUs keep baddbmm, which autocast follows)."""
    return (
        weight.shape[-1] == 1
        and x.dim() == 3
        and x.device.type == "cpu"
        and not torch.is_autocast_enabled("cpu")
        and x.dtype == weight.dtype
    )


def stacked_dot(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """`baddbmm(bias[:, None], x, weight)` for one output per member: x `[n, B, in]`, weight
    `[n, in, 1]`, bias `[n, 1]` -> `[n, B, 1]`.

    Every binary or regression tower ends in such a layer. As a bmm with one output column its
    forward and weight gradient are GEMMs with N=1 and its input gradient one with K=1, which
    CPU BLAS runs several times slower than the same products oriented as M=1 GEMMs (forward,
    weight gradient) and a broadcast multiply (input gradient) — a tenth of a 64-task step.
    """
    return _StackedDot.apply(x, weight, bias)


class _StackedDot(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        n, batch, _ = x.shape
        y = x.new_empty(n, batch, 1)  # [n, 1, B] and [n, B, 1] share one memory layout
        torch.baddbmm(bias.unsqueeze(-1), weight.transpose(1, 2), x.transpose(1, 2), out=y.view(n, 1, batch))
        ctx.save_for_backward(x, weight)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, weight = ctx.saved_tensors
        grad_row = grad_y.transpose(1, 2)  # [n, 1, B]
        grad_x = grad_y * weight.transpose(1, 2) if ctx.needs_input_grad[0] else None
        # [n, 1, in] viewed as [n, in, 1]: the parameter's own strides (DDP's bucket views
        # warn about, and copy, a gradient laid out otherwise)
        grad_w = torch.bmm(grad_row, x).view(weight.shape) if ctx.needs_input_grad[1] else None
        grad_b = grad_row.sum(-1) if ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b


class StackedLinear(nn.Module):
    """n independent linear layers in one tensor: weight `[n, in, out]`, bias `[n, out]`.

    forward: `[B, in]` (the same input for every member) or `[n, B, in]` -> `[n, B, out]`, one
    `baddbmm` either way. With `mix` (gate weights `[n, B, E]`), x is E expert outputs
    `[E, B, in]` and member k reads their mixture Σ_e mix[k, :, e] · x[e] (`mixed_linear`).
    Initialised like n separate `nn.Linear` layers.
    """

    def __init__(self, n: int, in_dim: int, out_dim: int):
        super().__init__()
        self.n, self.in_dim, self.out_dim = n, in_dim, out_dim
        self.weight = nn.Parameter(torch.empty(n, in_dim, out_dim))
        self.bias = nn.Parameter(torch.empty(n, out_dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.in_dim) if self.in_dim > 0 else 0.0
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor, relu: bool = False, mix: torch.Tensor | None = None) -> torch.Tensor:
        """relu=True applies ReLU in place on the fresh matmul output (one tensor fewer)."""
        if mix is None and x.dim() == 2:
            # One input for all members, expanded (no copy) to one baddbmm over the weights as
            # stored: no permuted weight copy in the forward, and the weight gradient comes out
            # of its bmm in the parameter's own layout. Against one [B, in] @ [in, n*out] GEMM
            # over permuted weights (the same matmul time in isolation), the bench MMoE step is
            # 4-13% faster for E = 4..16, and 5.6% at E = 8 when x requires grad (the backward
            # then sums an [n, B, in] input gradient).
            x = x.expand(self.n, *x.shape)
        if mix is not None:
            # Inside this module's forward, not beside it: ZeRO-3 gathers a module's partitioned
            # parameters around its forward and its backward, which mixed_linear's use.
            y = mixed_linear(mix, x, self.weight, self.bias)
        elif out_dim_one_fast(x, self.weight):
            y = stacked_dot(x, self.weight, self.bias)
        else:
            y = torch.baddbmm(self.bias.unsqueeze(1), x, self.weight)
        return torch.relu_(y) if relu else y

    def extra_repr(self) -> str:
        return f"n={self.n}, in_dim={self.in_dim}, out_dim={self.out_dim}"


class MemberLinear(nn.Module):
    """One member of a stacked layer as a module of its own: weight `[in, out]`, bias `[out]`
    (the slices `weight[i]`, `bias[i]` of a `StackedLinear`). forward: `[B, in]` -> `[B, out]`.

    Built by `member_layers`, which gives it the values StackedLinear would have drawn.
    """

    def __init__(self, in_dim: int, out_dim: int, bias: torch.Tensor):
        super().__init__()
        bound = 1.0 / math.sqrt(in_dim) if in_dim > 0 else 0.0
        # drawn from the CPU generator, as StackedLinear's values (built on CPU) are, and copied
        # to wherever tensors are made here (`deepspeed.zero.Init` makes them on the rank's device)
        self.weight = nn.Parameter(torch.empty(in_dim, out_dim))
        self.bias = nn.Parameter(torch.empty(out_dim))
        with torch.no_grad():
            self.weight.copy_(torch.empty(in_dim, out_dim, device="cpu").uniform_(-bound, bound))
            self.bias.copy_(bias)

    def forward(self, x: torch.Tensor, relu: bool = False) -> torch.Tensor:
        y = torch.addmm(self.bias, x, self.weight)
        return torch.relu_(y) if relu else y


def member_layers(n: int, in_dim: int, out_dim: int) -> list[MemberLinear]:
    """n `MemberLinear` holding exactly the values `StackedLinear(n, in_dim, out_dim)` would
    draw from the global CPU generator here (weight `[n, in, out]`, then bias `[n, out]`),
    leaving the generator where StackedLinear would — without ever holding `[n, in, out]`.

    CPU `uniform_` draws element by element, so member i's weight is the i-th `[in, out]` run of
    the stream; the biases come after all weights, so the weights are drawn twice (skipped once).
    """
    bound = 1.0 / math.sqrt(in_dim) if in_dim > 0 else 0.0
    start = torch.get_rng_state()
    for _ in range(n):
        torch.empty(in_dim, out_dim, device="cpu").uniform_(-bound, bound)
    biases = torch.empty(n, out_dim, device="cpu").uniform_(-bound, bound)
    end = torch.get_rng_state()
    torch.set_rng_state(start)
    members = [MemberLinear(in_dim, out_dim, biases[i]) for i in range(n)]
    torch.set_rng_state(end)
    return members


def _stack_members(module: StackedMLP, state: dict, prefix: str, _metadata: Any) -> None:
    """state_dict hook of the per-member layout: `members.{i}.{j}.weight` / `.bias` ->
    `layers.{j}.weight` `[n, in, out]` / `layers.{j}.bias` `[n, out]`, as the stacked layout
    saves them. Left as they are when they are live parameters (`keep_vars=True`: callers
    write into them) or ZeRO-3 partitions (empty placeholders, saved and loaded per member)."""
    for j in range(module.depth):
        for name in ("weight", "bias"):
            keys = [f"{prefix}members.{i}.{j}.{name}" for i in range(module.n)]
            parts = [state[k] for k in keys]
            expected = getattr(module.members[0][j], name).shape
            if any(isinstance(t, nn.Parameter) or t.numel() == 0 or t.shape != expected for t in parts):
                return
            for k in keys:
                del state[k]
            state[f"{prefix}layers.{j}.{name}"] = torch.stack(parts)


def _unstack_members(module: StackedMLP, state: dict, prefix: str, *_: Any) -> None:
    """load_state_dict pre-hook of the per-member layout: stacked-layout keys -> per member."""
    for j in range(module.depth):
        for name in ("weight", "bias"):
            stacked = state.pop(f"{prefix}layers.{j}.{name}", None)
            if stacked is not None:
                for i in range(module.n):
                    state[f"{prefix}members.{i}.{j}.{name}"] = stacked[i]


class StackedMLP(nn.Module):
    """n independent MLPs of identical shape, run as one batched op per layer.

    forward: `[B, in_dim]` or `[n, B, in_dim]` -> `[n, B, dims[-1]]` (`[n, B, in_dim]` when
    `dims` is empty). Activation after every layer, except the last when `last_activation`
    is False.

    per_member=True: member i is `members[i]`, its own `MemberLinear` per layer, run one member
    after the other (see the module docstring); `layers` is then empty. Same initial values.
    """

    def __init__(
        self,
        n: int,
        in_dim: int,
        dims: list[int],
        activation: Activation = "relu",
        last_activation: bool = True,
        dropout: float = 0.0,
        per_member: bool = False,
    ):
        super().__init__()
        self.n = n
        self.depth = len(dims)
        self.layers = nn.ModuleList()
        self.members: nn.ModuleList | None = None
        by_layer: list[list[MemberLinear]] = []
        for out_dim in dims:
            if per_member:
                by_layer.append(member_layers(n, in_dim, out_dim))
            else:
                self.layers.append(StackedLinear(n, in_dim, out_dim))
            in_dim = out_dim
        if per_member and dims:
            self.members = nn.ModuleList(nn.ModuleList(layer[i] for layer in by_layer) for i in range(n))
            # saved and loaded under the stacked layout's names and shapes: checkpoints, export
            # and init_from do not depend on the layout the model was trained in
            self.register_state_dict_post_hook(_stack_members)
            self.register_load_state_dict_pre_hook(_unstack_members)
        self.out_dim = in_dim
        self.activation = ACTIVATIONS[activation]()
        self.last_activation = last_activation
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.depth and x.dim() == 2:
            return x.unsqueeze(0).expand(self.n, -1, -1)
        if self.members is not None:
            return torch.stack([self._member_forward(i, x if x.dim() == 2 else x[i]) for i in range(self.n)])
        return self.after_layer(x, -1)

    def _member_forward(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Member i alone: `[B, in_dim]` -> `[B, out_dim]`."""
        for j, layer in enumerate(self.members[i]):
            fused = self._fuses_relu(j)
            x = layer(x, relu=fused)
            x = self._dropout(x) if fused else self._activate(x, j == self.depth - 1)
        return x

    def after_layer(self, x: torch.Tensor, i: int) -> torch.Tensor:
        """The rest of the MLP from layer i's output `x` (pre-activation); i = -1: the input.
        Stacked layout only."""
        if self.members is not None:
            raise NotImplementedError("StackedMLP.after_layer: the per-member layout runs whole members")
        last = len(self.layers) - 1
        if i >= 0 and self._fuses_relu(i):
            # the caller hands over a fresh layer output: ReLU in place, as inside the layers
            x = self._dropout(torch.relu_(x))
        elif i >= 0:
            x = self._activate(x, i == last)
        for j in range(i + 1, last + 1):
            # ReLU goes into the layer, in place on its fresh matmul output (one tensor fewer)
            fused = self._fuses_relu(j)
            x = self.layers[j](x, relu=fused)
            x = self._dropout(x) if fused else self._activate(x, j == last)
        return x

    def _fuses_relu(self, j: int) -> bool:
        return isinstance(self.activation, nn.ReLU) and (self.last_activation or j < self.depth - 1)

    def _activate(self, x: torch.Tensor, is_last: bool) -> torch.Tensor:
        if is_last and not self.last_activation:
            return x
        return self._dropout(self.activation(x))

    def _dropout(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(x, self.dropout, self.training) if self.dropout > 0 else x

    def member_parameters(self, i: int) -> list[tuple[nn.Parameter, int | None]]:
        """Member i's parameters as (stacked tensor, slice index along dim 0), or (its own
        tensor, None) in the per-member layout."""
        if self.members is not None:
            return [(p, None) for p in self.members[i].parameters()]
        return [(p, i) for p in self.parameters()]

    def last_layer_parameters(self) -> list[nn.Parameter]:
        """The last layer's parameters: one stacked weight and bias, or every member's."""
        if self.members is not None:
            return [p for member in self.members for p in member[-1].parameters()]
        return list(self.layers[-1].parameters()) if self.depth else []
