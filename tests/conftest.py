"""Shared fixtures: small demo shards, recipes written to tmp, real torchrun launches."""

from __future__ import annotations

import ast
import contextlib
import os
import re
import resource
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch.multiprocessing as mp
import yaml

ROOT = Path(__file__).resolve().parents[1]

# Tests never reach the network: W&B offline, quiet, and DeepSpeed's JIT-built ops cached
# beside the venv so only the first run on a machine pays for the build.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".venv" / "torch_extensions"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]



def read_epoch(manifest, skip: bool = False, fields: list[str] | None = None) -> tuple[list[int], int]:
    """(ids delivered, samples skipped) over epoch 0 of one unshuffled split, read by ShardStream
    (`skip`: skip_corrupt)."""
    from manytask.data_pipeline.stream import ShardStream

    stream = ShardStream(manifest, shuffle_buffer=0, skip_corrupt=skip, fields=fields)
    got, skipped = [], 0
    for block in stream.blocks():
        if block.before.epoch:
            break
        got += block.data["id"].tolist()
        skipped = block.after.skipped
    return got, skipped


def all_reduce_mean(x):
    """The mean of a tensor over the ranks of the default process group (a copy)."""
    import torch.distributed as dist

    y = x.detach().clone()
    dist.all_reduce(y)
    return y / dist.get_world_size()


@contextlib.contextmanager
def gloo_group(rank: int, world: int, store: str):
    """A spawned test rank's gloo process group on a file store, destroyed on the way out."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        yield
    finally:
        dist.destroy_process_group()

def spawn_ranks(worker, nprocs: int = 2) -> dict:
    """Run `worker(rank, port, out)` in `nprocs` real processes (a free TCP port for their
    process group, a shared dict for results); returns what the ranks put into `out`."""
    out = mp.Manager().dict()
    mp.spawn(worker, args=(free_port(), out), nprocs=nprocs, join=True)
    return dict(out)


@pytest.fixture(scope="session")
def demo_shards(tmp_path_factory) -> Path:
    """The demo's synthetic data, small: 8k train samples in 4 shards, 2k val."""
    from manytask.data_pipeline.synthetic import prepare_demo

    out = tmp_path_factory.mktemp("demo_data")
    prepare_demo(out, n_train=8000, n_val=2000, shards=4, chunk_size=256)
    return out


