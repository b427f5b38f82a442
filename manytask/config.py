"""The recipe: typed sections, YAML loading (`yaml.safe_load`) and dotted overrides.

A recipe is a YAML file with the sections below; `load_config(path, ["trainer.max_steps=200"])`
returns a validated `Config`. Architecture- and method-specific options live in `params:`
blocks that the chosen model / weighting validates with its own dataclass.
"""

from __future__ import annotations

import copy
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from manytask.schema import ConfigError, at_least, closest, load_dataclass, require, to_dict

# Task names become metric keys (`loss/<task>`, `gates/<task>/expert_<e>`): no '/' or spaces.
TASK_NAME = re.compile(r"[A-Za-z0-9_.-]+")

TaskType = Literal["binary", "multiclass", "multilabel", "regression", "forecast"]


@dataclass
class RunConfig:
    name: str = "run"
    dir: str = "runs/run"  # holds config.yaml, logs, metrics.jsonl, wandb/, ckpt/
    seed: int = 0
    resume: str = "auto"  # auto | never | path to a checkpoint directory
    lock_lease: float = 600.0  # seconds: a run lock not refreshed for this long is stale
    init_from: str | None = None  # a trained RUN_DIR or checkpoint: a new run from its weights

    def validate(self, file: str | None) -> None:
        require(self.resume in ("auto", "never") or Path(self.resume).is_dir(), file, "run.resume", self.resume,
                "auto, never or an existing checkpoint directory")
        require(self.lock_lease > 0, file, "run.lock_lease", self.lock_lease, "seconds > 0")


@dataclass
class SourceConfig:
    """One dataset: shards plus manifest.json, providing input fields and task labels."""

    name: str
    train: str  # directory holding manifest.json, or a manifest.json path
    val: str | None = None
    inputs: list[str] = field(default_factory=list)  # fields fed to the model
    labels: dict[str, str] = field(default_factory=dict)  # task name -> label field


@dataclass
class DataConfig:
    sources: list[SourceConfig] = field(default_factory=list)
    batch_size: int = 256  # per rank, per step (before gradient accumulation)
    num_workers: int = 0  # reader processes per rank, shared by all sources (0 = in-process)
    shuffle_buffer: int = 8192  # samples shuffled together per rank, split among the sources (whole chunks, >= 1 each)
    skip_corrupt: bool = False  # count and skip unreadable samples instead of failing
    # a NaN/inf in a float input field: "error" names source, shard, sample key and field;
    # "skip" drops such samples (counted in data/<source>/skipped, logged); "allow" passes
    # them to the model (trainer.on_nonfinite then decides about the loss)
    on_nonfinite_input: Literal["error", "skip", "allow"] = "error"
    val_batch_size: int = 1024
    val_max_batches: int = 0  # 0 = the whole validation split

    def validate(self, file: str | None) -> None:
        if not self.sources:
            raise ConfigError(f"'data.sources' in {file}: at least one source is required")
        names = [s.name for s in self.sources]
        if len(set(names)) != len(names):
            raise ConfigError(f"'data.sources' in {file}: source names must be unique, got {names}")
        at_least(file, "data", 1, batch_size=self.batch_size, val_batch_size=self.val_batch_size)
        at_least(file, "data", 0, num_workers=self.num_workers, shuffle_buffer=self.shuffle_buffer,
                 val_max_batches=self.val_max_batches)


@dataclass
class TaskConfig:
    type: TaskType
    out_dim: int = 0  # 0 = infer: classes for multiclass, labels for multilabel, horizon for forecast
    loss_weight: float = 1.0  # used by the `static` weighting
    metrics: list[str] = field(default_factory=list)  # empty = defaults for the task type


@dataclass
class ModelConfig:
    name: str = "mmoe"
    params: dict[str, Any] = field(default_factory=dict)  # validated by the model's builder


FIXED_MIXTURES = ("uniform", "proportional", "temperature", "annealed", "manual")
# driven by the agreed per-task train losses, or (val_loss_ratio) the validation losses
ADAPTIVE_MIXTURES = ("loss_ratio", "progress", "val_loss_ratio")


