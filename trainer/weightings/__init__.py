"""Loss weightings, looked up by the recipe's `weighting.name`.

Adding a method: one file defining a `Weighting` subclass (with a `Params` dataclass for its
`weighting.params:` block) plus one line in `WEIGHTINGS`.
"""

from __future__ import annotations

from manytask.config import TaskConfig, WeightingConfig
from manytask.schema import ConfigError, closest, load_dataclass
from manytask.trainer.weightings.base import Weighting, WeightingContext
from manytask.trainer.weightings.dwa import DWAWeighting
from manytask.trainer.weightings.equal import EqualWeighting
from manytask.trainer.weightings.gradnorm import GradNormWeighting
from manytask.trainer.weightings.mgda import MGDAWeighting, min_norm_weights
from manytask.trainer.weightings.pcgrad import PCGradWeighting
from manytask.trainer.weightings.static import StaticWeighting
from manytask.trainer.weightings.uncertainty import UncertaintyWeighting
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
}


def build_weighting(cfg: WeightingConfig, tasks: dict[str, TaskConfig]) -> Weighting:
    """The weighting named by `cfg.name`, its `cfg.params` validated against the method's
    `Params` dataclass (an unknown key names the closest valid one). Raises ConfigError.
    """
    if cfg.name not in WEIGHTINGS:
        near = closest(cfg.name, WEIGHTINGS)
        fix = f"; did you mean '{near}'?" if near else ""
        raise ConfigError(f"'weighting.name': unknown weighting '{cfg.name}'{fix} (known: {', '.join(WEIGHTINGS)})")
    cls = WEIGHTINGS[cfg.name]
    params = load_dataclass(cls.Params, cfg.params, prefix="weighting.params")
    return cls(tasks, params)


__all__ = ["WEIGHTINGS", "Weighting", "WeightingContext", "build_weighting", "min_norm_weights"]