def write_recipe(tmp_path: Path, data_dir: Path, **sections) -> Path:
    """The demo recipe pointed at `data_dir`, small and fast, with `sections` merged in."""
    recipe = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    recipe["run"]["dir"] = str(tmp_path / "run")
    recipe["data"]["sources"][0]["train"] = str(data_dir / "train")
    recipe["data"]["sources"][0]["val"] = str(data_dir / "val")
    recipe["data"].update(batch_size=128, num_workers=0, shuffle_buffer=1024)
    recipe["trainer"].update(max_steps=60, lr=0.01, warmup_steps=5, eval_every=60, log_every=10)
    recipe["checkpoint"].update(every=1000)
    recipe["logging"].update(heatmap_every=30, progress=False)
    for section, values in sections.items():
        if isinstance(values, dict) and section != "tasks":  # tasks are replaced, not merged
            recipe.setdefault(section, {}).update(values)
        else:
            recipe[section] = values
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def torchrun(recipe: Path, *overrides: str, nproc: int = 2, timeout: float = 600, check: bool = True,
             extra_args: tuple[str, ...] = (), data_cap_mib: int | None = None) -> subprocess.CompletedProcess:
    """Run `manytask train` under a real torchrun with `nproc` CPU processes (gloo); with
    `data_cap_mib`, every process of the job (launcher included) under that RLIMIT_DATA."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           *extra_args, "-m", "manytask.launch.cli", "train", str(recipe), *overrides]
    cap = None if data_cap_mib is None else data_cap_mib << 20
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT,
                          preexec_fn=None if cap is None else lambda: resource.setrlimit(resource.RLIMIT_DATA, (cap, cap)))
    if check and proc.returncode != 0:
        raise AssertionError(f"torchrun failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


REFERENCE_STEPS = 60


def small_recipe(tmp_path: Path, shards: Path, name: str, **sections) -> Path:
    """A tiny MMoE on the demo data, 60 steps, every step logged, checkpoints every 20."""
    base = dict(
        data={"batch_size": 64, "num_workers": 2, "shuffle_buffer": 512},
        model={"name": "mmoe", "params": {"num_experts": 3, "expert_hidden": [16], "tower_hidden": [8]}},
        trainer={"max_steps": REFERENCE_STEPS, "lr": 0.02, "log_every": 1, "eval_every": 1000, "warmup_steps": 3},
        checkpoint={"every": 20, "keep_last": 2},
        logging={"wandb": False, "progress": False, "heatmap_every": 0},
    )
    for key, value in sections.items():
        base.setdefault(key, {}).update(value)
    folder = tmp_path / name
    folder.mkdir()
    return write_recipe(folder, shards, **base)


@pytest.fixture(scope="session")
def ddp_reference(tmp_path_factory, demo_shards) -> Path:
    """One uninterrupted 2-rank DDP run (2 DataLoader workers per rank, W&B offline) that the
    learning, logging and resume tests all read: its run directory."""
    tmp = tmp_path_factory.mktemp("ddp_reference")
    proc = torchrun(small_recipe(tmp, demo_shards, "ref", logging={"wandb": True, "heatmap_every": 10}))
    (tmp / "ref" / "stderr.txt").write_text(proc.stderr)  # what both ranks printed there
    return tmp / "ref" / "run"


DEEPSPEED = {"engine": {"name": "deepspeed", "deepspeed": {"zero_optimization": {"stage": 2}}},
             "data": {"num_workers": 0}}


@pytest.fixture(scope="session")
def deepspeed_reference(tmp_path_factory, demo_shards) -> Path:
    """One uninterrupted 2-rank DeepSpeed ZeRO-2 run: its run directory."""
    tmp = tmp_path_factory.mktemp("ds_reference")
    torchrun(small_recipe(tmp, demo_shards, "ref", **DEEPSPEED))
    return tmp / "ref" / "run"


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, demo_shards) -> Path:
    """One short single-process training of the demo recipe (60 steps, no W&B): its run
    directory, read by the model-in-use tests (load, eval, predict, export)."""
    from manytask.config import load_config
    from manytask.trainer.loop import train

    tmp = tmp_path_factory.mktemp("trained_run")
    silent = {"logging": {"wandb": False, "progress": False, "heatmap_every": 0}}
    train(load_config(write_recipe(tmp, demo_shards, **silent)))
    return tmp / "run"


# `make test-fast` runs the unit tests only (`-m "not processes"`): a test is marked `processes`
# when it, a module-level function or fixture it uses, or a shared fixture starts real processes
# or a training run. Found from the source, so a new test needs no marker by hand.
_STARTS_WORK = re.compile(
    r"\b(torchrun|spawn_ranks|mp\.spawn|subprocess\.\w+|Popen|train|run_sweep)\(|main\(\[\s*\"(train|launch|compare)\"")


def _function_sources(path: Path) -> dict[str, str]:
    tree = ast.parse(path.read_text())
    text = path.read_text()
    return {node.name: ast.get_source_segment(text, node) or "" for node in tree.body
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))}


def _heavy(sources: dict[str, str], known: set[str]) -> set[str]:
    """Names among `sources` that start work directly or through a name already heavy."""
    heavy = set(known) | {n for n, src in sources.items() if _STARTS_WORK.search(src)}
    while True:
        more = {n for n, src in sources.items() if n not in heavy
                and any(re.search(rf"\b{re.escape(h)}\b", src) for h in heavy)}
        if not more:
            return heavy
        heavy |= more


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "processes: starts real processes or a training run (make test-fast skips it)")


def pytest_collection_modifyitems(config, items) -> None:
    shared = _heavy(_function_sources(Path(__file__)), set())
    by_file: dict[Path, tuple[dict[str, str], set[str]]] = {}
    for item in items:
        path = Path(str(item.fspath))
        if path not in by_file:
            sources = _function_sources(path)
            by_file[path] = sources, _heavy(sources, shared)
        sources, heavy = by_file[path]
        name = item.originalname if hasattr(item, "originalname") else item.name
        if name in heavy or set(item.fixturenames) & heavy:
            item.add_marker(pytest.mark.processes)
