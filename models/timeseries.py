"""Time-series multi-task model: a shared LSTM/GRU over `[B, T, C]` feeding forecast and
classification heads.

The encoder reads every input (the series field through its RNN, last hidden state); a shared
MLP follows; each task has a tower. A `forecast` task (out_dim = horizon H) predicts, when
`residual_forecast` is on, the change from the last observed value of channel
`target_channel`, which the model adds back: outputs are values `[B, H]`, and the head only
has to learn the deviation from "repeat the last value".
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from manytask.models.encoders import EncoderParams, InputEncoder
from manytask.models.layers import Activation, last_linear, mlp
from manytask.models.spec import ModelOutput, ModelSpec
from manytask.models.towers import Towers
from manytask.schema import ConfigError, load_dataclass


@dataclass
class TimeSeriesParams:
    encoder: EncoderParams = field(default_factory=EncoderParams)
    series: str = ""  # the [T, C] series field; "" = the only one
    hidden: list[int] = field(default_factory=lambda: [64])  # shared MLP after the RNN
    tower_hidden: list[int] = field(default_factory=lambda: [32])
    residual_forecast: bool = True
    target_channel: int = 0  # channel the forecast tasks predict
    activation: Activation = "relu"


class TimeSeries(nn.Module):
    """forward(inputs with the series `[B, T, C]`, source_id) -> outputs {task: `[B, out_dim]`}
    (forecast tasks: `[B, H]` values), shared = shared MLP output `[B, hidden[-1]]`."""

    def __init__(self, spec: ModelSpec, p: TimeSeriesParams):
        super().__init__()
        self.encoder = InputEncoder(spec.inputs, p.encoder)
        series = self.encoder.sequence_fields
        if p.series:
            if p.series not in series:
                raise ConfigError(
                    f"'model.params.series': '{p.series}' is not a [T, C] float input "
                    f"(series fields: {', '.join(series) or 'none'})"
                )
            self.series = p.series
        elif len(series) == 1:
            self.series = series[0]
        else:
            raise ConfigError(
                "model 'timeseries' needs one [T, C] float input field; found "
                f"{len(series)} ({', '.join(series) or 'none'}); set model.params.series"
            )
        channels = spec.inputs[self.series].shape[1]
        if not 0 <= p.target_channel < channels:
            raise ConfigError(f"'model.params.target_channel': must be in [0, {channels})")
        self.target_channel = p.target_channel
        self.forecast_tasks = [t for t, s in spec.tasks.items() if s.type == "forecast"]
        self.residual = p.residual_forecast
        self.shared_mlp = mlp(self.encoder.out_dim, p.hidden, p.activation)
        width = p.hidden[-1] if p.hidden else self.encoder.out_dim
        self.towers = Towers(width, p.tower_hidden, spec.tasks, p.activation)

    def forward(self, inputs: dict[str, torch.Tensor], source_id: torch.Tensor) -> ModelOutput:
        shared = self.shared_mlp(self.encoder(inputs))  # [B, D]
        outputs = self.towers(shared)
        if self.residual and self.forecast_tasks:
            last = inputs[self.series][:, -1, self.target_channel].float().unsqueeze(1)  # [B, 1]
            for t in self.forecast_tasks:
                outputs[t] = outputs[t] + last
        return ModelOutput(outputs, shared=shared)

    def shared_parameters(self) -> list[nn.Parameter]:
        return [*self.encoder.parameters(), *self.shared_mlp.parameters()]

    def last_shared_parameters(self) -> list[nn.Parameter]:
        return last_linear(self.shared_mlp) or self.encoder.output_parameters()

    def task_parameters(self) -> dict[str, list[tuple[nn.Parameter, int | None]]]:
        return self.towers.task_parameters()


def build(params: dict, spec: ModelSpec) -> TimeSeries:
    return TimeSeries(spec, load_dataclass(TimeSeriesParams, params, prefix="model.params"))
