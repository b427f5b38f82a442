"""Trainer benchmarks, each a ratio against a baseline measured in the same run.

Run: `.venv/bin/python -m bench.bench_trainer` (about 2–3 minutes on 2 CPU cores).

1. Framework overhead: manytask's `train_step` vs a minimal hand-written PyTorch loop
   (forward, summed masked losses, backward, clip, AdamW step) on the same model and the same
   in-memory batches, one process. Goal: >= 0.95x.
2. DDP scaling: manytask's `train_step` (real loader) under torchrun with 2 ranks x 1 thread
   vs 1 rank x 1 thread, next to a bare DDP loop on the same model measured in the same
   processes (bench/ddp_worker.py), at the demo batch (256) and at 4096 samples per rank.
   Goal: >= 1.45x (a bare DDP loop gets ~1.5x when compute outweighs gloo's latency).
3. Checkpoints: save and load time for the demo model and a ~100M-parameter model.
4. Time to first step when resuming vs starting fresh (goal <= 2x).
5. One AdamW step of the ~100M-parameter model: the trainer's implementation (torch's fused
   kernel) vs foreach (what it used before) and torch's CPU default (a per-tensor loop).
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo.yaml"


def demo_data(tmp: Path) -> Path:
    from manytask.data_pipeline.synthetic import prepare_demo

    out = tmp / "data"
    prepare_demo(out, n_train=40_000, n_val=2_000, shards=8, chunk_size=1024)
    return out


def recipe(tmp: Path, data: Path, name: str, **trainer) -> Path:
    r = yaml.safe_load(DEMO.read_text())
    r["run"]["dir"] = str(tmp / name)
    r["data"]["sources"][0].update(train=str(data / "train"), val=str(data / "val"))
    r["data"].update(num_workers=0, val_max_batches=1)
    r["trainer"].update({"eval_every": 10**6, "log_every": 20, **trainer})
    r["checkpoint"]["every"] = 10**6
    r["logging"].update(wandb=False, progress=False, heatmap_every=0)
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(r))
    return path


# ---------------------------------------------------------------- 1. overhead
class MemoryBatches:
    """Stands in for MultiSourceLoader: the same precomputed batches, in order, forever."""

    def __init__(self, batches):
        self.batches, self.i = batches, 0

    def next_batch(self, counts):
        b = self.batches[self.i % len(self.batches)]
        self.i += 1
        return b


def overhead(tmp: Path, data: Path, rounds: int = 12, steps: int = 40) -> tuple[float, float, float]:
    """Samples/s of `train_step` and of the hand loop, and the median of their paired ratios."""
    from manytask.config import load_config
    from manytask.models.losses import task_losses
    from manytask.trainer.engines import optimizer_impl
    from manytask.trainer.loop import build_job, train_step

    torch.set_num_threads(2)
    cfg = load_config(recipe(tmp, data, "overhead"), ["weighting.name=equal", "run.resume=never"])
    job = build_job(cfg)
    batches = [job.data.next_batch([cfg.data.batch_size]) for _ in range(16)]
    job.data.close()
    job.data = MemoryBatches(batches)

    model = job.engine.module
    # the same optimizer implementation as the engine, so only framework overhead differs
    params = list(model.parameters())
    hand_opt = torch.optim.AdamW(params, lr=cfg.trainer.lr, **optimizer_impl(params))

    def hand_step(b):
        out = model(b.inputs, b.source_id)
        losses = task_losses(out.outputs, b.labels, b.masks, job.specs)
        loss = sum(losses.values())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.trainer.grad_clip)
        hand_opt.step()
        hand_opt.zero_grad(set_to_none=True)

    def time_ours(n):
        t = time.perf_counter()
        for s in range(n):
            train_step(job, s)
        return n * cfg.data.batch_size / (time.perf_counter() - t)

    def time_hand(n):
        t = time.perf_counter()
        for s in range(n):
            hand_step(batches[s % len(batches)])
        return n * cfg.data.batch_size / (time.perf_counter() - t)

    time_ours(20), time_hand(20)  # warm-up
    ours, hand = [], []
    for _ in range(rounds):  # short alternating rounds: drift in machine load hits both alike
        ours.append(time_ours(steps))
        hand.append(time_hand(steps))
    job.logger.finish()
    return statistics.median(ours), statistics.median(hand), statistics.median(o / h for o, h in zip(ours, hand))


# ---------------------------------------------------------------- 2. DDP scaling
DDP_BATCHES = (256, 4096)


def scaling(tmp: Path, data: Path, batch: int, rounds: int = 6, steps: int = 10) -> dict[str, float]:
    """2 ranks vs 1 rank (1 thread each) of manytask's step and of a bare DDP loop, same run.

    Launches alternate 1, 2, 1, 2 so that machine drift hits both world sizes alike; each
    launch times both loops in alternating rounds (bench/ddp_worker.py).
    """
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    path = recipe(tmp, data, f"ddp_{batch}", max_steps=10**6, log_every=10**6)
    r = yaml.safe_load(path.read_text())
    r["data"]["batch_size"] = batch
    r["weighting"] = {"name": "equal"}  # the bare loop sums the task losses: so does this
    path.write_text(yaml.safe_dump(r))
    runs: dict[int, list[dict[str, float]]] = {1: [], 2: []}
    for world in (1, 2, 1, 2):
        out = tmp / f"ddp_{batch}_{world}.json"
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}",
                        "-m", "bench.ddp_worker", str(path), str(out), str(rounds), str(steps)],
                       env=env, check=True, capture_output=True, cwd=ROOT)
        runs[world].append(json.loads(out.read_text()))
    keys = ("ours", "bare", "ours_memory")
    best = {w: {k: max(r[k] for r in rs) for k in keys} for w, rs in runs.items()}
    return {f"{k}_{w}": best[w][k] for w in (1, 2) for k in keys}


# ---------------------------------------------------------------- 3. checkpoints
class _Engine:
    """A model and its optimizer as one checkpoint part, as the trainer registers them."""

    def __init__(self, model: torch.nn.Module, opt: torch.optim.Optimizer):
        self.model, self.opt = model, opt

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.opt.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])


def checkpoint_times(tmp: Path, model: torch.nn.Module, checksums: bool = True) -> tuple[float, float, int]:
    """Seconds to save (with the finiteness check and, if asked, per-file checksums) and to
    verify + load a checkpoint of `model` and its AdamW state; its size in bytes."""
    from manytask.trainer.checkpoint import Checkpointer
    from manytask.trainer.distributed import DistInfo

    opt = torch.optim.AdamW(model.parameters())
    for p in model.parameters():  # one step so the optimizer holds its full state
        p.grad = torch.ones_like(p)
    opt.step()
    ck = Checkpointer(tmp / f"ck_{id(model)}_{checksums}", DistInfo(), keep_last=1, checksums=checksums)
    ck.register("engine", _Engine(model, opt), must_be_finite=True)
    t = time.perf_counter()
    path = ck.save(1)
    save_s = time.perf_counter() - t
    t = time.perf_counter()
    ck.restore(ck.load(ck.resolve("auto")))
    load_s = time.perf_counter() - t
    size = sum(f.stat().st_size for f in path.iterdir())
    shutil.rmtree(ck.root)
    return save_s, load_s, size


def checksum_cost(tmp: Path, model: torch.nn.Module, rounds: int = 5) -> tuple[float, float]:
    """Median ratio (save with checksums / without, verify+load / load) over paired rounds."""
    save_ratio, load_ratio = [], []
    for _ in range(rounds):
        with_s, with_l, _ = checkpoint_times(tmp, model, checksums=True)
        without_s, without_l, _ = checkpoint_times(tmp, model, checksums=False)
        save_ratio.append(with_s / without_s)
        load_ratio.append(with_l / without_l)
    return statistics.median(save_ratio), statistics.median(load_ratio)


def time_to_first_step(tmp: Path, data: Path) -> tuple[float, float]:
    """Seconds from process start to the first logged training step, fresh vs resumed."""
    env = dict(os.environ, OMP_NUM_THREADS="2", WANDB_MODE="disabled")
    path = recipe(tmp, data, "resume", max_steps=40)
    r = yaml.safe_load(path.read_text())
    r["trainer"]["log_every"] = 1
    r["checkpoint"]["every"] = 20
    path.write_text(yaml.safe_dump(r))

    def first_step_seconds(max_steps: int, first: int) -> float:
        t = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "manytask.launch.cli", "train", str(path),
                                 f"trainer.max_steps={max_steps}"], env=env, cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        metrics = tmp / "resume" / "metrics.jsonl"
        while True:
            if metrics.exists() and any(json.loads(x)["step"] == first for x in metrics.read_text().splitlines()):
                elapsed = time.perf_counter() - t
                proc.wait()
                return elapsed
            if proc.poll() is not None and proc.returncode != 0:
                raise RuntimeError("training run failed")
            time.sleep(0.01)

    fresh = first_step_seconds(20, 1)
    resumed = first_step_seconds(40, 21)
    return fresh, resumed


# ---------------------------------------------------------------- 5. optimizer step
def optimizer_steps(model: torch.nn.Module, repeats: int = 5) -> tuple[str, dict[str, float]]:
    """The trainer's implementation's name, and the fastest of `repeats` interleaved AdamW
    steps (seconds) per implementation: the trainer's, foreach and the per-tensor loop."""
    from manytask.trainer.engines import optimizer_impl

    params = list(model.parameters())
    trainer = optimizer_impl(params)
    impls = {"trainer": trainer, "foreach": {"foreach": True}, "loop": {"foreach": False}}
    copies = {k: [torch.nn.Parameter(p.detach().clone()) for p in params] for k in impls}
    opts = {k: torch.optim.AdamW(copies[k], lr=1e-3, **kw) for k, kw in impls.items()}
    for k, ps in copies.items():
        for p in ps:
            p.grad = torch.ones_like(p)
        opts[k].step()  # creates the state
    times: dict[str, list[float]] = {k: [] for k in impls}
    for _ in range(repeats):
        for k, opt in opts.items():
            t = time.perf_counter()
            opt.step()
            times[k].append(time.perf_counter() - t)
    return next(iter(trainer)), {k: min(v) for k, v in times.items()}


