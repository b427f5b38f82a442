"""The run directory: resolved config, its history, train.log, metrics.jsonl, wandb/, ckpt/.

Rank 0 writes. `config.yaml` is written only once the run knows what it will run (after a
resume accepted the recipe), and always holds that; `config_history.jsonl` gets one line per
start or resume with the keys that changed.
"""

from __future__ import annotations

import contextlib
import json
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from manytask.config import Config, dump_config
from manytask.data_pipeline.integrity import log_data_warnings_to
from manytask.data_pipeline.preprocess import copy_preprocessing
from manytask.trainer.distributed import DistInfo


class RunDir:
    def __init__(self, cfg: Config, info: DistInfo):
        self.path = Path(cfg.run.dir)
        self.info = info
        if info.is_rank0:
            self.path.mkdir(parents=True, exist_ok=True)
            log_data_warnings_to(self.log_file)  # skipped corrupt shards / non-finite samples

    @property
    def ckpt(self) -> Path:
        return self.path / "ckpt"

    @property
    def log_file(self) -> Path:
        return self.path / "train.log"

    def record_config(self, cfg: Config, step: int, resumed_from: Path | None,
                      changes: dict[str, tuple[Any, Any]]) -> None:
        """Write `config.yaml` (what runs now) and append this start to `config_history.jsonl`."""
        if not self.info.is_rank0:
            return
        (self.path / "config.yaml").write_text(dump_config(cfg))
        copy_preprocessing(cfg, self.path)  # vocabularies + statistics, for serving later
        entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "step": step,
                 "resumed_from": str(resumed_from) if resumed_from else None,
                 "changes": {k: {"old": old, "new": new} for k, (old, new) in changes.items()}}
        with open(self.path / "config_history.jsonl", "a") as fh:
            fh.write(json.dumps(entry, default=str) + "\n")

    def say(self, text: str) -> None:
        """Print on rank 0 and append to train.log."""
        if not self.info.is_rank0:
            return
        print(text, flush=True)
        with open(self.log_file, "a") as fh:
            fh.write(text + "\n")

    @contextlib.contextmanager
    def warnings_said(self) -> Iterator[None]:
        """Warnings raised inside go to the console and train.log through `say` (rank 0)."""
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
        for warning in caught:
            self.say(f"warning: {warning.message}")