@dataclass
class SchedulePoint:
    """One point of `sampler.schedule`: at `step`, the mixture is `weights` (source -> weight,
    normalized; a source not named gets 0) or the named `strategy` (fixed or adaptive)."""

    step: int
    weights: dict[str, float] = field(default_factory=dict)
    strategy: str | None = None


@dataclass
class SamplerConfig:
    strategy: Literal["uniform", "proportional", "temperature", "annealed", "manual", "loss_ratio",
                      "progress", "val_loss_ratio", "schedule"] = "proportional"
    mode: Literal["single", "mixed"] = "mixed"  # one source per step, or batches mixed in proportion
    temperature: float = 2.0  # temperature strategy: p ∝ min(n, size_cap)^(1/T)
    size_cap: int = 2**31 - 1  # K in the temperature strategy
    alpha_start: float = 1.0  # annealed: p ∝ n^alpha, alpha falls linearly ...
    alpha_end: float = 0.1  # ... to this at max_steps
    weights: dict[str, float] = field(default_factory=dict)  # manual: source -> weight
    # schedule: mixtures at given steps, interpolated (linear) or held until the next point
    schedule: list[SchedulePoint] = field(default_factory=list)
    interpolate: Literal["linear", "hold"] = "linear"
    # adaptive (loss_ratio, progress): p ∝ base mixture * signal^beta, the signal recomputed
    # every `update_every` steps from train losses smoothed by an EMA with decay `ema`
    base: Literal["uniform", "proportional", "temperature", "annealed", "manual"] = "uniform"
    beta: float = 1.0
    ema: float = 0.9
    update_every: int = 10
    # floor and ceiling of every source's probability (one number for all, or source -> number)
    min_prob: float | dict[str, float] = 0.0
    max_prob: float | dict[str, float] = 1.0

    def validate(self, file: str | None) -> None:
        require(self.temperature > 0, file, "sampler.temperature", self.temperature, "a number > 0")
        at_least(file, "sampler", 1, size_cap=self.size_cap, update_every=self.update_every)
        at_least(file, "sampler", 0, beta=self.beta)
        at_least(file, "sampler.weights", 0, **self.weights)
        require(0 <= self.ema < 1, file, "sampler.ema", self.ema, "an EMA decay in [0, 1)")
        for key in ("min_prob", "max_prob"):
            bound = getattr(self, key)
            for name, value in (bound.items() if isinstance(bound, dict) else [("", bound)]):
                dotted = f"sampler.{key}.{name}" if name else f"sampler.{key}"
                require(0 <= value <= 1, file, dotted, value, "a probability in [0, 1]")
        if (self.strategy == "schedule") != bool(self.schedule):
            raise ConfigError(
                f"'sampler.schedule' in {file}: strategy 'schedule' and a non-empty sampler.schedule go "
                f"together (got strategy {self.strategy!r} and {len(self.schedule)} schedule points)"
            )
        previous = -1
        for i, point in enumerate(self.schedule):
            key = f"sampler.schedule.{i}"
            require(point.step > previous, file, f"{key}.step", point.step,
                    f"steps increasing from >= 0 (the previous point is at step {previous})")
            previous = point.step
            if bool(point.weights) == (point.strategy is not None):
                raise ConfigError(f"'{key}' in {file}: give either weights (source -> weight) or a strategy, "
                                  f"not {'both' if point.weights else 'neither'}")
            if point.strategy is not None:
                names = FIXED_MIXTURES + ADAPTIVE_MIXTURES
                near = closest(point.strategy, names)
                require(point.strategy in names, file, f"{key}.strategy", point.strategy,
                        f"one of {', '.join(names)}" + (f" (did you mean '{near}'?)" if near else ""))
            else:
                at_least(file, f"{key}.weights", 0, **point.weights)
                require(sum(point.weights.values()) > 0, file, f"{key}.weights", point.weights,
                        "non-negative weights with a positive sum")

    def check_sources(self, sources: list[str], file: str | None) -> None:
        """Source names in weights, schedule points and bounds against `sources`; floors and
        ceilings that a mixture can satisfy (sum of floors <= 1 <= sum of ceilings)."""
        named = [(f"sampler.schedule.{i}.weights", p.weights) for i, p in enumerate(self.schedule)]
        named += [(f"sampler.{k}", b) for k in ("min_prob", "max_prob") if isinstance(b := getattr(self, k), dict)]
        for key, mapping in named:
            for name in mapping:
                if name not in sources:
                    near = closest(name, sources)
                    fix = f"; did you mean '{near}'?" if near else ""
                    raise ConfigError(f"'{key}.{name}' in {file}: unknown source{fix} (sources: {', '.join(sources)})")
        lo, hi = self.bounds(sources)
        require(sum(lo) <= 1 + 1e-12, file, "sampler.min_prob", self.min_prob,
                f"floors summing to at most 1 over the {len(sources)} sources")
        require(sum(hi) >= 1 - 1e-12, file, "sampler.max_prob", self.max_prob,
                f"ceilings summing to at least 1 over the {len(sources)} sources")

    def bounds(self, sources: list[str]) -> tuple[list[float], list[float]]:
        """(floor, ceiling) per source, in `sources` order."""

        def per_source(bound: float | dict[str, float], default: float) -> list[float]:
            return [bound.get(s, default) if isinstance(bound, dict) else bound for s in sources]

        return per_source(self.min_prob, 0.0), per_source(self.max_prob, 1.0)


