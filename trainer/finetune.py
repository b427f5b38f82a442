"""Start from a trained model: `run.init_from` weights, `trainer.freeze` parameters.

`run.init_from: RUN_DIR | CHECKPOINT` starts a NEW run (fresh optimizer, schedule and step)
from another run's weights:
- shared parameters (encoder, experts, shared bottom, gate projection) load when name and
  shape match;
- per-task parameters load task by task: towers (and MMoE / PLE gates) are stacked across
  tasks, so a recipe that adds a task changes those tensors' shapes; each task the two models
  share gets its own slices back, and a new task's slices keep their fresh initialisation.
The loaded, new and dropped tensors (`name` or `name[task]` for a task's slice) are printed.

`trainer.freeze: [shared | experts | towers.<task> | <name pattern>]` keeps parameters fixed:
- `shared`: the model's `shared_parameters()`; `experts`: every parameter with "experts" in
  its name; `towers.<task>`: everything only that task uses (its tower and gate slices);
  anything else is an fnmatch pattern over parameter names (`encoder.*`).
- Whole tensors get `requires_grad=False`: the engines leave them out of the optimizer, DDP
  leaves them out of its gradient buckets (no `find_unused_parameters` needed) and DeepSpeed
  out of its partitions. A task's slice of a stacked tensor cannot leave the optimizer, so its
  gradient is zeroed and its values are put back after every optimizer step (bit-for-bit
  unchanged). DeepSpeed owns its flat fp32 copies, so slices cannot be frozen there.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from manytask.config import Config
from manytask.schema import ConfigError

Slice = tuple[nn.Parameter, "int | None"]


def _task_owned(model: nn.Module) -> dict[str, list[Slice]]:
    return getattr(model, "task_parameters", dict)()


@dataclass
class Transfer:
    """What `init_from` did: tensor names (or `name[task]` slices)."""

    loaded: list[str] = field(default_factory=list)
    new: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)

    def report(self, source: str) -> str:
        lines = [f"init_from {source}: loaded {len(self.loaded)}, new {len(self.new)}, dropped {len(self.dropped)}"]
        for what in ("loaded", "new", "dropped"):
            names = getattr(self, what)
            if names:
                lines.append(f"  {what}: {', '.join(names)}")
        return "\n".join(lines)


@torch.no_grad()
def transfer_weights(target: nn.Module, source: nn.Module) -> Transfer:
    """Copy `source`'s weights into `target` where they fit (see the module docstring)."""
    result = Transfer()
    names_t = {id(p): n for n, p in target.named_parameters()}
    names_s = {id(p): n for n, p in source.named_parameters()}
    owned_t, owned_s = _task_owned(target), _task_owned(source)
    per_task_t = {names_t[id(p)] for items in owned_t.values() for p, _ in items}
    per_task_s = {names_s[id(p)] for items in owned_s.values() for p, _ in items}
    for task, items in owned_t.items():
        old = owned_s.get(task, [])
        fits = len(old) == len(items) and all(
            _part(p, i).shape == _part(q, j).shape for (p, i), (q, j) in zip(items, old)
        )
        for k, (p, i) in enumerate(items):
            label = f"{names_t[id(p)]}[{task}]"
            if fits:
                _part(p, i).copy_(_part(*old[k]))
                result.loaded.append(label)
            else:
                result.new.append(label)
        if old and not fits:  # the task changed shape (another type or width): start afresh
            result.dropped += [f"{names_s[id(q)]}[{task}]" for q, _ in old]
    for task, items in owned_s.items():
        if task not in owned_t:
            result.dropped += [f"{names_s[id(p)]}[{task}]" for p, _ in items]
    # everything else (shared parameters, persistent buffers) by name and shape
    src_state = {n: t for n, t in source.state_dict().items() if n not in per_task_s}
    for name, tensor in target.state_dict(keep_vars=True).items():
        if name in per_task_t:
            continue
        old = src_state.pop(name, None)
        if old is not None and old.shape == tensor.shape:
            tensor.data.copy_(old)
            result.loaded.append(name)
        else:
            result.new.append(name)
            if old is not None:
                result.dropped.append(name)
    result.dropped += sorted(src_state)
    return result


def _part(p: torch.Tensor, idx: int | None) -> torch.Tensor:
    return p if idx is None else p[idx]


# --------------------------------------------------------------------------- freeze
@dataclass
class FrozenSlices:
    """Task slices of stacked tensors kept fixed: gradient zeroed, values put back after
    every optimizer step (`attach`)."""

    slices: list[tuple[nn.Parameter, int, torch.Tensor]] = field(default_factory=list)
    whole: list[str] = field(default_factory=list)  # names of tensors frozen entirely
    sliced: list[str] = field(default_factory=list)  # `name[task]` of frozen slices

    def attach(self, engine: object) -> None:
        """Restore the frozen slices after each step of the engine's optimizer."""
        if not self.slices:
            return
        engine.optimizer.register_step_post_hook(lambda *_: self.restore())

    @torch.no_grad()
    def restore(self) -> None:
        for p, idx, value in self.slices:
            p.data[idx] = value


