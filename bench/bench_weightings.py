"""Cost of each loss weighting: step time and peak memory relative to `equal`, at T = 2, 8, 32.

Run: `.venv/bin/python -m bench.bench_weightings` (~2 min on 2 CPU cores; `--smoke`: seconds).

One training step (forward of the bench MMoE, masked losses, the weighting's `combine`,
backward, `before_step`, Adam step) per weighting, in one process, repetitions alternating
between the weightings so a slow spell of the shared machine hits them all; a ratio is the
median over repetitions of (method time / equal time) within one repetition. Next to them,
the reference the gradient methods should cost: `equal` plus T extra backward passes of the
shared part (one `autograd.grad` per task w.r.t. the shared parameters), measured the same way;
the column "time / reference" is each method's time over the reference's, same repetition.
Memory: on CUDA the peak allocated bytes of the step; on CPU the peak heap in use (glibc
mallinfo2, sampled after forward, combine and backward) above the level before the step,
both relative to `equal`'s.
Expected: loss-only methods (uncertainty, dwa, famo, rlw, imtl_l, ...) ≈ 1×; the gradient
methods ≈ the reference (≤ ~1.2× of it: their [T, T] solvers are vectorised, float64).
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import time

import torch

from manytask.config import ModelConfig, TaskConfig, WeightingConfig
from manytask.models import build_model
from manytask.models.losses import task_losses
from manytask.models.spec import FieldSpec, ModelSpec, TaskSpec
from manytask.trainer.weightings import WEIGHTINGS, WeightingContext, build_weighting

BATCH, IN, EXPERTS, EXPERT_HIDDEN, TOWER = 512, 64, 4, [64], [16]
TASK_COUNTS, REPEATS = [2, 8, 32], 5
REFERENCE = "equal + T backward"


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


try:
    _libc = ctypes.CDLL("libc.so.6")
    _libc.mallinfo2.restype = _Mallinfo2
except (OSError, AttributeError):
    _libc = None


def heap_in_use() -> int:
    if torch.cuda.is_available():
        return torch.cuda.memory_allocated()
    if _libc is None:
        return 0
    info = _libc.mallinfo2()
    return int(info.uordblks + info.hblkhd)


def make_step(num_tasks: int, method: str):
    """A closure running one training step with `method` (or the reference) -> peak extra bytes."""
    torch.manual_seed(0)
    spec = ModelSpec(inputs={"x": FieldSpec("float32", (IN,))},
                     tasks={f"task{t}": TaskSpec("binary", 1) for t in range(num_tasks)}, sources=["s"])
    model = build_model(ModelConfig("mmoe", {"num_experts": EXPERTS, "expert_hidden": EXPERT_HIDDEN,
                                             "tower_hidden": TOWER}), spec)
    tasks = {t: TaskConfig("binary") for t in spec.tasks}
    weighting = build_weighting(WeightingConfig("equal" if method == REFERENCE else method), tasks)
    g = torch.Generator().manual_seed(0)
    inputs = {"x": torch.randn(BATCH, IN, generator=g)}
    source_id = torch.zeros(BATCH, dtype=torch.long)
    labels = {t: torch.randint(0, 2, (BATCH,), generator=g).float() for t in tasks}
    masks = {t: torch.rand(BATCH, generator=g) < 0.8 for t in tasks}
    counts = {t: int(m.sum()) for t, m in masks.items()}
    shared = [p for p in model.shared_parameters() if p.requires_grad]
    opt = torch.optim.Adam([*model.parameters(), *weighting.parameters()], lr=1e-4)

    def step() -> int:
        base = heap_in_use()
        out = model(inputs, source_id)
        losses = task_losses(out.outputs, labels, masks, spec.tasks)
        peak = heap_in_use()
        ctx = WeightingContext(representation=out.shared, last_shared_layer=list(model.last_shared_parameters()),
                               shared_params=shared, local_counts=counts)
        total, _ = weighting.combine(losses, ctx)
        if method == REFERENCE:
            for loss in losses.values():
                torch.autograd.grad(loss, shared, retain_graph=True, allow_unused=True)
        peak = max(peak, heap_in_use())
        opt.zero_grad(set_to_none=True)
        total.backward()
        peak = max(peak, heap_in_use())
        weighting.before_step()
        opt.step()
        return peak - base

    return step


def measure(num_tasks: int, methods: list[str]) -> dict[str, tuple[float, float, float, float]]:
    """method -> (median ms, median time ratio to equal, median time ratio to the reference,
    memory ratio to equal)."""
    steps = {m: make_step(num_tasks, m) for m in methods}
    for step in steps.values():
        step()  # warm-up: Adam state, allocator, lazily created buffers
    times: dict[str, list[float]] = {m: [] for m in methods}
    mem: dict[str, list[int]] = {m: [] for m in methods}
    for _ in range(REPEATS):
        for m, step in steps.items():
            start = time.perf_counter()
            mem[m].append(step())
            times[m].append(time.perf_counter() - start)
    out = {}
    for m in methods:
        ratio = statistics.median(a / b for a, b in zip(times[m], times["equal"]))
        to_reference = statistics.median(a / b for a, b in zip(times[m], times[REFERENCE]))
        mem_ratio = max(mem[m]) / max(max(mem["equal"]), 1)
        out[m] = (statistics.median(times[m]) * 1e3, ratio, to_reference, mem_ratio)
    return out


def main(argv: list[str] | None = None) -> None:
    global BATCH, REPEATS, TASK_COUNTS
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks the script runs")
    args = parser.parse_args(argv)
    if args.smoke:
        BATCH, REPEATS, TASK_COUNTS = 64, 1, [2]
    torch.set_num_threads(1 if args.smoke else torch.get_num_threads())
    methods = ["equal", REFERENCE, *[m for m in WEIGHTINGS if m != "equal"]]
    print(f"MMoE {EXPERTS} experts {EXPERT_HIDDEN}, towers {TOWER}, batch {BATCH}; ratios to `equal` "
          f"(median of {REPEATS} alternating repetitions)", flush=True)
    for T in TASK_COUNTS:  # one table per T, printed as soon as measured
        result = measure(T, methods)
        print(f"\nT={T} (equal step {result['equal'][0]:.1f} ms)\n"
              f"| weighting | time | time / reference | memory |\n| --- | ---: | ---: | ---: |")
        for m in methods:
            ms, ratio, to_reference, mem_ratio = result[m]
            print(f"| {m} | {ratio:.2f}x | {to_reference:.2f}x | {mem_ratio:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