@dataclass
class WeightingConfig:
    name: str = "equal"
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainerConfig:
    max_steps: int = 1000
    optimizer: Literal["adamw", "adam", "sgd"] = "adamw"  # torch's fused kernel (foreach under DeepSpeed)
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    grad_accum: int = 1
    grad_clip: float = 1.0  # 0 disables clipping
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on GPU, fp32 on CPU
    eval_every: int = 200
    log_every: int = 10
    on_nonfinite: Literal["skip", "stop"] = "skip"
    max_nonfinite: int = 100  # stop anyway after this many skipped steps
    freeze: list[str] = field(default_factory=list)  # shared | experts | towers.<task> | name pattern

    def validate(self, file: str | None) -> None:
        at_least(file, "trainer", 1, max_steps=self.max_steps, grad_accum=self.grad_accum,
                 eval_every=self.eval_every, log_every=self.log_every)
        at_least(file, "trainer", 0, warmup_steps=self.warmup_steps, grad_clip=self.grad_clip,
                 weight_decay=self.weight_decay, max_nonfinite=self.max_nonfinite)
        require(self.lr > 0, file, "trainer.lr", self.lr, "a learning rate > 0")
        require(0 <= self.min_lr_ratio <= 1, file, "trainer.min_lr_ratio", self.min_lr_ratio, "a number in [0, 1]")
        require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), file, "trainer.betas",
                self.betas, "two numbers in [0, 1)")


@dataclass
class FSDPConfig:
    """FSDP2 (`engine.name: fsdp`, trainer/fsdp_engine.py)."""

    # a layer with at least this many parameter elements is sharded (gathered) on its own;
    # smaller ones go with the root module
    min_unit_params: int = 1_000_000
    reshard_after_forward: bool = True  # free gathered parameters between forward and backward

    def validate(self, file: str | None) -> None:
        at_least(file, "engine.fsdp", 0, min_unit_params=self.min_unit_params)


@dataclass
class EngineConfig:
    name: Literal["auto", "single", "ddp", "deepspeed", "fsdp"] = "auto"  # auto: ddp under torchrun
    backend: Literal["auto", "gloo", "nccl"] = "auto"  # auto: nccl with GPUs, gloo otherwise
    deepspeed: dict[str, Any] = field(default_factory=dict)  # DeepSpeed's own config, embedded
    fsdp: FSDPConfig = field(default_factory=FSDPConfig)


@dataclass
class CheckpointConfig:
    every: int = 500  # steps; a checkpoint is also written at the end and on preemption
    keep_last: int = 3

    def validate(self, file: str | None) -> None:
        at_least(file, "checkpoint", 1, every=self.every, keep_last=self.keep_last)


