"""A user's story on a cluster: start `manytask launch` on two "nodes" (two processes on
localhost joined by torchrun's c10d rendezvous), run it under the DeepSpeed launcher, and
check that the SLURM script starts one launcher per node with the rendezvous on the first."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, free_port, write_recipe


def env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def completed_checkpoint(run_dir: Path) -> dict:
    latest = (run_dir / "ckpt" / "latest").read_text().strip()
    return json.loads((run_dir / "ckpt" / latest / "COMPLETE").read_text())


@pytest.mark.slow
def test_two_nodes_join_through_c10d_rendezvous_and_finish(tmp_path, demo_shards):
    recipe = write_recipe(tmp_path, demo_shards, trainer={"max_steps": 20, "eval_every": 20, "log_every": 10},
                          logging={"wandb": False, "progress": False, "heatmap_every": 0})
    endpoint = f"127.0.0.1:{free_port()}"
    launch = [sys.executable, "-m", "manytask.launch.cli", "launch", "--nproc", "1", "--nnodes", "2",
              "--rdzv-endpoint", endpoint, "--rdzv-id", f"test-{os.getpid()}", str(recipe)]
    # Both "nodes" start at once; each may become the rendezvous host, the other joins it.
    nodes = [subprocess.Popen(launch, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=env(), cwd=ROOT) for _ in range(2)]
    outputs = []
    try:
        for node in nodes:
            outputs.append(node.communicate(timeout=420)[0])
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
    assert [n.returncode for n in nodes] == [0, 0], "\n----\n".join(o[-3000:] for o in outputs)
    assert sum(o.count("finished 20 steps") for o in outputs) == 1  # rank 0 reports, once
    done = completed_checkpoint(tmp_path / "run")
    assert done["step"] == 20 and done["world_size"] == 2
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("val/click/auc" in r and r["step"] == 20 for r in rows)


@pytest.mark.slow
def test_deepspeed_launcher_runs_the_cli(tmp_path, demo_shards):
    """`deepspeed --no_local_rank --module manytask.launch.cli train ...` sets RANK /
    WORLD_SIZE / LOCAL_RANK like torchrun; on CPU it runs with the CPU accelerator."""
    launcher = shutil.which("deepspeed", path=str(Path(sys.executable).parent))
    if launcher is None:
        pytest.skip("the deepspeed launcher is not installed")
    recipe = write_recipe(tmp_path, demo_shards, trainer={"max_steps": 10, "eval_every": 10, "log_every": 5},
                          engine={"name": "deepspeed", "deepspeed": {"zero_optimization": {"stage": 2}}},
                          logging={"wandb": False, "progress": False, "heatmap_every": 0})
    # A hostfile makes the launcher ssh even to localhost; without one it starts local ranks.
    cmd = [launcher, "--num_nodes", "1", "--num_gpus", "2", "--master_port", str(free_port()), "--no_local_rank",
           "--module", "manytask.launch.cli", "train", str(recipe)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env(), cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    done = completed_checkpoint(tmp_path / "run")
    assert done["step"] == 10 and done["world_size"] == 2


def test_slurm_script_starts_one_launcher_per_node(tmp_path):
    """launch/slurm.sbatch with SLURM's environment and stand-ins for scontrol and srun."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/bin/sh\nprintf 'gpu-a17\\ngpu-a18\\n'\n")
    (bin_dir / "srun").write_text(f"#!/bin/sh\nprintf '%s\\n' \"$@\" > {tmp_path / 'srun_args'}\n")
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    slurm = {"SLURM_JOB_NODELIST": "gpu-a[17-18]", "SLURM_NNODES": "2", "SLURM_JOB_ID": "4242",
             "SLURM_GPUS_ON_NODE": "8", "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    proc = subprocess.run(["bash", str(ROOT / "launch" / "slurm.sbatch"), "configs/demo.yaml", "trainer.max_steps=5"],
                          capture_output=True, text=True, env=dict(os.environ, **slurm), timeout=60)
    assert proc.returncode == 0, proc.stderr
    args = (tmp_path / "srun_args").read_text().split()
    assert args[:3] == ["--kill-on-bad-exit=1", "manytask", "launch"]
    flags = dict(zip(args[3:13:2], args[4:14:2]))
    assert flags == {"--nproc": "8", "--nnodes": "2", "--rdzv-endpoint": "gpu-a17:29500",
                     "--rdzv-id": "4242", "--max-restarts": "3"}
    assert args[13:] == ["configs/demo.yaml", "trainer.max_steps=5"]
