"""DeepSpeed checkpoints read with `torch.load(weights_only=True)`.

DeepSpeed's own `TorchCheckpointEngine.load` unpickles with `weights_only=False`: a tampered
checkpoint file could run code on resume. Its files hold tensors and plain containers plus a
few DeepSpeed objects (the loss scaler, the ZeRO stage enum, fragment addresses), which are
allow-listed here by name; anything else is refused with the file named.
"""

from __future__ import annotations

import pickle
from typing import Any

import torch
from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine
from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.tensor_fragment import fragment_address

from manytask.trainer.checkpoint import CheckpointError

# What DeepSpeed 0.19 pickles into model and ZeRO optimizer files (fp32, bf16 and fp16).
DEEPSPEED_SAFE_GLOBALS = [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
    """DeepSpeed's torch checkpoint engine (same files on save), loading weights-only."""

    def load(self, path: str, map_location: Any = None) -> Any:
        try:
            with torch.serialization.safe_globals(DEEPSPEED_SAFE_GLOBALS):
                return torch.load(path, map_location=map_location, weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as err:
            refused = _refused_global(err)
            if refused:
                raise CheckpointError(
                    f"refusing to load DeepSpeed checkpoint file {path}: {refused}; only tensors, "
                    f"plain containers and DeepSpeed's loss scaler / ZeRO stage / fragment "
                    f"addresses are loaded"
                ) from err
            raise CheckpointError(
                f"cannot read DeepSpeed checkpoint file {path} (corrupt or truncated?): "
                f"{type(err).__name__}: {err}"
            ) from err


def _refused_global(err: Exception) -> str | None:
    """The weights-only unpickler's reason ("Unsupported global: GLOBAL x.y ..."), if it refused."""
    marker = "WeightsUnpickler error: "
    for line in str(err).splitlines():
        if marker in line:
            return line.split(marker, 1)[1].split(". ")[0]
    return None


def use_weights_only_loading(engine: Any) -> None:
    """Swap a DeepSpeed engine's checkpoint engine for the weights-only one.

    Only DeepSpeed's default torch engine is replaced (its subclass writes the same files); an
    engine the user configured (Nebula, decoupled, ...) is left as it is.
    """
    current = getattr(engine, "checkpoint_engine", None)
    if type(current) is TorchCheckpointEngine:
        replacement = WeightsOnlyCheckpointEngine.__new__(WeightsOnlyCheckpointEngine)
        replacement.__dict__.update(current.__dict__)  # same settings (zipfile serialization, ...)
        engine.checkpoint_engine = replacement
