"""Samples/s and peak GPU memory of the demo model's training step.

Run: `.venv/bin/python -m bench.bench_gpu` on a machine with a GPU; elsewhere it prints
"no GPU: skipped" (`--cpu` runs the same measurement on the CPU, to check the script).

The model is configs/demo.yaml's (MMoE: 4 experts [64, 32], towers [16]) over the demo's
inputs (x: 100 floats) and tasks (2 regressions, 1 binary). Batches are made on the device
beforehand, so the number is the model step alone: one routed forward, masked task losses,
one backward, one AdamW step — in fp32 and in bf16 autocast (where supported), at several
batch sizes. Peak memory is `torch.cuda.max_memory_allocated` during the timed steps.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from manytask.config import load_config
from manytask.models import build_model
from manytask.models.losses import task_losses
from manytask.models.spec import FieldSpec, ModelSpec, TaskSpec

RECIPE = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
BATCHES = (256, 1024, 4096, 16384)
WARMUP, STEPS = 5, 30


def demo_spec() -> ModelSpec:
    """The demo data's fields and tasks, without reading its shards."""
    tasks = {"regress_a": TaskSpec("regression", 1), "regress_b": TaskSpec("regression", 1),
             "click": TaskSpec("binary", 1)}
    return ModelSpec(inputs={"x": FieldSpec("float32", (100,))}, tasks=tasks, sources=["synthetic"])


def measure(device: torch.device, batch: int, bf16: bool, steps: int = STEPS) -> tuple[float, float]:
    """(samples per second, peak memory in MiB or nan on CPU) of `steps` training steps."""
    spec = demo_spec()
    model = build_model(load_config(RECIPE).model, spec).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    inputs = {"x": torch.randn(batch, 100, device=device)}
    labels = {"regress_a": torch.randn(batch, device=device), "regress_b": torch.randn(batch, device=device),
              "click": torch.randint(0, 2, (batch,), device=device)}
    masks = {t: torch.ones(batch, dtype=torch.bool, device=device) for t in spec.tasks}
    source = torch.zeros(batch, dtype=torch.long, device=device)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = model(inputs, source)
            losses = task_losses(out.outputs, labels, masks, spec.tasks)
        sum(losses.values()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(WARMUP):
        step()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if cuda:
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if cuda else float("nan")
    return batch * steps / elapsed, peak


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cpu", action="store_true", help="measure on the CPU (checks the script)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() and not args.cpu:
        print("no GPU: skipped")
        return 0
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    precisions = [False]
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        precisions.append(True)
    batches = BATCHES if device.type == "cuda" else BATCHES[:2]
    print(f"demo model training step on {name} (torch {torch.__version__})\n")
    print("| batch | precision | samples/s | peak memory (MiB) |\n| --- | --- | --- | --- |")
    for batch in batches:
        for bf16 in precisions:
            rate, peak = measure(device, batch, bf16, STEPS if device.type == "cuda" else 5)
            mem = "—" if peak != peak else f"{peak:.0f}"
            print(f"| {batch} | {'bf16' if bf16 else 'fp32'} | {rate:,.0f} | {mem} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
