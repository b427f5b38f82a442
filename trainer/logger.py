"""Metrics logging on rank 0: `metrics.jsonl` in the run directory, and Weights & Biases.

`metrics.jsonl` is the source of truth that works without W&B (`manytask report` reads it):
one JSON object per `log()` call, `{"step": int, key: float | null, ...}`, with the same keys
as W&B (see ARCHITECTURE.md: `train/<task>/loss`, `gates/<task>/expert_<i>`, ...). A step
may have several lines (training scalars, then validation); `read_metrics` merges them.
Non-finite values are written as `null` so the file stays strict JSON.

W&B mode `auto` means online when an API key is configured (WANDB_API_KEY or netrc) and
WANDB_MODE does not say offline/disabled, offline otherwise; offline runs can be uploaded
later with `wandb sync RUN_DIR/wandb/offline-run-*`.
"""

from __future__ import annotations

import json
import math
import netrc
import os
import secrets
import shutil
import string
import subprocess
import warnings
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from manytask.config import Config

METRICS_FILE = "metrics.jsonl"
SECRET_WORDS = ("key", "token", "secret", "password")
REDACTED = "***"


def generate_run_id(length: int = 8) -> str:
    """A random base-36 id in W&B's format (wandb 0.31 no longer exports `util.generate_id`)."""
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(length))


def scrub_secrets(value: Any) -> Any:
    """A copy of nested dicts/lists with values under secret-looking keys replaced by ***."""
    if isinstance(value, dict):
        return {
            k: REDACTED if any(w in str(k).lower() for w in SECRET_WORDS) else scrub_secrets(v)
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [scrub_secrets(v) for v in value]
    return value


def git_commit(cwd: str | Path | None = None) -> str | None:
    """`git rev-parse HEAD` of the working directory, or None outside a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    commit = out.stdout.strip() if out.returncode == 0 else ""
    return commit or None


def has_wandb_api_key() -> bool:
    """True when W&B could log in without a prompt: WANDB_API_KEY or a netrc entry."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    path = os.environ.get("NETRC") or Path.home() / ".netrc"
    try:
        return bool(host and netrc.netrc(path).authenticators(host))
    except (OSError, netrc.NetrcParseError):
        return False


def resolve_wandb_mode(wanted: str) -> str:
    """`online`, `offline` or `disabled` for the `logging.mode` setting (see module doc)."""
    if wanted != "auto":
        return wanted
    env = os.environ.get("WANDB_MODE", "").lower()
    if env == "disabled":
        return "disabled"
    if env in ("offline", "dryrun"):
        return "offline"
    return "online" if has_wandb_api_key() else "offline"


def _clean(value: Any) -> float | None:
    number = float(value)
    return number if math.isfinite(number) else None


def truncate_metrics(path: Path, resume_step: int) -> None:
    """Keep only lines with step <= resume_step (and drop a half-written last line).

    A crashed run may have logged steps after its last checkpoint; the resumed run logs
    them again, so they are removed first and every step appears once.
    """
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by the kill
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= resume_step:
            kept.append(line + "\n")
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)  # atomic: a second crash never leaves a half-truncated file


def read_metrics(path_or_run_dir: str | Path) -> list[dict[str, Any]]:
    """Rows of `metrics.jsonl` merged by step, sorted by step; unreadable lines skipped."""
    path = Path(path_or_run_dir)
    if path.is_dir():
        path = path / METRICS_FILE
    by_step: dict[int, dict[str, Any]] = {}
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            by_step.setdefault(row["step"], {}).update(row)
    return [by_step[s] for s in sorted(by_step)]


