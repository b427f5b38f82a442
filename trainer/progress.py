"""Rank-0 progress bar: step, per-task loss and samples/s (tqdm; a no-op on other ranks)."""

from __future__ import annotations

import math
import sys

from tqdm import tqdm


class Progress:
    def __init__(self, enabled: bool, start: int, total: int):
        self.bar = (
            tqdm(total=total, initial=start, desc="train", dynamic_ncols=True, mininterval=2.0, file=sys.stdout)
            if enabled
            else None
        )
        self.last = start

    def update(self, step: int, losses: dict[str, float], samples_per_s: float) -> None:
        if self.bar is None:
            return
        shown = {t[:12]: f"{v:.3f}" for t, v in losses.items() if not math.isnan(v)}
        shown["samples/s"] = f"{samples_per_s:,.0f}"
        self.bar.set_postfix(shown, refresh=False)
        self.bar.update(step - self.last)
        self.last = step
        if step >= self.bar.total:
            self.bar.close()
