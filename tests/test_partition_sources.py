"""A new user's many-small-datasets run: 32 tables written by `manytask shards write` with its
defaults (one shard each) train under `manytask launch --nproc 2` — before sample-level
partitioning this stopped at once ("1 non-empty shards cannot feed 2 readers")."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from conftest import ROOT

from manytask.launch.cli import main as manytask

SOURCES = 32


@pytest.mark.slow
def test_32_one_shard_sources_train_on_2_processes(tmp_path):
    rng = np.random.default_rng(0)
    sources = []
    for i in range(SOURCES):
        n = int(rng.integers(2_000, 6_000))
        x = rng.standard_normal((n, 3)).astype(np.float32)
        np.savez(tmp_path / f"t{i}.npz", a=x[:, 0], b=x[:, 1], c=x[:, 2], y=x @ [1.0, -0.5, 0.25] + i % 3)
        out = tmp_path / f"src{i}"
        assert manytask(["shards", "write", str(tmp_path / f"t{i}.npz"), str(out),
                         "--features", "x=a,b,c", "--targets", "y"]) == 0
        assert len(json.loads((out / "train" / "manifest.json").read_text())["shards"]) == 1
        sources.append({"name": f"s{i}", "train": str(out / "train"), "val": str(out / "val"),
                        "inputs": ["x"], "labels": {f"task{i % 4}": "y"}})
    recipe = {
        "run": {"name": "many", "dir": str(tmp_path / "run"), "seed": 0},
        "data": {"batch_size": 64, "num_workers": 1, "shuffle_buffer": 512, "sources": sources,
                 "val_max_batches": 1},
        "tasks": {f"task{t}": {"type": "regression"} for t in range(4)},
        "model": {"name": "multi_head", "params": {"hidden": [8], "tower_hidden": [4]}},
        "trainer": {"max_steps": 4, "eval_every": 4, "log_every": 2, "warmup_steps": 1},
        "checkpoint": {"every": 1000},
        "logging": {"wandb": False, "progress": False, "heatmap_every": 0},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, "-m", "manytask.launch.cli", "launch", "--nproc", "2", str(path)],
                          capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in rows) == 4
    assert any(k.startswith("val/task") for r in rows for k in r)  # evaluation ran too


def test_one_worker_pool_serves_every_source(tmp_path):
    """8 sources, data.num_workers=2: two reader processes in all (not 8 x 2), and every step
    takes what the sampler asked of each source."""
    import multiprocessing

    from manytask.config import config_from_dict
    from manytask.data_pipeline.loader import MultiSourceLoader
    from manytask.data_pipeline.shard_writer import write_shards

    sources = []
    for i in range(8):
        write_shards(tmp_path / f"s{i}", {"x": np.full((300, 2), i, np.float32), "y": np.zeros(300, np.float32)})
        sources.append({"name": f"s{i}", "train": str(tmp_path / f"s{i}"), "inputs": ["x"], "labels": {"t": "y"}})
    cfg = config_from_dict({"data": {"batch_size": 64, "num_workers": 2, "sources": sources},
                            "tasks": {"t": {"type": "regression"}}})
    before = set(multiprocessing.active_children())
    with MultiSourceLoader(cfg) as loader:
        for step in range(5):
            counts = [(step + i) % 3 * 4 for i in range(8)]
            batch = loader.next_batch(counts)
            assert torch.bincount(batch.source_id, minlength=8).tolist() == counts
            assert torch.equal(batch.inputs["x"][:, 0].long(), batch.source_id)  # each row from its source
        assert len(set(multiprocessing.active_children()) - before) == 2
    assert not set(multiprocessing.active_children()) - before  # closed with the loader
