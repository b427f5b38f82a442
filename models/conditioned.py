"""Task-conditioned network: one shared trunk told which task (source) each sample is from.

encoder -> `hidden` MLP -> combine with a code of the task id -> `post_hidden` MLP -> towers.
The task id is the sample's `source_id` (a source is the task descriptor); its code is a
one-hot `[B, num_sources]` or a learned embedding, combined by
- `concat`:   [h, code]                                  (width D + code width)
- `add`:      h + P(code)                                (P: learned, to width D)
- `multiply`: h * (1 + P(code))   FiLM-style gating, starts as the identity (P = 0)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from manytask.models.encoders import EncoderParams, InputEncoder
from manytask.models.layers import Activation, last_linear, mlp
from manytask.models.spec import ModelOutput, ModelSpec
from manytask.models.towers import Towers
from manytask.schema import ConfigError, load_dataclass


@dataclass
class ConditionedParams:
    encoder: EncoderParams = field(default_factory=EncoderParams)
    task_code: Literal["onehot", "embedding"] = "embedding"
    task_embedding_dim: int = 8  # code width for concat with task_code=embedding
    combine: Literal["concat", "add", "multiply"] = "concat"
    hidden: list[int] = field(default_factory=lambda: [64])  # before the task code joins
    post_hidden: list[int] = field(default_factory=lambda: [64])  # after it joins
    tower_hidden: list[int] = field(default_factory=lambda: [32])
    num_sources: int = 0  # 0 = len(spec.sources)
    activation: Activation = "relu"

    def validate(self, file: str | None) -> None:
        if self.task_embedding_dim < 1:
            where = f" in {file}" if file else ""
            raise ConfigError(f"'model.params.task_embedding_dim'{where}: must be >= 1")


class Conditioned(nn.Module):
    """forward(inputs, source_id `[B]` long) -> outputs {task: `[B, out_dim]`}, shared = the
    trunk output after conditioning `[B, post_hidden[-1]]`."""

    def __init__(self, spec: ModelSpec, p: ConditionedParams):
        super().__init__()
        self.num_sources = p.num_sources or len(spec.sources)
        if self.num_sources < 1:
            raise ConfigError(
                "model 'conditioned' needs the task ids: ModelSpec.sources is empty "
                "(or set model.params.num_sources)"
            )
        self.combine, self.task_code = p.combine, p.task_code
        self.encoder = InputEncoder(spec.inputs, p.encoder)
        self.pre = mlp(self.encoder.out_dim, p.hidden, p.activation)
        d = p.hidden[-1] if p.hidden else self.encoder.out_dim
        if p.combine == "concat":
            code_dim = self.num_sources if p.task_code == "onehot" else p.task_embedding_dim
            self.code: nn.Module | None = (
                None if p.task_code == "onehot" else nn.Embedding(self.num_sources, code_dim)
            )
            post_in = d + code_dim
        else:
            # P(one-hot) is a bias-free linear map, i.e. a row lookup like the embedding; the
            # two differ only in their initialisation (uniform vs normal).
            self.code = (
                nn.Linear(self.num_sources, d, bias=False)
                if p.task_code == "onehot"
                else nn.Embedding(self.num_sources, d)
            )
            if p.combine == "multiply":
                nn.init.zeros_(self.code.weight)  # start as the identity gate
            post_in = d
        self.post = mlp(post_in, p.post_hidden, p.activation)
        width = p.post_hidden[-1] if p.post_hidden else post_in
        self.towers = Towers(width, p.tower_hidden, spec.tasks, p.activation)

    def _code(self, source_id: torch.Tensor) -> torch.Tensor:
        if self.task_code == "onehot":
            onehot = F.one_hot(source_id.long(), self.num_sources).float()  # [B, S]
            return onehot if self.code is None else self.code(onehot)
        return self.code(source_id.long())

    def forward(self, inputs: dict[str, torch.Tensor], source_id: torch.Tensor) -> ModelOutput:
        h = self.pre(self.encoder(inputs))  # [B, D]
        code = self._code(source_id)  # [B, code width]
        if self.combine == "concat":
            z = torch.cat([h, code.to(h.dtype)], dim=1)
        elif self.combine == "add":
            z = h + code
        else:
            z = h * (1.0 + code)
        shared = self.post(z)
        return ModelOutput(self.towers(shared), shared=shared)

    def shared_parameters(self) -> list[nn.Parameter]:
        params = [*self.encoder.parameters(), *self.pre.parameters(), *self.post.parameters()]
        return params + (list(self.code.parameters()) if self.code is not None else [])

    def last_shared_parameters(self) -> list[nn.Parameter]:
        return last_linear(self.post) or last_linear(self.pre) or self.encoder.output_parameters()

    def task_parameters(self) -> dict[str, list[tuple[nn.Parameter, int | None]]]:
        return self.towers.task_parameters()


def build(params: dict, spec: ModelSpec) -> Conditioned:
    return Conditioned(spec, load_dataclass(ConditionedParams, params, prefix="model.params"))
