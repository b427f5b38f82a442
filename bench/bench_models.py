"""MMoE training-step speed: batched experts vs the looped-experts way, and task scaling.

Run: `.venv/bin/python -m bench.bench_models` (< 90 s on 2 CPU cores). On a machine with a GPU
it runs there (`--device cpu` to stay on the CPU); `--smoke` shrinks every size to check the
script in seconds (tests/test_bench_smoke.py).

1. One training step (forward, masked losses, backward, Adam step) of manytask's MMoE against a
   reference written the way LibMTL / DeepCTR-Torch write it (an nn.ModuleList of experts run
   in a Python loop and stacked, one gate and one tower module per task, mixture as
   `(w[..., None] * e).sum(1)`), same sizes, same run, alternating repetitions; E = 4, 8, 16,
   and E = 8 at DeepCTR-Torch's default sizes (there the second expert layer and the towers
   are GEMMs that run no faster batched than looped on a CPU).
2. The achieved FLOP/s of the batched step (matmul FLOPs of forward + backward counted by
   torch's FlopCounterMode) as a fraction of one plain `torch.mm` of the first expert layer's size,
   timed in the same interleaved repetitions.
Every closure runs once per repetition, alternating, REPEATS times. A ratio is the median over
repetitions of the ratio within one repetition (the two steps ran moments apart, so a slow spell
of this shared machine hits both); times printed are medians.
3. Batched step time at T = 2, 16, 64 tasks with the same experts, next to the growth of the
   step's matmul FLOPs (the floor for the time ratio), for three expert/tower sizes. On CPU
   the gate mixture is fused into the first tower layer (models/mixed_linear.py) and the
   towers' width-1 output layers run as M=1 GEMMs (models/layers.py stacked_dot).
Goals: batched >= 1.25x looped at E=8, >= 60% of the matmul FLOP/s, <= 2x from 2 to 64 tasks.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from manytask.config import ModelConfig
from manytask.models import build_model
from manytask.models.layers import mlp
from manytask.models.losses import task_losses
from manytask.models.spec import FieldSpec, ModelSpec, TaskSpec
from manytask.trainer.engines import optimizer_impl
from manytask.trainer.memory import keep_freed_memory

BATCH, IN, HIDDEN, TOWER = 1024, 256, 256, [16]
# (expert widths, tower widths) for the task-scaling rows: the one-layer experts of part 1,
# where 64 tasks' own FLOPs exceed the experts'; two-layer experts as in recommender MMoEs;
# and DeepCTR-Torch's MMoE defaults (experts (256, 128), towers (64,)).
SCALING_SIZES = [([HIDDEN], TOWER), ([512, 256], TOWER), ([256, 128], [64])]
REPEATS, STEPS = 40, 1
DEVICE = torch.device("cpu")  # set by main()


class LoopedMMoE(nn.Module):
    """The reference: experts, gates and towers as ModuleLists run one by one."""

    def __init__(self, in_dim: int, num_experts: int, experts: list[int], tower: list[int],
                 tasks: dict[str, TaskSpec]):
        super().__init__()
        self.tasks = list(tasks)
        self.experts = nn.ModuleList(mlp(in_dim, experts) for _ in range(num_experts))
        self.gates = nn.ModuleList(nn.Linear(in_dim, num_experts) for _ in tasks)
        self.towers = nn.ModuleList(mlp(experts[-1], [*tower, s.out_dim], last_activation=False)
                                    for s in tasks.values())

    def forward(self, inputs: dict[str, torch.Tensor], source_id: torch.Tensor):
        x = inputs["x"]
        e = torch.stack([expert(x) for expert in self.experts], dim=1)  # [B, E, D]
        outputs = {}
        for name, gate, tower in zip(self.tasks, self.gates, self.towers):
            w = torch.softmax(gate(x), dim=-1)  # [B, E]
            outputs[name] = tower((w.unsqueeze(-1) * e).sum(1))
        return outputs


def make_spec(num_tasks: int) -> ModelSpec:
    tasks = {f"task{t}": TaskSpec("binary", 1) for t in range(num_tasks)}
    return ModelSpec(inputs={"x": FieldSpec("float32", (IN,))}, tasks=tasks, sources=["s"])


def make_step(model: nn.Module, spec: ModelSpec, batched: bool):
    """A closure running one training step on a fixed random batch (on DEVICE)."""
    g = torch.Generator().manual_seed(0)
    inputs = {"x": torch.randn(BATCH, IN, generator=g).to(DEVICE)}
    source_id = torch.zeros(BATCH, dtype=torch.long, device=DEVICE)
    labels = {t: torch.randint(0, 2, (BATCH,), generator=g).float().to(DEVICE) for t in spec.tasks}
    masks = {t: (torch.rand(BATCH, generator=g) < 0.8).to(DEVICE) for t in spec.tasks}
    model.to(DEVICE)
    params = list(model.parameters())
    # the optimizer implementation manytask's trainer picks (fused on CPU and CUDA), for both
    opt = torch.optim.Adam(params, lr=1e-4, **optimizer_impl(params))

    def step() -> None:
        out = model(inputs, source_id)
        outputs = out.outputs if batched else out
        loss = sum(task_losses(outputs, labels, masks, spec.tasks).values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def time_steps(step, n: int = STEPS) -> float:
    sync()
    start = time.perf_counter()
    for _ in range(n):
        step()
    sync()
    return (time.perf_counter() - start) / n


def interleaved(steps: dict) -> dict[str, list[float]]:
    """Times of each closure over REPEATS repetitions that alternate between them."""
    for step in steps.values():
        step()  # warm-up (allocator, Adam state)
    times: dict = {k: [] for k in steps}
    for _ in range(REPEATS):
        for k, step in steps.items():
            times[k].append(time_steps(step))
    return times


def ratio(slow: list[float], fast: list[float]) -> float:
    """Median of the per-repetition ratios slow/fast."""
    return statistics.median(s / f for s, f in zip(slow, fast))


def plain_matmul(m: int, k: int, n: int):
    """A closure running one `torch.mm` [m, k] @ [k, n] (2mkn FLOPs)."""
    a, b = torch.randn(m, k, device=DEVICE), torch.randn(k, n, device=DEVICE)
    return lambda: torch.mm(a, b)


def _baddbmm_flops(self_shape, a_shape, b_shape, out_shape=None, **kwargs) -> int:
    batch, m, k = a_shape
    return 2 * batch * m * k * b_shape[-1]


def step_flops(step) -> float:
    """Matmul FLOPs of one step. torch's counter has no formula for the in-place `baddbmm_`
    (mixed_linear's weight-gradient accumulation), so it is given the out-of-place one."""
    with FlopCounterMode(display=False, custom_mapping={torch.ops.aten.baddbmm_: _baddbmm_flops}) as counter:
        step()
    return float(counter.get_total_flops())


def mmoe(spec: ModelSpec, num_experts: int, experts: list[int], tower: list[int]) -> nn.Module:
    params = {"num_experts": num_experts, "expert_hidden": experts, "tower_hidden": tower}
    return build_model(ModelConfig("mmoe", params), spec)


def main(argv: list[str] | None = None) -> None:
    global DEVICE, BATCH, IN, HIDDEN, SCALING_SIZES, REPEATS
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks the script runs")
    args = parser.parse_args(argv)
    DEVICE = torch.device(args.device)
    if args.smoke:
        BATCH, IN, HIDDEN, REPEATS = 64, 16, 16, 3
        SCALING_SIZES = [([16], TOWER), ([16, 8], [4])]
    keep_freed_memory()  # as in a manytask training process (trainer/memory.py)
    if DEVICE.type == "cpu":
        torch.set_num_threads(2)
    torch.manual_seed(0)
    start = time.perf_counter()
    where = f"{torch.get_num_threads()} threads" if DEVICE.type == "cpu" else torch.cuda.get_device_name(DEVICE)
    print(f"MMoE train step, batch {BATCH}, in {IN}, expert hidden {HIDDEN}, towers {TOWER}, {where}")
    print(f"{'E':>3} {'looped ms':>10} {'batched ms':>11} {'speed-up':>9} {'GFLOP/s':>8} {'of mm':>6}")
    spec = make_spec(2)
    # the sizes above for E = 4, 8, 16, then DeepCTR-Torch's MMoE defaults at E = 8
    for E, experts, tower in [(4, [HIDDEN], TOWER), (8, [HIDDEN], TOWER), (16, [HIDDEN], TOWER),
                              (8, *SCALING_SIZES[-1])]:
        batched = make_step(mmoe(spec, E, experts, tower), spec, batched=True)
        looped = make_step(LoopedMMoE(IN, E, experts, tower, spec.tasks), spec, batched=False)
        width = E * experts[0]
        t = interleaved({"looped": looped, "batched": batched, "mm": plain_matmul(BATCH, IN, width)})
        mm_flops = 2 * BATCH * IN * width
        med = {k: statistics.median(v) for k, v in t.items()}
        # achieved / peak = (step FLOPs / t_batched) / (mm FLOPs / t_mm), per repetition
        of_mm = ratio(t["mm"], t["batched"]) * step_flops(batched) / mm_flops
        size = "" if experts == [HIDDEN] else f"   experts {experts}, towers {tower}"
        print(f"{E:>3} {med['looped'] * 1e3:>10.1f} {med['batched'] * 1e3:>11.1f} "
              f"{ratio(t['looped'], t['batched']):>8.2f}x {of_mm * mm_flops / med['mm'] / 1e9:>8.1f} {of_mm:>6.0%}"
              f"   (mm {BATCH}x{IN}x{width}: {mm_flops / med['mm'] / 1e9:.1f} GFLOP/s){size}")

    # The goal (<= 2x from 2 to 64 tasks) can only hold where the experts carry most of the
    # step: the per-task work (gate, mixture, tower) is fixed by the sizes, so each row prints
    # the growth of the step's matmul FLOPs beside the growth of its time.
    print(f"\nTask scaling, E=8 experts (same experts for every T), batch {BATCH}")
    for experts, tower in SCALING_SIZES:
        steps, flops = {}, {}
        for T in (2, 16, 64):
            spec = make_spec(T)
            params = {"num_experts": 8, "expert_hidden": experts, "tower_hidden": tower}
            steps[T] = make_step(build_model(ModelConfig("mmoe", params), spec), spec, batched=True)
            flops[T] = step_flops(steps[T])
        t = interleaved(steps)
        cells = "  ".join(f"T={T}: {statistics.median(t[T]) * 1e3:6.1f} ms {ratio(t[T], t[2]):4.2f}x "
                          f"(FLOPs {flops[T] / flops[2]:4.2f}x)" for T in steps)
        print(f"experts {str(experts):>10} towers {str(tower):>5}  {cells}")
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
