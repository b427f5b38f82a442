"""`manytask launch`: a thin wrapper that builds and runs the torchrun command.

Single node: `--nproc N` (torchrun --standalone). Multi-node: `--nnodes M --rdzv-endpoint
HOST:PORT [--rdzv-id ID]` on every node (c10d rendezvous). `--max-restarts K` restarts all
ranks after a failure; the job resumes from its latest checkpoint (`run.resume: auto`).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from pathlib import Path

from manytask.trainer.preemption import STOP_SIGNALS, die_with_parent


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
    # torchrun leaves stop signals alone (see `launch`); it still cleans up on SIGHUP/SIGQUIT.
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={args.nproc}",
           f"--max-restarts={args.max_restarts}", "--signals-to-handle=SIGHUP,SIGQUIT"]
    if args.rdzv_endpoint:
        cmd += [f"--nnodes={args.nnodes}", "--rdzv-backend=c10d",
                f"--rdzv-endpoint={args.rdzv_endpoint}", f"--rdzv-id={args.rdzv_id}"]
    else:
        cmd += ["--standalone", "--nnodes=1"]
    return cmd + ["-m", "manytask.launch.cli", "train", args.recipe, *args.overrides]


def launch(args: argparse.Namespace) -> int:
    """Run torchrun as a child and stay in charge of signals; returns the exit status.

    SIGTERM / SIGUSR1 / SIGINT to this launcher are passed to every local rank as SIGTERM:
    each finishes its step, all checkpoint together and exit 0, so torchrun and this launcher
    exit 0 (130 after a SIGINT, as shells expect). torchrun runs in its own session (a
    terminal's Ctrl-C reaches only the launcher) and ignores these signals: when a scheduler
    signals every process of the job at once (SLURM), the ranks stop cleanly and torchrun
    waits for them instead of tearing them down and failing. It dies with the launcher,
    even a SIGKILLed one, and the ranks then get SIGTERM from the kernel (`die_with_parent`),
    so no worker outlives its launcher.
    """
    env = dict(os.environ)
    # One BLAS/OpenMP thread per rank unless the user chose otherwise: N ranks on N cores.
    env.setdefault("OMP_NUM_THREADS", "1")
    cmd = torchrun_command(args)
    sys.stdout.flush()
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, preexec_fn=_torchrun_signals)
    stop = StopForwarder(proc.pid)
    previous = {sig: signal.signal(sig, stop.request) for sig in STOP_SIGNALS}
    try:
        while True:
            try:
                code = proc.wait(timeout=0.5)
                break
            except subprocess.TimeoutExpired:
                stop.forward()  # again: a rank still starting up ignores it until it can stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if stop.signal == signal.SIGINT and code == 0:
        return 130
    return code


def _torchrun_signals() -> None:
    """In the torchrun child before exec: ignore the stop signals (inherited by the ranks
    until they install their own handler) and die with the launcher."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    die_with_parent(signal.SIGKILL)


class StopForwarder:
    """Remembers a stop signal and passes SIGTERM to the ranks (torchrun's children); a second
    stop signal kills them and torchrun at once."""

    def __init__(self, torchrun_pid: int):
        self.torchrun_pid = torchrun_pid
        self.signal: int | None = None

    def request(self, signum: int, frame: object) -> None:
        if self.signal is not None:  # a second Ctrl-C: the user does not want to wait
            print("manytask: second stop signal: killing the ranks without a checkpoint", file=sys.stderr, flush=True)
            for pid in [*rank_pids(self.torchrun_pid), self.torchrun_pid]:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            return
        self.signal = signum
        self.forward()

    def forward(self) -> None:
        if self.signal is None:
            return
        for pid in rank_pids(self.torchrun_pid):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass


def rank_pids(torchrun_pid: int) -> list[int]:
    """PIDs of torchrun's worker processes (its children running manytask), from /proc."""
    pids = []
    for task in Path(f"/proc/{torchrun_pid}/task").glob("*"):
        try:
            pids += [int(p) for p in (task / "children").read_text().split()]
        except (OSError, ValueError):
            continue
    ranks = []
    for pid in pids:
        try:
            if b"manytask.launch.cli" in Path(f"/proc/{pid}/cmdline").read_bytes():
                ranks.append(pid)
        except OSError:
            continue
    return ranks
