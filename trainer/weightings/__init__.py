"""Loss weightings, looked up by the recipe's `weighting.name`.

Adding a method: one file defining a `Weighting` subclass (with a `Params` dataclass for its
`weighting.params:` block) plus one line in `WEIGHTINGS`. A method that needs per-task
gradients takes them from `task_gradients.py`; one whose shared step is a combination
Σ_t c_t g_t subclasses `CoefficientWeighting` and only computes c from the Gram matrix.

Paths (each method's docstring says which it takes):
- losses only: equal, static, uncertainty, dwa, worst_case, rlw, famo, imtl_l;
- coefficients from the Gram matrix, one backward of Σ_t c_t L_t: imtl_g, imtl (+ IMTL-L's
  learned scales), cagrad, nash_mtl,
  aligned_mtl, upgrad, gradvac;
- surgery (writes the shared gradients after the backward, DeepSpeed's too): pcgrad, db_mtl;
- gradnorm (last shared layer's gradients), mgda (shared representation's gradients).

Engines: every method runs on one process, DDP and DeepSpeed ZeRO 0-3, exact across ranks,
except db_mtl under ZeRO-3 (`Weighting.deepspeed_stages`, refused at config time). Under ZeRO-3
the per-task gradients are partitioned like the parameters (`sharded_gradients.py`).
"""

from __future__ import annotations

from typing import Any

from manytask.config import TaskConfig, WeightingConfig
from manytask.schema import load_dataclass, registry_entry
from manytask.trainer.weightings.aligned_mtl import AlignedMTLWeighting
from manytask.trainer.weightings.base import Weighting, WeightingContext
from manytask.trainer.weightings.cagrad import CAGradWeighting
from manytask.trainer.weightings.db_mtl import DBMTLWeighting
from manytask.trainer.weightings.dwa import DWAWeighting
from manytask.trainer.weightings.equal import EqualWeighting
from manytask.trainer.weightings.famo import FAMOWeighting
from manytask.trainer.weightings.gradnorm import GradNormWeighting
from manytask.trainer.weightings.gradvac import GradVacWeighting
from manytask.trainer.weightings.imtl import IMTLGWeighting, IMTLLWeighting, IMTLWeighting
from manytask.trainer.weightings.mgda import MGDAWeighting, min_norm_weights
from manytask.trainer.weightings.nash_mtl import NashMTLWeighting
from manytask.trainer.weightings.pcgrad import PCGradWeighting
from manytask.trainer.weightings.rlw import RLWWeighting
from manytask.trainer.weightings.static import StaticWeighting
from manytask.trainer.weightings.uncertainty import UncertaintyWeighting
from manytask.trainer.weightings.upgrad import UPGradWeighting
from manytask.trainer.weightings.worst_case import WorstCaseWeighting

WEIGHTINGS: dict[str, type[Weighting]] = {
    "equal": EqualWeighting,
    "static": StaticWeighting,
    "uncertainty": UncertaintyWeighting,
    "gradnorm": GradNormWeighting,
    "dwa": DWAWeighting,
    "mgda": MGDAWeighting,
    "worst_case": WorstCaseWeighting,
    "pcgrad": PCGradWeighting,
    "rlw": RLWWeighting,
    "famo": FAMOWeighting,
    "db_mtl": DBMTLWeighting,
    "imtl_l": IMTLLWeighting,
    "imtl_g": IMTLGWeighting,
    "imtl": IMTLWeighting,
    "cagrad": CAGradWeighting,
    "nash_mtl": NashMTLWeighting,
    "aligned_mtl": AlignedMTLWeighting,
    "upgrad": UPGradWeighting,
    "gradvac": GradVacWeighting,
}


def weighting_class(name: str, file: str | None = None) -> type[Weighting]:
    """The registry entry for `weighting.name` (its `Params` is the dataclass of
    `weighting.params`); ConfigError naming the closest weighting otherwise."""
    return registry_entry(WEIGHTINGS, name, "weighting", file)


def weighting_params(cfg: WeightingConfig, file: str | None = None) -> Any:
    """`cfg.params` checked against the method's `Params` dataclass (keys, types, ranges)."""
    return load_dataclass(weighting_class(cfg.name, file).Params, cfg.params, file=file, prefix="weighting.params")


def build_weighting(cfg: WeightingConfig, tasks: dict[str, TaskConfig]) -> Weighting:
    """The weighting named by `cfg.name`, its `cfg.params` validated against the method's
    `Params` dataclass (an unknown key names the closest valid one). Raises ConfigError.
    """
    return weighting_class(cfg.name)(tasks, weighting_params(cfg))


__all__ = ["WEIGHTINGS", "Weighting", "WeightingContext", "build_weighting", "weighting_class", "weighting_params", "min_norm_weights"]
