"""Which source feeds each step, identically on every rank without communication.

`TaskSampler` turns source sizes and a `SamplerConfig` into per-step sampling probabilities
and into per-step sample counts:

- `uniform`:      p_i = 1 / N
- `proportional`: p_i ∝ n_i
- `temperature`:  p_i ∝ min(n_i, K) ** (1 / T)                      (T5 / seqio mixing)
- `annealed`:     p_i ∝ n_i ** alpha, alpha falling linearly from alpha_start (step 0) to
                  alpha_end (step max_steps), then held                 (Stickland & Murray, 2019)
- `manual`:       p_i ∝ cfg.weights[source_i]

Mode `single` gives the whole batch to one source drawn with `probs(step)`; mode `mixed`
splits the batch by systematic rounding: one uniform offset u per step, and source i gets
floor(u + B * c_i) - floor(u + B * c_{i-1}) samples, c being the cumulative probabilities.
Each count is floor or ceil of B * p_i with expectation exactly B * p_i (unbiased over steps),
the counts always sum to B, and the variance is far below a multinomial draw's.

Every random number comes from `uniform(seed, step, _STREAM)` (a splitmix64 hash): all ranks draw
the same source at the same step, and the future after `load_state_dict` does not depend on
the past. The only state is bookkeeping (cumulative samples per source) for metrics.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from manytask.config import SamplerConfig
from manytask.schema import ConfigError, closest

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
    """

    def __init__(
        self,
        sources: list[str],
        sizes: list[int],
        cfg: SamplerConfig,
        seed: int,
        max_steps: int,
        batch_size: int,
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
        self._manual = self._manual_weights() if cfg.strategy == "manual" else None
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

    def alpha(self, step: int) -> float:
        """The `annealed` exponent at `step`: linear from alpha_start to alpha_end, then held."""
        frac = min(max(step / self.max_steps, 0.0), 1.0)
        return self.cfg.alpha_start + (self.cfg.alpha_end - self.cfg.alpha_start) * frac

    def probs(self, step: int) -> np.ndarray:
        """Sampling probabilities at `step`: float64 [num_sources], summing to 1."""
        strategy = self.cfg.strategy
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
        else:  # the config's Literal normally stops this earlier
            raise ConfigError(f"'sampler.strategy': unknown strategy {strategy!r}")
        return weights / weights.sum()

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
        """`sampler/<source>/prob` (at `step`) and `sampler/<source>/samples` (cumulative)."""
        p = self.probs(step)
        out: dict[str, float] = {}
        for i, name in enumerate(self.sources):
            out[f"sampler/{name}/prob"] = float(p[i])
            out[f"sampler/{name}/samples"] = float(self.samples[i])
        return out

    def state_dict(self) -> dict[str, Any]:
        """Plain Python: loads with `torch.load(weights_only=True)`."""
        return {"sources": list(self.sources), "samples": list(self.samples), "last_step": self.last_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if list(state["sources"]) != self.sources:
            raise ValueError(
                f"sampler state was saved for sources {state['sources']}, this run has {self.sources}"
            )
        self.samples = [int(n) for n in state["samples"]]
        self.last_step = int(state["last_step"])