def safe_file_name(key: str) -> str:
    """A metric key as a file name: `gates/a/expert_0` -> `gates_a_expert_0`."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in key)


class MetricsLogger:
    """Rank-0 metrics sink: `run_dir/metrics.jsonl` plus an optional W&B run.

    On other ranks (`is_rank0=False`) every method does nothing, so callers need no rank
    checks. Pass the `run_id` saved in the checkpoint when resuming so W&B continues the
    same run; `resume_step` is the checkpoint's step (0 = a fresh run: the file is reset).
    It owns its schedule: `should_log` (`trainer.log_every`) and `should_log_gate_heatmap`
    (`logging.heatmap_every`), decided from the step and the recipe, the same on every rank
    (a log step runs collectives: the gate statistics are averaged over ranks).
    """

    def __init__(
        self,
        run_dir: str | Path,
        cfg: Config,
        is_rank0: bool,
        resume_step: int = 0,
        run_id: str | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.enabled = is_rank0
        self.log_every, self.heatmap_every = cfg.trainer.log_every, cfg.logging.heatmap_every
        self._run_id = run_id or generate_run_id()
        self._run: Any = None  # wandb Run
        self._wandb_dir: Path | None = None
        self._file = None
        self._summary: dict[str, Any] = {}
        if not self.enabled:
            return

        self.run_dir.mkdir(parents=True, exist_ok=True)
        metrics = self.run_dir / METRICS_FILE
        if resume_step > 0:
            truncate_metrics(metrics, resume_step)
            summary = self.run_dir / "summary.json"
            if summary.exists():
                self._summary = json.loads(summary.read_text())
        else:
            metrics.unlink(missing_ok=True)
        self._file = metrics.open("a")

        if cfg.logging.wandb:
            mode = resolve_wandb_mode(cfg.logging.mode)
            if mode != "disabled":
                self._start_wandb(cfg, mode)

    def _start_wandb(self, cfg: Config, mode: str) -> None:
        import wandb  # imported here: ~1 s, and only rank 0 with W&B on needs it

        config = scrub_secrets(cfg.to_dict())
        commit = git_commit()
        if commit:
            config["git_commit"] = commit
        try:
            self._run = wandb.init(
                project=cfg.logging.project,
                entity=cfg.logging.entity,
                dir=str(self.run_dir),
                id=self._run_id,
                resume="allow",
                config=config,
                name=cfg.run.name,
                tags=list(cfg.logging.tags) or None,
                mode=mode,
            )
        except Exception as err:  # training must not die because the dashboard is unreachable
            warnings.warn(
                f"W&B init failed ({err}); logging to {self.run_dir / METRICS_FILE} only",
                stacklevel=3,
            )
            return
        # The step is logged as a metric and used as x-axis: an offline resume restarts
        # W&B's internal counter, so only our own `step` is trustworthy across segments.
        self._run.define_metric("step")
        self._run.define_metric("*", step_metric="step")
        self._wandb_dir = Path(self._run.dir).parent

    @property
    def run_id(self) -> str:
        """The W&B run id; the checkpointer saves it so a resume continues the same run."""
        return self._run_id

    @property
    def wandb_dir(self) -> Path | None:
        """The local W&B run folder (`run_dir/wandb/offline-run-...`), None without W&B."""
        return self._wandb_dir

    def should_log(self, step: int, last_step: bool = False) -> bool:
        """Training scalars every `trainer.log_every` steps and at the last one."""
        return last_step or step % self.log_every == 0

    def should_log_gate_heatmap(self, step: int) -> bool:
        """The gate-utilization image every `logging.heatmap_every` steps (0: never)."""
        return self.heatmap_every > 0 and step % self.heatmap_every == 0

    def log(self, step: int, scalars: dict[str, float]) -> None:
        """Write scalars (floats, numpy or 0-d tensors) for `step` to metrics.jsonl and W&B."""
        if self._file is None:
            return
        row = {"step": int(step), **{k: _clean(v) for k, v in scalars.items()}}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()  # a killed run keeps everything logged so far
        if self._run is not None:
            self._run.log(row, step=int(step))

    def log_image(self, step: int, key: str, figure_or_png_path: Any) -> Path | None:
        """Save a matplotlib Figure (or copy a PNG) to run_dir/plots/ and log it to W&B.

        Use the current step: W&B drops rows for steps older than the last one logged.
        Returns the PNG path (None on other ranks).
        """
        if not self.enabled:
            return None
        plots = self.run_dir / "plots"
        plots.mkdir(exist_ok=True)
        path = plots / f"{safe_file_name(key)}_{int(step):08d}.png"
        if isinstance(figure_or_png_path, str | os.PathLike):
            if Path(figure_or_png_path).resolve() != path.resolve():
                shutil.copyfile(figure_or_png_path, path)
        else:
            figure_or_png_path.savefig(path, dpi=100, bbox_inches="tight")
        if self._run is not None:
            import wandb

            self._run.log({key: wandb.Image(str(path)), "step": int(step)}, step=int(step))
        return path

    def log_table(self, key: str, columns: list[str], rows: list[list[Any]]) -> None:
        """A W&B table (e.g. final per-task metrics); also kept as run_dir/tables/<key>.json.

        W&B attaches it to the current step and closes that step, so call it after the
        step's last `log()` (typically once, at the end of training).
        """
        if not self.enabled:
            return
        tables = self.run_dir / "tables"
        tables.mkdir(exist_ok=True)
        payload = {"columns": list(columns), "rows": [list(r) for r in rows]}
        (tables / f"{safe_file_name(key)}.json").write_text(json.dumps(payload, default=str))
        if self._run is not None:
            import wandb

            self._run.log({key: wandb.Table(columns=list(columns), data=payload["rows"])})

    def summary(self, values: dict[str, Any]) -> None:
        """Final values (best metric, total time, ...): W&B summary and run_dir/summary.json."""
        if not self.enabled:
            return
        self._summary.update(values)
        (self.run_dir / "summary.json").write_text(json.dumps(self._summary, default=str))
        if self._run is not None:
            self._run.summary.update(values)

    def finish(self) -> None:
        """Close metrics.jsonl and finish the W&B run; safe to call twice."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._run is not None:
            self._run.finish()
            self._run = None
