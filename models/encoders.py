"""The input encoder every architecture starts with: input fields -> one feature vector.

From the fields of `ModelSpec.inputs` (all of them unless `fields` names some):
- dense fields (float, bool, or int without a vocabulary) are flattened, concatenated and fed
  to an MLP (`dense_hidden`; empty = passed through unchanged);
- int fields with `vocab > 0` are looked up in an embedding table each (`embedding_dim`, one
  row per id of the manifest's vocabulary: `manytask shards write` reserves id 0 for unseen
  values); a multi-valued field `[k]` is pooled over its k ids (`pooling`: sum or mean), the
  field's padding id (`pad` in the manifest) left out — a row of padding pools to zeros;
- float fields shaped `[T, C]` are time series, encoded by an LSTM/GRU (`rnn`) whose last
  hidden state is the field's feature (list a field in `flatten` to treat it as dense).
The parts are concatenated in that order: `[B, out_dim]`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from manytask.models.layers import Activation, last_linear, mlp
from manytask.models.spec import FieldSpec
from manytask.schema import ConfigError, closest


@dataclass
class EncoderParams:
    fields: list[str] = field(default_factory=list)  # inputs to use; empty = every input field
    dense_hidden: list[int] = field(default_factory=list)  # MLP widths over dense fields
    embedding_dim: int = 16  # per categorical field
    pooling: Literal["sum", "mean"] = "mean"  # multi-valued categorical fields [k]
    rnn: Literal["gru", "lstm"] = "gru"  # time-series fields [T, C]
    rnn_hidden: int = 32
    rnn_layers: int = 1
    flatten: list[str] = field(default_factory=list)  # [T, C] float fields to treat as dense
    activation: Activation = "relu"

    def validate(self, file: str | None) -> None:
        for name in ("embedding_dim", "rnn_hidden", "rnn_layers"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"'model.params.encoder.{name}' in {file}: must be positive")


def _is_float(f: FieldSpec) -> bool:
    return f.dtype.startswith(("float", "bfloat", "half", "double"))


def _is_int(f: FieldSpec) -> bool:
    return f.dtype.startswith(("int", "uint"))


class InputEncoder(nn.Module):
    """`{field: [B, *shape]}` -> `[B, out_dim]` (see the module docstring for the parts)."""

    def __init__(self, inputs: dict[str, FieldSpec], p: EncoderParams):
        super().__init__()
        names = p.fields or list(inputs)
        for name in [*names, *p.flatten]:
            if name not in inputs:
                near = closest(name, inputs)
                fix = f"; did you mean '{near}'?" if near else ""
                raise ConfigError(
                    f"'model.params.encoder': unknown input field '{name}'{fix} "
                    f"(inputs: {', '.join(inputs)})"
                )
        self.dense_fields: list[str] = []
        self.categorical_fields: list[str] = []
        self.sequence_fields: list[str] = []
        for name in names:
            f = inputs[name]
            if _is_int(f) and f.vocab > 0:
                self.categorical_fields.append(name)
            elif _is_float(f) and len(f.shape) == 2 and name not in p.flatten:
                self.sequence_fields.append(name)
            else:
                self.dense_fields.append(name)
        if not names:
            raise ConfigError("'model.params.encoder': the model has no input fields")

        dense_dim = sum(math.prod(inputs[n].shape) for n in self.dense_fields)
        self.dense = mlp(dense_dim, p.dense_hidden, p.activation) if self.dense_fields else None
        dense_out = (p.dense_hidden[-1] if p.dense_hidden else dense_dim) if self.dense_fields else 0
        # Lists parallel to the field-name lists, not ModuleDicts: field names such as "items"
        # or "a.b" are not valid module attribute names.
        self.embeddings = nn.ModuleList(
            nn.Embedding(inputs[n].vocab, p.embedding_dim) for n in self.categorical_fields
        )
        rnn_cls = nn.LSTM if p.rnn == "lstm" else nn.GRU
        self.rnns = nn.ModuleList(
            rnn_cls(inputs[n].shape[1], p.rnn_hidden, p.rnn_layers, batch_first=True)
            for n in self.sequence_fields
        )
        self.pooling = p.pooling
        self.pads = [inputs[n].pad for n in self.categorical_fields]
        self.out_dim = (
            dense_out
            + p.embedding_dim * len(self.categorical_fields)
            + p.rnn_hidden * len(self.sequence_fields)
        )

    def output_parameters(self) -> list[nn.Parameter]:
        """The layers that produce the encoder's output (the dense MLP's last linear layer,
        the embedding tables, the RNNs): its "last layer" when nothing shared follows it."""
        params = last_linear(self.dense) if self.dense is not None else []
        return params + list(self.embeddings.parameters()) + list(self.rnns.parameters())

    def _pool(self, e: torch.Tensor, ids: torch.Tensor, pad: int) -> torch.Tensor:
        """[B, k, D] embeddings of [B, k] ids -> [B, D], positions holding `pad` left out."""
        if pad < 0:
            return e.sum(1) if self.pooling == "sum" else e.mean(1)
        keep = (ids != pad).unsqueeze(-1).to(e.dtype)  # [B, k, 1]
        total = (e * keep).sum(1)
        return total if self.pooling == "sum" else total / keep.sum(1).clamp(min=1)

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        parts: list[torch.Tensor] = []
        if self.dense is not None:
            x = torch.cat(  # [B] scalars and [B, ...] arrays alike -> [B, numel]
                [inputs[n].reshape(inputs[n].shape[0], -1).float() for n in self.dense_fields], dim=1
            )
            parts.append(self.dense(x))
        for n, table, pad in zip(self.categorical_fields, self.embeddings, self.pads):
            ids = inputs[n].long()
            if ids.dim() == 1:
                parts.append(table(ids))
            else:  # [B, k] ids -> [B, k, D] -> pooled [B, D]
                parts.append(self._pool(table(ids.flatten(1)), ids.flatten(1), pad))
        for n, rnn in zip(self.sequence_fields, self.rnns):
            _, state = rnn(inputs[n].float())  # [B, T, C] -> state [layers, B, H]
            h = state[0] if isinstance(state, tuple) else state
            parts.append(h[-1])
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
