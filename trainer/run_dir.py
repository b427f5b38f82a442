"""The run directory: resolved config, train.log, metrics.jsonl, wandb/, ckpt/ (rank 0 writes)."""

from __future__ import annotations

from pathlib import Path

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
            (self.path / "config.yaml").write_text(dump_config(cfg))
            copy_preprocessing(cfg, self.path)  # vocabularies + statistics, for serving later
            log_data_warnings_to(self.log_file)  # skipped corrupt shards / non-finite samples

    @property
    def ckpt(self) -> Path:
        return self.path / "ckpt"

    @property
    def log_file(self) -> Path:
        return self.path / "train.log"

    def say(self, text: str) -> None:
        """Print on rank 0 and append to train.log."""
        if not self.info.is_rank0:
            return
        print(text, flush=True)
        with open(self.log_file, "a") as fh:
            fh.write(text + "\n")
