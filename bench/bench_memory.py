"""Memory per rank of each engine on the same model: does sharding save memory?

For every (model size, engine) pair (DDP, DeepSpeed ZeRO-1/2/3, FSDP2), 2 real torchrun processes (gloo, CPU) build the job from
the demo recipe, train a few steps and write a checkpoint (bench/memory_worker.py). Printed
per engine: each rank's peak resident memory (host RSS, `getrusage`; on a GPU also
`torch.cuda.max_memory_allocated`), the ZeRO paper's model-state bytes per rank for fp32
training with Adam beside it, and the median step time relative to DDP's in the same run.

    python -m bench.bench_memory            # headline: 8 experts [4096, 4096] (~143M params), batch 32
    python -m bench.bench_memory --smoke    # tiny model, 2 steps: that it runs
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
NPROC = 2

# engine name -> recipe `engine` section
ENGINES: dict[str, dict] = {
    "ddp": {"name": "ddp"},
    "zero1": {"name": "deepspeed", "deepspeed": {"zero_optimization": {"stage": 1}}},
    "zero2": {"name": "deepspeed", "deepspeed": {"zero_optimization": {"stage": 2}}},
    "zero3": {"name": "deepspeed", "deepspeed": {"zero_optimization": {"stage": 3}}},
    "fsdp": {"name": "fsdp"},  # FSDP2: every layer of >= 1M parameters its own unit
}


@dataclass
class Size:
    label: str
    experts: int
    widths: list[int]
    batch: int
    steps: int


SIZES = [Size("~143M", 8, [4096, 4096], 32, 6), Size("~9M", 8, [1024, 1024], 32, 6)]
SMOKE = [Size("tiny", 2, [32], 16, 3)]


def model_state_bytes(engine: str, params: int, ranks: int) -> float:
    """Model-state bytes per rank for fp32 training with Adam (ZeRO paper, section 5, with
    K = 8 optimizer bytes and 4-byte parameters and gradients): parameters 4, gradients 4,
    optimizer 8 bytes per parameter; ZeRO-1 partitions the optimizer, ZeRO-2 also the
    gradients, ZeRO-3 (and FSDP) also the parameters."""
    p, n = params, ranks
    return {"ddp": 16 * p, "zero1": 8 * p + 8 * p / n, "zero2": 4 * p + 12 * p / n}.get(engine, 16 * p / n)


def write_recipe(folder: Path, data: Path, size: Size, engine: str) -> Path:
    recipe = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    recipe["run"].update(dir=str(folder / "run"), resume="never")
    recipe["data"]["sources"][0].update(train=str(data / "train"), val=str(data / "val"))
    recipe["data"].update(batch_size=size.batch, num_workers=0, shuffle_buffer=256)
    recipe["model"]["params"].update(num_experts=size.experts, expert_hidden=size.widths)
    recipe["trainer"].update(max_steps=size.steps, eval_every=10**6, log_every=10**6)
    recipe["checkpoint"].update(every=10**6, keep_last=1)
    recipe["logging"].update(wandb=False, progress=False, heatmap_every=0)
    recipe["engine"] = ENGINES[engine]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def run_engine(folder: Path, data: Path, size: Size, engine: str) -> dict:
    recipe = write_recipe(folder, data, size, engine)
    out = folder / "memory.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={NPROC}",
           "-m", "bench.memory_worker", str(recipe), str(out), str(size.steps)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{engine} at {size.label} failed:\n{proc.stderr[-4000:]}")
    return json.loads(out.read_text())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="a tiny model, 3 steps: that it runs")
    ap.add_argument("--engines", default=",".join(ENGINES), help="comma-separated subset of " + ",".join(ENGINES))
    args = ap.parse_args()
    from manytask.data_pipeline.synthetic import prepare_demo

    engines = args.engines.split(",")
    with tempfile.TemporaryDirectory(prefix="bench_memory_") as tmp:
        data = Path(tmp) / "data"
        prepare_demo(data, n_train=4096, n_val=512, shards=2, chunk_size=256)
        for size in SMOKE if args.smoke else SIZES:
            results = {e: run_engine(Path(tmp) / size.label / e, data, size, e) for e in engines}
            params = next(iter(results.values()))["params"]
            print(f"\n{size.label}: MMoE {size.experts} experts {size.widths}, {params / 1e6:.1f}M parameters, "
                  f"batch {size.batch}, {NPROC} ranks, {size.steps} steps + 1 checkpoint (CPU, gloo)")
            print("| engine | peak RSS/rank, MiB (build / train / +ckpt) | x DDP | model state/rank, MiB "
                  "| step time x DDP |" + (" CUDA max alloc, MiB |" if results[engines[0]]["ranks"][0]["cuda"] else ""))
            print("|---|---|---|---|---|")
            base = results.get("ddp", results[engines[0]])
            base_peak = max(r["saved"] for r in base["ranks"])
            base_step = max(r["step_s"] for r in base["ranks"])
            for engine, res in results.items():
                peak = max(r["saved"] for r in res["ranks"])
                build = max(r["built"] for r in res["ranks"])
                train = max(r["trained"] for r in res["ranks"])
                step = max(r["step_s"] for r in res["ranks"])
                theory = model_state_bytes(engine, params, NPROC) / 2**20
                cuda = res["ranks"][0]["cuda"]
                print(f"| {engine} | {build:,.0f} / {train:,.0f} / {peak:,.0f} | {peak / base_peak:.2f} | "
                      f"{theory:,.0f} | {step / base_step:.2f} |" + (f" {cuda:,.0f} |" if cuda else ""), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
