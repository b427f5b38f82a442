"""One job per run directory: `<run.dir>/run.lock`, held by rank 0 for the whole run.

The lock file is JSON `{host, pid, started, refreshed, token}`. It is created complete and
exclusively (written to a private temporary file, then hard-linked to `run.lock`: `link`
fails if the name exists, atomically, also on NFS; where hard links are unsupported,
`O_CREAT | O_EXCL`). A second job finds it and refuses, naming the owner. The owner
refreshes `refreshed` every `lease / 4` seconds from a daemon thread (write + atomic rename),
so a lock is stale when its process is dead on this host, or — from any node — when it has
not been refreshed for `lease` seconds; a stale lock is taken over with a warning. Two jobs
taking over the same stale lock at once: both rename, then read back, and the one whose
token is not there refuses.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

LOCK_FILE = "run.lock"


class RunLocked(RuntimeError):
    """Another live job holds the run directory; the message names it."""


@dataclass
class LockOwner:
    host: str
    pid: int
    started: float
    refreshed: float
    token: str

    def describe(self) -> str:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        return f"pid {self.pid} on host {self.host}, started {started}, last refreshed {time.time() - self.refreshed:.0f} s ago"


def read_owner(path: Path) -> LockOwner | None:
    """The lock's owner, or None when there is no lock (or it is unreadable: being replaced)."""
    try:
        data = json.loads(path.read_text())
        return LockOwner(str(data["host"]), int(data["pid"]), float(data["started"]), float(data["refreshed"]),
                         str(data["token"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stale_reason(owner: LockOwner, lease: float) -> str | None:
    """Why `owner`'s lock may be taken over, or None while it is held."""
    if owner.host == socket.gethostname() and not _alive(owner.pid):
        return f"its process {owner.pid} on this host is gone"
    age = time.time() - owner.refreshed
    if age > lease:
        return f"it was last refreshed {age:.0f} s ago (lease {lease:.0f} s)"
    return None


class RunLock:
    """`acquire()` or RunLocked; `release()` at the end (also safe when never acquired)."""

    def __init__(self, run_dir: Path, lease: float = 600.0):
        self.path = Path(run_dir) / LOCK_FILE
        self.lease = lease
        self.owner: LockOwner | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _write_tmp(self, owner: LockOwner) -> Path:
        tmp = self.path.with_name(f".{LOCK_FILE}.{owner.token}")
        with open(tmp, "w") as fh:
            json.dump(asdict(owner), fh)
            fh.flush()
            os.fsync(fh.fileno())
        return tmp

    def _create(self, owner: LockOwner) -> bool:
        """Create the lock exclusively with `owner`'s content; False if it exists."""
        tmp = self._write_tmp(owner)
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        except OSError:  # no hard links here: exclusive create, then the content
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "w") as fh:
                fh.write(tmp.read_text())
            return True
        finally:
            tmp.unlink(missing_ok=True)

    def acquire(self) -> LockOwner:
        now = time.time()
        me = LockOwner(socket.gethostname(), os.getpid(), now, now, uuid.uuid4().hex)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # a lock released or replaced while we look: look again
            if self._create(me):
                break
            owner = read_owner(self.path)
            if owner is None:
                if self.path.exists() and time.time() - self.path.stat().st_mtime > self.lease:
                    warnings.warn(f"taking over unreadable run lock {self.path}", stacklevel=2)
                    os.replace(self._write_tmp(me), self.path)
                    break
                time.sleep(0.2)
                continue
            reason = stale_reason(owner, self.lease)
            if reason is None:
                raise RunLocked(
                    f"run dir {self.path.parent} is in use by another job ({owner.describe()}; lock "
                    f"file {self.path}). Wait for it to end, stop it, or use another run.dir; a lock "
                    f"older than run.lock_lease={self.lease:.0f} s is taken over"
                )
            warnings.warn(f"taking over stale run lock {self.path} ({owner.describe()}): {reason}", stacklevel=2)
            os.replace(self._write_tmp(me), self.path)
            break
        else:
            raise RunLocked(f"could not take run lock {self.path}: it keeps changing")
        time.sleep(0.05)  # two takeovers at once: the last rename wins, the other sees it
        held = read_owner(self.path)
        if held is None or held.token != me.token:
            raise RunLocked(f"run dir {self.path.parent} was taken by another job at the same moment "
                            f"({held.describe() if held else 'unknown owner'})")
        self.owner = me
        self._thread = threading.Thread(target=self._refresh_loop, name="run-lock-refresh", daemon=True)
        self._thread.start()
        return me

    def refresh(self) -> None:
        """Renew the lease (only while the lock is still ours)."""
        if self.owner is None:
            return
        held = read_owner(self.path)
        if held is None or held.token != self.owner.token:
            warnings.warn(f"run lock {self.path} is no longer ours ({held.describe() if held else 'removed'})",
                          stacklevel=2)
            self._stop.set()
            return
        self.owner.refreshed = time.time()
        os.replace(self._write_tmp(self.owner), self.path)

    def _refresh_loop(self) -> None:
        while not self._stop.wait(self.lease / 4):
            try:
                self.refresh()
            except OSError as err:  # a file-system hiccup must not kill the run
                warnings.warn(f"could not refresh run lock {self.path}: {err}", stacklevel=2)

    def release(self) -> None:
        self._stop.set()
        if self.owner is None:
            return
        held = read_owner(self.path)
        if held is not None and held.token == self.owner.token:
            self.path.unlink(missing_ok=True)
        self.owner = None


def check_unlocked(run_dir: Path, lease: float) -> None:
    """RunLocked when a live job holds `run_dir` (what `manytask launch` checks before it
    starts any process; the job itself then acquires)."""
    path = Path(run_dir) / LOCK_FILE
    owner = read_owner(path)
    if owner is not None and stale_reason(owner, lease) is None:
        raise RunLocked(
            f"run dir {path.parent} is in use by another job ({owner.describe()}; lock file {path}). "
            f"Wait for it to end, stop it, or use another run.dir"
        )
