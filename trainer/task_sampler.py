"""Which source feeds each step, identically on every rank without communication.

`TaskSampler` turns source sizes and a `SamplerConfig` into per-step sampling probabilities
and into per-step sample counts:

- `uniform`:      p_i = 1 / N
- `proportional`: p_i ∝ n_i
- `temperature`:  p_i ∝ min(n_i, K) ** (1 / T)                      (T5 / seqio mixing)
- `annealed`:     p_i ∝ n_i ** alpha, alpha falling linearly from alpha_start (step 0) to
                  alpha_end (step max_steps), then held                 (Stickland & Murray, 2019)
- `manual`:       p_i ∝ cfg.weights[source_i]
- `loss_ratio`:   p_i ∝ base_i * (L_i / L_i⁰) ** beta   (L: EMA of the source's tasks' train loss)
- `progress`:     p_i ∝ base_i * g_i ** beta             (g: EMA of the relative improvement)
- `val_loss_ratio`: p_i ∝ base_i * (V_i / V_i⁰) ** beta  (V: validation loss at the latest
                  evaluation, V⁰ at the first one the sampler saw; moves at evaluations only)
- `schedule`:     the mixtures of `cfg.schedule` points (weights or a strategy each) at their
                  steps, interpolated linearly between points or held until the next one

`base` is a fixed strategy (`cfg.base`, uniform by default). The adaptive signals are updated
every `cfg.update_every` steps by `observe(step, losses)` from the per-task losses all ranks
already agree on (trainer.loss_signals explains them, and how a source with several tasks
combines its tasks). Every mixture then gets the floors and ceilings `cfg.min_prob` /
`cfg.max_prob` (`project_to_bounds`: the closest mixture in ratio within them).

Mode `single` gives the whole batch to one source drawn with `probs(step)`; mode `mixed`
splits the batch by systematic rounding: one uniform offset u per step, and source i gets
floor(u + B * c_i) - floor(u + B * c_{i-1}) samples, c being the cumulative probabilities.
Each count is floor or ceil of B * p_i with expectation exactly B * p_i (unbiased over steps),
the counts always sum to B, and the variance is far below a multinomial draw's.

Every random number comes from `uniform(seed, step, _STREAM)` (a splitmix64 hash): all ranks draw
the same source at the same step, and the future after `load_state_dict` does not depend on
the past. The state is bookkeeping (cumulative samples per source) for metrics and, for the
adaptive strategies, the smoothed losses: all float64 / Python floats, saved and restored
exactly, so a resumed run mixes bit for bit as the uninterrupted one.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from manytask.config import ADAPTIVE_MIXTURES, SamplerConfig
from manytask.schema import ConfigError, closest
from manytask.trainer.loss_signals import LossSignals, project_to_bounds

# Tags the sampler's random stream so it never coincides with another component that also
# seeds from (seed, step), e.g. a shuffle buffer.
_STREAM = 0x5A3B1E


_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def uniform(*key: int) -> float:
    """A uniform float in [0, 1) that is a pure function of the integers `key` (splitmix64).

    Used instead of `np.random.default_rng(key)`, whose seeding costs ~0.2 ms: this runs every
    training step on every rank.
    """
    h = 0
    for k in key:
        h = _splitmix64(h ^ (k & _MASK64))
    return (h >> 11) * 2.0**-53


class TaskSampler:
    """Per-step source probabilities and batch composition.

    sources:    source names, in the order every returned array/list follows.
    sizes:      samples per source (positive ints), same order.
    cfg:        strategy, mode and strategy options.
    seed:       run seed (non-negative); with the step, the only source of randomness.
    max_steps:  length of the run; the `annealed` schedule reaches alpha_end here.
    batch_size: samples per step (per rank) that `counts` distributes.
    source_tasks: source -> the tasks it labels (adaptive strategies: whose losses drive it).
    """

    def __init__(
        self,
        sources: list[str],
        sizes: list[int],
        cfg: SamplerConfig,
        seed: int,
        max_steps: int,
        batch_size: int,
        source_tasks: dict[str, list[str]] | None = None,
    ) -> None:
        if not sources:
            raise ConfigError("sampler: at least one source is required")
        if len(sizes) != len(sources):
            raise ConfigError(f"sampler: {len(sources)} sources but {len(sizes)} sizes")
        for name, n in zip(sources, sizes):
            if n <= 0:
                raise ConfigError(f"sampler: source '{name}' has {n} samples; every source needs at least one")
        if batch_size <= 0:
            raise ConfigError(f"sampler: batch_size must be positive, got {batch_size}")
        if seed < 0:
            raise ConfigError(f"sampler: seed must be non-negative, got {seed}")
        if cfg.strategy == "temperature" and (cfg.temperature <= 0 or cfg.size_cap <= 0):
            raise ConfigError(
                f"'sampler.temperature' and 'sampler.size_cap' must be positive, "
                f"got {cfg.temperature} and {cfg.size_cap}"
            )
        self.sources = list(sources)
        self.sizes = np.asarray(sizes, dtype=np.float64)
        self.cfg = cfg
        self.seed = int(seed)
        self.max_steps = max(int(max_steps), 1)
        self.batch_size = int(batch_size)
        cfg.check_sources(self.sources, None)
        lo, hi = cfg.bounds(self.sources)
        self.floor, self.ceiling = np.asarray(lo, dtype=np.float64), np.asarray(hi, dtype=np.float64)
        uses = self.strategies_used()
        self._manual = self._manual_weights() if "manual" in uses else None
        self.signals: LossSignals | None = None
        self.val_signals: LossSignals | None = None
        if uses & set(ADAPTIVE_MIXTURES):
            if source_tasks is None:
                raise ConfigError(f"'sampler.strategy' {cfg.strategy}: adaptive mixing needs the tasks each source labels")
            labels = [list(source_tasks.get(s, [])) for s in self.sources]
            tasks = list(dict.fromkeys(t for ts in labels for t in ts))
            self.signals = LossSignals(tasks, labels, cfg.ema, cfg.update_every)
            # validation losses are already means over a whole split: no smoothing, every one counts
            self.val_signals = LossSignals(tasks, labels, ema=0.0, update_every=1)
        self._points = [
            (p.step, p.strategy) if p.strategy else (p.step, self._normalized(p.weights)) for p in cfg.schedule
        ]
        self.samples = [0] * len(self.sources)  # cumulative samples drawn per source
        self.last_step = -1  # last step already added to `samples`

    def _manual_weights(self) -> np.ndarray:
        weights = self.cfg.weights
        for name in weights:
            if name not in self.sources:
                near = closest(name, self.sources)
                fix = f"; did you mean '{near}'?" if near else ""
                raise ConfigError(
                    f"'sampler.weights.{name}': unknown source{fix} (sources: {', '.join(self.sources)})"
                )
        for name in self.sources:
            if name not in weights:
                raise ConfigError(
                    f"'sampler.weights': no weight for source '{name}' "
                    f"(manual strategy needs one per source: {', '.join(self.sources)})"
                )
        vec = np.asarray([weights[s] for s in self.sources], dtype=np.float64)
        if (vec < 0).any() or not np.isfinite(vec).all() or vec.sum() <= 0:
            raise ConfigError(f"'sampler.weights': expected non-negative weights with a positive sum, got {weights}")
        return vec

    def strategies_used(self) -> set[str]:
        """The strategies this sampler evaluates: the chosen one, the schedule's, the base."""
        cfg = self.cfg
        named = {p.strategy for p in cfg.schedule if p.strategy} if cfg.strategy == "schedule" else {cfg.strategy}
        if named & set(ADAPTIVE_MIXTURES):
            named.add(cfg.base)
        return named

    def _normalized(self, weights: dict[str, float]) -> np.ndarray:
        vec = np.asarray([float(weights.get(s, 0.0)) for s in self.sources], dtype=np.float64)
        return vec / vec.sum()

    def alpha(self, step: int) -> float:
        """The `annealed` exponent at `step`: linear from alpha_start to alpha_end, then held."""
        frac = min(max(step / self.max_steps, 0.0), 1.0)
        return self.cfg.alpha_start + (self.cfg.alpha_end - self.cfg.alpha_start) * frac

    def probs(self, step: int) -> np.ndarray:
        """Sampling probabilities at `step`: float64 [num_sources], summing to 1, within the
        floors and ceilings."""
        if self.cfg.strategy == "schedule":
            p = self._scheduled(step)
        else:
            p = self._mixture(self.cfg.strategy, step)
        return project_to_bounds(p, self.floor, self.ceiling)

    def _mixture(self, strategy: str, step: int) -> np.ndarray:
        """One strategy's probabilities at `step` (before floors and ceilings)."""
        if strategy == "uniform":
            weights = np.ones_like(self.sizes)
        elif strategy == "proportional":
            weights = self.sizes
        elif strategy == "temperature":
            weights = np.minimum(self.sizes, self.cfg.size_cap) ** (1.0 / self.cfg.temperature)
        elif strategy == "annealed":
            weights = self.sizes ** self.alpha(step)
        elif strategy == "manual":
            weights = self._manual
        elif strategy in ADAPTIVE_MIXTURES:
            base = self._mixture(self.cfg.base, step)
            weights = base * self.source_signal(strategy) ** self.cfg.beta
        else:  # the config's Literal normally stops this earlier
            raise ConfigError(f"'sampler.strategy': unknown strategy {strategy!r}")
        return weights / weights.sum()

    def _scheduled(self, step: int) -> np.ndarray:
        """The schedule at `step`: the first point's mixture before it, the last one's after it,
        in between interpolated linearly (`interpolate: linear`) or the earlier one held."""
        points = self._points

        def at(i: int) -> np.ndarray:
            mixture = points[i][1]
            return self._mixture(mixture, step) if isinstance(mixture, str) else mixture

        later = next((i for i, (s, _) in enumerate(points) if s > step), len(points))
        if later == 0:
            return at(0)
        if later == len(points) or self.cfg.interpolate == "hold":
            return at(later - 1)
        (s0, _), (s1, _) = points[later - 1], points[later]
        t = (step - s0) / (s1 - s0)
        return (1.0 - t) * at(later - 1) + t * at(later)

    def source_signal(self, strategy: str) -> np.ndarray:
        """float64 [sources]: what drives adaptive `strategy` (L/L⁰, progress or V/V⁰)."""
        if strategy == "val_loss_ratio":
            return self.val_signals.source_signal("loss_ratio")
        return self.signals.source_signal(strategy)

    def observe_eval(self, step: int, metrics: dict[str, float]) -> None:
        """Feed an evaluation's `val/<task>/loss` (all-reduced: the same on every rank) to
        `val_loss_ratio`; a no-op for the other strategies."""
        if self.val_signals is not None:
            self.val_signals.observe(step, {t: metrics.get(f"val/{t}/loss", math.nan) for t in self.val_signals.tasks})

    def observe(self, step: int, losses: dict[str, float]) -> None:
        """Feed the agreed per-task mean losses of completed step `step` (1-based count of steps
        done; NaN for a task no rank saw) to the adaptive strategies; a no-op for fixed ones."""
        if self.signals is not None:
            self.signals.observe(step, losses)

    def _draw(self, step: int) -> list[int]:
        if len(self.sources) == 1:
            return [self.batch_size]
        p = self.probs(step)
        cum = np.cumsum(p)
        cum[-1] = 1.0  # rounding must not leave a sliver above the last source
        u = uniform(self.seed, int(step), _STREAM)
        if self.cfg.mode == "single":
            # Zero-probability sources occupy empty intervals and are never picked.
            out = [0] * len(p)
            out[int(np.searchsorted(cum, u, side="right"))] = self.batch_size
            return out
        edges = np.floor(u + self.batch_size * np.concatenate([[0.0], cum])).astype(np.int64)
        return np.diff(edges).tolist()

    def counts(self, step: int) -> list[int]:
        """Samples per source for `step` (same order as `sources`), summing to batch_size.

        Pure in (seed, step, config). The first call for a step also adds the counts to the
        cumulative `samples`; calling again for the same or an earlier step does not count twice.
        """
        out = self._draw(step)
        if step > self.last_step:
            self.samples = [a + b for a, b in zip(self.samples, out)]
            self.last_step = int(step)
        return out

    def metrics(self, step: int) -> dict[str, float]:
        """`sampler/<source>/prob` (at `step`) and `sampler/<source>/samples` (cumulative); with
        an adaptive strategy also `sampler/<source>/signal` (what drives the mixture: L/L⁰ for
        loss_ratio, the smoothed relative improvement for progress)."""
        p = self.probs(step)
        out: dict[str, float] = {}
        adaptive = sorted(self.strategies_used() & set(ADAPTIVE_MIXTURES))
        signals = {kind: self.source_signal(kind) for kind in adaptive}
        for i, name in enumerate(self.sources):
            out[f"sampler/{name}/prob"] = float(p[i])
            out[f"sampler/{name}/samples"] = float(self.samples[i])
            for kind, signal in signals.items():
                key = "signal" if len(signals) == 1 else f"signal_{kind}"
                out[f"sampler/{name}/{key}"] = float(signal[i])
        return out

    def state_dict(self) -> dict[str, Any]:
        """Plain Python: loads with `torch.load(weights_only=True)`."""
        state = {"sources": list(self.sources), "samples": list(self.samples), "last_step": self.last_step}
        if self.signals is not None:
            state["signals"] = self.signals.state_dict()
            state["val_signals"] = self.val_signals.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if list(state["sources"]) != self.sources:
            raise ValueError(
                f"sampler state was saved for sources {state['sources']}, this run has {self.sources}"
            )
        self.samples = [int(n) for n in state["samples"]]
        self.last_step = int(state["last_step"])
        if self.signals is not None:
            if "signals" not in state:
                raise ValueError("sampler state holds no loss signals: it was saved by a run with a fixed mixture")
            self.signals.load_state_dict(state["signals"])
            self.val_signals.load_state_dict(state["val_signals"])
