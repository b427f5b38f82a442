"""`manytask launch`: a thin wrapper that builds and runs the torchrun command.

Single node: `--nproc N` (torchrun --standalone). Multi-node: `--nnodes M --rdzv-endpoint
HOST:PORT [--rdzv-id ID]` on every node (c10d rendezvous). `--max-restarts K` restarts all
ranks after a failure; the job resumes from its latest checkpoint (`run.resume: auto`).
"""

from __future__ import annotations

import argparse
import os
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nproc", type=int, default=int(os.environ.get("MANYTASK_NPROC", 2)),
                        help="processes per node (one per GPU on GPU nodes)")
    parser.add_argument("--nnodes", default="1", help="number of nodes, or MIN:MAX for elastic jobs")
    parser.add_argument("--rdzv-endpoint", default=None, help="HOST:PORT of the rendezvous (multi-node)")
    parser.add_argument("--rdzv-id", default=os.environ.get("SLURM_JOB_ID", "manytask"),
                        help="job id shared by all nodes")
    parser.add_argument("--max-restarts", type=int, default=0, help="restarts after a rank fails")
    parser.add_argument("recipe")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value")


def torchrun_command(args: argparse.Namespace) -> list[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={args.nproc}",
           f"--max-restarts={args.max_restarts}"]
    if args.rdzv_endpoint:
        cmd += [f"--nnodes={args.nnodes}", "--rdzv-backend=c10d",
                f"--rdzv-endpoint={args.rdzv_endpoint}", f"--rdzv-id={args.rdzv_id}"]
    else:
        cmd += ["--standalone", "--nnodes=1"]
    return cmd + ["-m", "manytask.launch.cli", "train", args.recipe, *args.overrides]


def launch(args: argparse.Namespace) -> int:
    """Replace this process with torchrun, so SIGTERM from SLURM/Kubernetes reaches torchrun's
    agent (which forwards it to every rank) instead of ending a wrapper."""
    env = dict(os.environ)
    # One BLAS/OpenMP thread per rank unless the user chose otherwise: N ranks on N cores.
    env.setdefault("OMP_NUM_THREADS", "1")
    cmd = torchrun_command(args)
    sys.stdout.flush()
    os.execve(cmd[0], cmd, env)
    return 1  # not reached