def main() -> None:
    print(__doc__.split("\n\n")[0])
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        data = demo_data(tmp)

        ours, hand, ratio = overhead(tmp, data)
        print(f"\n1. train_step vs hand-written loop (demo MMoE, batch 256, 2 threads)\n"
              f"   manytask {ours:10,.0f} samples/s   hand-written {hand:10,.0f} samples/s   "
              f"ratio {ratio:.2f}x  (median of 12 paired rounds; goal >= 0.95x)")

        print("\n2. DDP scaling: 2 ranks vs 1 rank, 1 thread each, demo MMoE (samples/s over all ranks;\n"
              "   manytask = train_step on the real loader, bare = minimal DDP loop on in-memory batches)")
        for batch in DDP_BATCHES:
            r = scaling(tmp, data, batch)
            print(f"   batch {batch:5d}/rank  manytask {r['ours_1']:9,.0f} -> {r['ours_2']:9,.0f}  "
                  f"ratio {r['ours_2'] / r['ours_1']:.2f}x   bare DDP {r['bare_1']:9,.0f} -> {r['bare_2']:9,.0f}  "
                  f"ratio {r['bare_2'] / r['bare_1']:.2f}x   (manytask on in-memory batches "
                  f"{r['ours_memory_2'] / r['ours_memory_1']:.2f}x)")
        print("   goal >= 1.45x where a bare DDP loop gets ~1.5x; at batch 256 this 40k-parameter model's\n"
              "   per-step gloo all-reduce latency outweighs its compute for any DDP loop")

        print("\n3. checkpoint save / load (model + AdamW state)")
        from manytask.config import load_config
        from manytask.models import build_model
        from manytask.trainer.specs import build_model_spec

        cfg = load_config(recipe(tmp, data, "spec"))
        demo_model = build_model(cfg.model, build_model_spec(cfg)[1])
        n_demo = sum(p.numel() for p in demo_model.parameters())
        big = torch.nn.Sequential(*[torch.nn.Linear(2048, 2048) for _ in range(24)])
        n_big = sum(p.numel() for p in big.parameters())
        for name, model, n in (("demo", demo_model, n_demo), ("~100M", big, n_big)):
            save_s, load_s, size = checkpoint_times(tmp, model)
            print(f"   {name:>10} {n / 1e6:7.2f}M params  {size / 2**20:8.1f} MiB   "
                  f"save {save_s:6.2f}s ({size / 2**20 / save_s:6.0f} MiB/s)   load {load_s:6.2f}s")
        save_ratio, load_ratio = checksum_cost(tmp, big)
        print(f"   checksums (xxh3 of every file, verified on resume), ~100M: save {save_ratio:.2f}x, "
              f"verify + load {load_ratio:.2f}x of the same without (median of 5 paired rounds; goal save <= 1.15x)")

        fresh, resumed = time_to_first_step(tmp, data)
        print(f"\n4. time to first step: fresh {fresh:.1f}s   resumed {resumed:.1f}s   "
              f"ratio {resumed / fresh:.2f}x  (goal <= 2x)")

        impl, t = optimizer_steps(big)  # 2 threads, as set for part 1
        print(f"\n5. AdamW step, {n_big / 1e6:.0f}M params, 2 threads: trainer ({impl}) {t['trainer'] * 1e3:.0f} ms"
              f"   foreach {t['foreach'] * 1e3:.0f} ms ({t['foreach'] / t['trainer']:.2f}x slower)"
              f"   per-tensor loop {t['loop'] * 1e3:.0f} ms ({t['loop'] / t['trainer']:.2f}x slower)")


if __name__ == "__main__":
    main()