@dataclass
class LoggingConfig:
    wandb: bool = True
    project: str = "manytask"
    entity: str | None = None
    mode: Literal["auto", "online", "offline", "disabled"] = "auto"  # auto: offline without a key
    tags: list[str] = field(default_factory=list)
    heatmap_every: int = 100  # gate-utilization heatmap image every N steps (0 = never)
    progress: bool = True

    def validate(self, file: str | None) -> None:
        at_least(file, "logging", 0, heatmap_every=self.heatmap_every)


@dataclass
class MonitorConfig:
    """Negative-transfer monitoring: task affinity and gate health."""

    affinity_every: int = 0  # steps between gradient-cosine affinity measurements (0 = off)
    affinity_window: int = 5  # consecutive negative measurements before a conflict warning
    collapse_threshold: float = 0.9  # one expert above this mean weight for every task
    dead_threshold: float = 0.01  # an expert below this mean weight in every gate

    def validate(self, file: str | None) -> None:
        at_least(file, "monitor", 0, affinity_every=self.affinity_every)
        at_least(file, "monitor", 1, affinity_window=self.affinity_window)
        for key in ("collapse_threshold", "dead_threshold"):
            value = getattr(self, key)
            require(0 <= value <= 1, file, f"monitor.{key}", value, "a number in [0, 1]")


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tasks: dict[str, TaskConfig] = field(default_factory=dict)
    model: ModelConfig = field(default_factory=ModelConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    weighting: WeightingConfig = field(default_factory=WeightingConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)

    def validate(self, file: str | None) -> None:
        if not self.tasks:
            raise ConfigError(f"'tasks' in {file}: at least one task is required")
        for task, spec in self.tasks.items():
            at_least(file, f"tasks.{task}", 0, out_dim=spec.out_dim, loss_weight=spec.loss_weight)
            if not TASK_NAME.fullmatch(task):
                raise ConfigError(
                    f"'tasks.{task}' in {file}: a task name may hold only letters, digits, '_', "
                    "'-' and '.' (it becomes part of metric keys such as loss/<task>)"
                )
        for src in self.data.sources:
            for task in src.labels:
                if task not in self.tasks:
                    near = closest(task, self.tasks)
                    fix = f"; did you mean '{near}'?" if near else ""
                    raise ConfigError(
                        f"'data.sources.{src.name}.labels.{task}' in {file}: unknown task{fix} "
                        f"(tasks: {', '.join(self.tasks)})"
                    )
        labelled = {t for s in self.data.sources for t in s.labels}
        for task in self.tasks:
            if task not in labelled:
                raise ConfigError(
                    f"'tasks.{task}' in {file}: no source labels this task "
                    f"(add it to some data.sources[].labels)"
                )

        self.sampler.check_sources([s.name for s in self.data.sources], file)
        self._check_params(file)
        from manytask.trainer.weightings import weighting_class

        method = self.weighting.name
        zero = self.engine.deepspeed.get("zero_optimization", {})
        stage = zero.get("stage", 0) if isinstance(zero, dict) else 0
        stages = weighting_class(method, file).deepspeed_stages
        if self.engine.name == "deepspeed" and stage not in stages:
            raise ConfigError(
                f"'weighting.name' in {file}: {method} runs under DeepSpeed only at ZeRO stages "
                f"{', '.join(map(str, stages))}, not stage {stage} (why: trainer/weightings/{method}.py); "
                f"use another engine.deepspeed.zero_optimization.stage, engine.name ddp, or another weighting"
            )
        self._check_zero3(file)
        self._check_fsdp(file)

    def _check_params(self, file: str | None) -> None:
        """model.name / weighting.name against the registries, and their `params:` blocks
        against the registered dataclasses (keys, types, ranges): wrong ones fail here, not
        in every rank at build time."""
        from manytask.models import model_params
        from manytask.trainer.weightings import weighting_params

        model_params(self.model, file)
        weighting_params(self.weighting, file)

    def _check_zero3(self, file: str | None) -> None:
        """ZeRO-3 partitions every parameter across ranks. The weightings run there (their
        per-task gradients are partitioned too: `trainer/weightings/sharded_gradients.py`), but
        the task-affinity monitor runs its own forwards and reads full gradients."""
        zero = self.engine.deepspeed.get("zero_optimization", {})
        if self.engine.name != "deepspeed" or not isinstance(zero, dict) or zero.get("stage", 0) != 3:
            return
        if self.monitor.affinity_every:
            raise ConfigError(
                f"'monitor.affinity_every' in {file}: task affinity needs per-task gradients of the "
                "full shared parameters, which ZeRO stage 3 partitions across ranks; set "
                "monitor.affinity_every=0 or engine.deepspeed.zero_optimization.stage <= 2"
            )

    def _check_fsdp(self, file: str | None) -> None:
        """FSDP shards every parameter and its gradient across ranks (as ZeRO-3 does): per-task
        gradients of the full shared parameters and frozen slices of sharded tensors do not
        exist on any one rank."""
        if self.engine.name != "fsdp":
            return
        if self.monitor.affinity_every:
            raise ConfigError(
                f"'monitor.affinity_every' in {file}: task affinity needs per-task gradients of the "
                "full shared parameters, which engine fsdp shards across ranks; set "
                "monitor.affinity_every=0 or use engine.name ddp"
            )
        from manytask.trainer.weightings import weighting_class

        needs = weighting_class(self.weighting.name, file).gradients
        if needs in ("shared", "last_layer"):
            what = "the last shared layer" if needs == "last_layer" else "the shared parameters"
            raise ConfigError(
                f"'weighting.name' in {file}: {self.weighting.name} needs per-task gradients of "
                f"{what}, which engine fsdp shards across ranks; use a weighting without "
                "gradients (equal, static, uncertainty, dwa, worst_case, rlw, famo, imtl_l) or mgda, "
                "or engine.name ddp"
            )
        if self.trainer.freeze:
            raise ConfigError(
                f"'trainer.freeze' in {file}: freezing is not supported with engine fsdp (frozen "
                "slices of stacked tensors are sharded across ranks); use engine.name ddp"
            )

    @property
    def task_names(self) -> list[str]:
        return list(self.tasks)

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (["a", "b", "c"], value parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected dotted.key=value")
    key, raw = text.split("=", 1)
    if not key:
        raise ConfigError(f"override {text!r}: empty key")
    return key.split("."), yaml.safe_load(raw) if raw != "" else ""


def apply_override(data: dict[str, Any], path: list[str], value: Any, text: str) -> None:
    """Set a dotted path inside nested dicts/lists; list items may be named by index or `name`."""
    node: Any = data
    for i, part in enumerate(path):
        last = i == len(path) - 1
        if isinstance(node, list):
            idx = _list_index(node, part, text)
            if last:
                node[idx] = value
            else:
                node = node[idx]
            continue
        if not isinstance(node, dict):
            raise ConfigError(f"override {text!r}: '{'.'.join(path[:i])}' is not a section")
        if last:
            node[part] = value
        else:
            node = node.setdefault(part, {})


def _list_index(node: list, part: str, text: str) -> int:
    if part.isdigit() and int(part) < len(node):
        return int(part)
    for idx, item in enumerate(node):
        if isinstance(item, dict) and item.get("name") == part:
            return idx
    raise ConfigError(f"override {text!r}: no list item '{part}' (use an index or an item's name)")


def load_config(path: str | os.PathLike, overrides: list[str] | None = None) -> Config:
    """Read a YAML recipe, apply `key=value` overrides, validate, and return a Config.

    Raises ConfigError (missing file, YAML error, unknown key with the closest valid key,
    wrong type naming the expected type).
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"recipe {path} is not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {path}: expected a mapping of sections at the top level")
    data = copy.deepcopy(data)
    for text in overrides or []:
        keys, value = parse_override(text)
        apply_override(data, keys, value, text)
    # Sources are a list in YAML; overrides may also name them: data.sources.demo.train=...
    return load_dataclass(Config, data, file=str(path))


def config_from_dict(data: dict[str, Any], file: str | None = None) -> Config:
    """Validate an already-parsed recipe (e.g. the resolved config saved with a run)."""
    return load_dataclass(Config, copy.deepcopy(data), file=file)


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
