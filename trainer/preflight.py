"""Everything about a recipe that can be checked before a process starts.

`load_config` already checks keys, types, numeric ranges and the model's / weighting's
`params:` against their registered dataclasses. `check_recipe` adds what needs the data:
every source's manifest, its input and label fields, the task output widths, and a build of
the model on the `meta` device (no memory, no time), so that `manytask config` and
`manytask launch` report a bad recipe once, before torchrun starts any rank.
"""

from __future__ import annotations

import torch

from manytask.config import Config
from manytask.models import build_model
from manytask.trainer.specs import build_model_spec
from manytask.trainer.weightings import build_weighting


def check_recipe(cfg: Config) -> None:
    """Raise ConfigError / FileNotFoundError / ValueError (naming the file, key and value)
    for anything that would stop `train(cfg)` while it builds the job."""
    _, model_spec = build_model_spec(cfg)
    with torch.device("meta"):
        build_model(cfg.model, model_spec)
        build_weighting(cfg.weighting, cfg.tasks)