def _pattern_slices(model: nn.Module, pattern: str) -> list[Slice]:
    named = dict(model.named_parameters())
    if pattern == "shared":
        return [(p, None) for p in model.shared_parameters()]
    if pattern == "experts":
        return [(p, None) for n, p in named.items() if "experts" in n]
    if pattern.startswith("towers."):
        task = pattern.split(".", 1)[1]
        owned = _task_owned(model)
        if task not in owned:
            raise ConfigError(f"'trainer.freeze': '{pattern}' names no task of the model (tasks: {', '.join(owned)})")
        return list(owned[task])
    matched = [(p, None) for n, p in named.items() if fnmatch.fnmatchcase(n, pattern)]
    if not matched:
        raise ConfigError(
            f"'trainer.freeze': '{pattern}' matches no parameter (use shared, experts, towers.<task> or a "
            f"pattern over names such as {', '.join(list(named)[:4])}, ...)"
        )
    return matched


def freeze(model: nn.Module, patterns: list[str]) -> FrozenSlices:
    """Apply `trainer.freeze` to `model` (before the engine wraps it)."""
    names = {id(p): n for n, p in model.named_parameters()}
    owners = {(id(p), i): t for t, items in _task_owned(model).items() for p, i in items}
    whole: dict[int, nn.Parameter] = {}
    parts: dict[int, tuple[nn.Parameter, set[int]]] = {}
    for pattern in patterns:
        for p, idx in _pattern_slices(model, pattern):
            if idx is None:
                whole[id(p)] = p
            else:
                parts.setdefault(id(p), (p, set()))[1].add(idx)
    frozen = FrozenSlices()
    for key, (p, idx) in list(parts.items()):
        if key not in whole and len(idx) == p.shape[0]:  # every slice: the whole tensor
            whole[key] = p
    for p in whole.values():
        p.requires_grad_(False)
        frozen.whole.append(names[id(p)])
    for key, (p, idxs) in parts.items():
        if key in whole:
            continue
        rows = sorted(idxs)
        frozen.slices += [(p, i, p.detach()[i].clone()) for i in rows]
        frozen.sliced += [f"{names[key]}[{owners.get((key, i), i)}]" for i in rows]
        mask = torch.ones(p.shape[0], *[1] * (p.dim() - 1), dtype=p.dtype, device=p.device)
        mask[rows] = 0
        p.register_hook(lambda g, m=mask: g * m.to(g.device))
    return frozen


def _check_shared_gradients(cfg: Config, model: nn.Module) -> None:
    """Methods that differentiate the shared part per task cannot run once it is frozen."""
    trainable = [p.requires_grad for p in model.shared_parameters()]
    last = [p.requires_grad for p in model.last_shared_parameters()]
    needs = {"gradnorm": all(last), "pcgrad": any(trainable), "mgda": any(trainable)}
    if not needs.get(cfg.weighting.name, True):
        raise ConfigError(
            f"'weighting.name': {cfg.weighting.name} needs per-task gradients of the shared part, which "
            f"trainer.freeze {list(cfg.trainer.freeze)} keeps fixed; use another weighting (equal, "
            "uncertainty, dwa, ...) or freeze less"
        )
    if cfg.monitor.affinity_every and not any(trainable):
        raise ConfigError(
            "'monitor.affinity_every': task affinity compares the tasks' gradients on the shared "
            f"part, which trainer.freeze {list(cfg.trainer.freeze)} keeps fixed; set it to 0"
        )


def prepare_finetune(cfg: Config, model: nn.Module, say: Callable[[str], None] = print) -> FrozenSlices:
    """`run.init_from` then `trainer.freeze` on a freshly built model (every rank, before the
    engine wraps it); returns the frozen slices for `FrozenSlices.attach(engine)`."""
    if cfg.run.init_from:
        from manytask.trainer.model_io import load_trained

        source = load_trained(cfg.run.init_from)
        say(transfer_weights(model, source.model).report(f"{source.checkpoint} (step {source.step})"))
    frozen = freeze(model, list(cfg.trainer.freeze)) if cfg.trainer.freeze else FrozenSlices()
    if frozen.slices and cfg.engine.name == "deepspeed":  # before DeepSpeed's costly set-up
        raise ConfigError(
            f"'trainer.freeze': {frozen.sliced[:4]} are task slices of tensors stacked across tasks, "
            "which DeepSpeed keeps as flat fp32 partitions of its own; freeze whole groups "
            "(shared, experts, a name pattern) under DeepSpeed, or use engine.name ddp"
        )
    _check_shared_gradients(cfg, model)
    if cfg.trainer.freeze:
        say(f"trainer.freeze: {len(frozen.whole)} tensors and {len(frozen.sliced)} task slices fixed: "
            f"{', '.join(frozen.whole + frozen.sliced)}")
    return frozen
