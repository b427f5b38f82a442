"""Stopping cleanly: SIGTERM / SIGUSR1 (what SLURM and Kubernetes send) and SIGINT (Ctrl-C)
ask the run to stop after the current step, with a checkpoint.

The handler only sets a flag; the loop shares it with the other ranks in the step's single
all-reduce, so every rank stops after the same step, saves, and exits 0 (a lone
`manytask train` stopped by Ctrl-C exits 130 after its checkpoint, as shells expect).
`die_with_parent` makes a worker receive SIGTERM when its launcher dies, even by SIGKILL.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from types import FrameType

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
_PR_SET_PDEATHSIG = 1

_received: list[str] = []  # names of stop signals this process received, oldest first


def last_stop_signal() -> str | None:
    """The most recent stop signal this process received ("SIGINT", ...), or None."""
    return _received[-1] if _received else None


class PreemptionFlag:
    def __init__(self) -> None:
        self.requested = False
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True
        self.signal_name = signal.Signals(signum).name
        _received.append(self.signal_name)

    def install(self) -> PreemptionFlag:
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Linux: have the kernel send `sig` to this process when its parent dies (a launcher
    killed with SIGKILL cannot forward anything); elsewhere a no-op. If the parent is already
    gone, `sig` is sent now."""
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            return
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:
        os.kill(os.getpid(), sig)
