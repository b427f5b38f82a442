"""The trained model in use, each figure a ratio against a baseline measured in the same run.

Run: `.venv/bin/python -m bench.bench_predict [--smoke]` (about a minute on 2 CPU cores).

1. `manytask predict` throughput (rows/s: read shards, forward, write Parquet in parts) vs the
   training loop's forward (train mode, autograd on) over the same samples already in memory,
   and the eval-mode no-grad forward alone on those batches.
2. Latency per batch of the exported program (`torch.export`, what a serving process runs)
   vs the same model called eagerly, on CPU (and on the GPU when there is one), at batch
   sizes 1, 256 and 4096; medians over repetitions.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]


def train_demo(tmp: Path, n_val: int) -> Path:
    from manytask.config import load_config
    from manytask.data_pipeline.synthetic import prepare_demo
    from manytask.trainer.loop import train

    data = tmp / "data"
    prepare_demo(data, n_train=8_192, n_val=n_val, shards=2, chunk_size=1024)
    r = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    r["run"]["dir"] = str(tmp / "run")
    r["data"]["sources"][0].update(train=str(data / "train"), val=str(data / "val"))
    r["data"].update(num_workers=0, val_max_batches=1)
    r["trainer"].update(max_steps=20, eval_every=10**6, log_every=10)
    r["logging"].update(wandb=False, progress=False, heatmap_every=0)
    (tmp / "demo.yaml").write_text(yaml.safe_dump(r))
    train(load_config(tmp / "demo.yaml"))
    return tmp / "run"


def best_of(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def latency(fn, x: dict, device: str, reps: int) -> float:
    """Median seconds of fn(x) after 3 warm-up calls (synchronised on a GPU)."""
    for _ in range(3):
        fn(x)

    def call() -> None:
        fn(x)
        if device == "cuda":
            torch.cuda.synchronize()

    return best_of(call, reps)


def predict_throughput(run: Path, tmp: Path, reps: int) -> None:
    import manytask
    from manytask.data_pipeline.manifest import load_manifest
    from manytask.trainer.inference import shard_batches
    from manytask.trainer.predict_file import predict_to_file

    loaded = manytask.load(run)
    val = run.parent / "data" / "val"
    batches = [a for _, a in shard_batches(load_manifest(val), ["x"], 4096)]
    rows = sum(len(a["x"]) for a in batches)
    inputs = [{"x": torch.from_numpy(a["x"])} for a in batches]
    ids = [torch.zeros(len(a["x"]), dtype=torch.long) for a in batches]
    model = loaded.model

    def training_forward() -> None:
        model.train()
        for x, s in zip(inputs, ids):
            out = model(x, s)
            sum(v.sum() for v in out.outputs.values())  # what the loss reads; no backward
        model.eval()

    @torch.no_grad()
    def eval_forward() -> None:
        for x, s in zip(inputs, ids):
            model(x, s)

    def predict_file() -> None:
        predict_to_file(loaded, val, tmp / "pred.parquet", batch_size=4096)

    ratios, results = [], {"predict": [], "train_fwd": [], "eval_fwd": []}
    for _ in range(reps):  # paired rounds: a ratio per round, the median printed
        tf, ef, pf = best_of(training_forward, 1), best_of(eval_forward, 1), best_of(predict_file, 1)
        results["train_fwd"].append(rows / tf)
        results["eval_fwd"].append(rows / ef)
        results["predict"].append(rows / pf)
        ratios.append(tf / pf)
    med = {k: statistics.median(v) for k, v in results.items()}
    print(f"1. predict, {rows} rows of the demo (x float32 [100], MMoE, 3 tasks), batch 4096")
    print(f"   manytask predict (shards -> Parquet):   {med['predict']:>12,.0f} rows/s")
    print(f"   training loop's forward (in memory):    {med['train_fwd']:>12,.0f} rows/s")
    print(f"   eval no-grad forward (in memory):       {med['eval_fwd']:>12,.0f} rows/s")
    print(f"   predict / training forward: {statistics.median(ratios):.2f}x (median of {reps} paired rounds)")


def export_latency(run: Path, tmp: Path, reps: int, sizes: list[int]) -> None:
    import manytask
    from manytask.trainer.export import ServingModel, export_model
    from manytask.trainer.model_io import load_trained

    trained = load_trained(run)
    path = tmp / "export" / "model.pt2"
    export_model(trained, path)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print("2. exported program vs eager, latency per batch (median ms)")
    print(f"   {'device':6} {'batch':>6} {'eager':>9} {'exported':>9} {'eager/exported':>15}")
    x_all = torch.randn(max(sizes), 100)
    for device in devices:
        program = torch.export.load(str(path)).module().to(device)
        eager = ServingModel(manytask.load(run).model.to(device), trained.spec).eval()
        for n in sizes:
            x = {"x": x_all[:n].to(device)}
            with torch.no_grad():
                te = latency(eager, x, device, reps)  # as manytask.load(...).predict runs it
                tp = latency(program, x, device, reps)
            print(f"   {device:6} {n:>6} {te * 1e3:>9.3f} {tp * 1e3:>9.3f} {te / tp:>14.2f}x")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, to check the bench runs")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    n_val, reps, lat_reps = (4_096, 1, 3) if args.smoke else (65_536, 5, 50)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        run = train_demo(tmp, n_val)
        predict_throughput(run, tmp, reps)
        export_latency(run, tmp, lat_reps, [1, 256] if args.smoke else [1, 256, 4096])
    return 0


if __name__ == "__main__":
    sys.exit(main())
