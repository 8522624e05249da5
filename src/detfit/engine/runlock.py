"""One writer per run folder: an advisory lock the OS releases when its holder dies.

The lock is ``fcntl.flock`` on the run folder itself (a directory can be flocked): taking it writes
nothing, so a refused command leaves the folder exactly as it was, and kill -9 never leaves it
stuck. Once the run starts writing, :meth:`RunLock.claim` records who holds it in
``RUN/.detfit.lock`` (pid, and under torchrun the launch): the second process's refusal names
that pid, and the launch owns the folder across elastic restarts. A worker torchrun restarts is a
new process (the old one's flock died with it), but its launcher, the torchrun agent, is the same:
a folder whose record names a live agent other than our own belongs to that launch, even in the
moment between a worker's death and its restart.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from pathlib import Path
from typing import Any

import psutil

from detfit import distributed
from detfit.errors import RunRefused

LOCK_RECORD = ".detfit.lock"


def _started(pid: int) -> float | None:
    """When process ``pid`` started (None: no such process): a pid and its start time name one
    process, whatever pid reuse does later."""
    try:
        return psutil.Process(pid).create_time()
    except (psutil.Error, OSError):
        return None


def launch_id() -> str:
    """Who this process writes for: the torchrun agent (our parent) under torchrun, which lives
    across elastic restarts; this very process otherwise."""
    pid = os.getppid() if distributed.launched_with_torchrun() else os.getpid()
    return f"{socket.gethostname()}:{pid}:{_started(pid)}"


def _alive(launch: str) -> bool:
    host, _, rest = launch.partition(":")
    pid, _, started = rest.partition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False  # another machine's launch: its flock there is what protects it
    return str(_started(int(pid))) == started


def _holder_pid_from_proc_locks(folder: Path) -> int | None:
    """The pid of the process holding a flock on ``folder``, from Linux's /proc/locks (the holder
    may not have written its record yet)."""
    try:
        inode = folder.stat().st_ino
        for line in Path("/proc/locks").read_text().splitlines():
            parts = line.split()
            if len(parts) >= 6 and parts[1] == "FLOCK" and parts[5].endswith(f":{inode}"):
                return int(parts[4])
    except (OSError, ValueError):
        pass
    return None


class RunLock:
    """The lock of one run folder, held from :meth:`acquire` until :meth:`release` (or death)."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.fd: int | None = None

    def record(self) -> dict[str, Any]:
        """What the last holder wrote in ``.detfit.lock`` ({} when nothing readable)."""
        try:
            data = json.loads((self.folder / LOCK_RECORD).read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def ours(self) -> bool:
        """True when the run in the folder was started by this launch (an earlier attempt of a
        torchrun job that --max-restarts restarted)."""
        return self.record().get("launch") == launch_id()

    def acquire(self) -> None:
        """Take the lock, or raise :class:`RunRefused` naming the process that holds it."""
        import fcntl

        if self.fd is not None:
            return
        fd = os.open(self.folder, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            # /proc/locks names the holder even before it writes its record (Linux); the record
            # is the answer elsewhere
            pid = _holder_pid_from_proc_locks(self.folder) or self.record().get("pid")
            who = f"process {pid}" if pid else "another process"
            raise RunRefused(
                f"{self.folder}: {who} is writing this run folder; wait for it to end or stop it "
                "(one run folder has one writer)"
            ) from None
        self.fd = fd
        launch = self.record().get("launch")
        if launch and launch != launch_id() and _alive(launch) and "torchrun" in self.record():
            self.release()
            agent = launch.split(":")[1]
            raise RunRefused(
                f"{self.folder}: the torchrun launch of process {agent} owns this run folder "
                "(a worker of it is restarting); wait for it to end or stop it"
            )

    def claim(self) -> None:
        """Say in the folder who writes it (call once the run starts writing, lock held)."""
        from detfit.fileio import atomic_write_text

        record = {"pid": os.getpid(), "launch": launch_id()}
        if distributed.launched_with_torchrun():
            record["torchrun"] = True
        atomic_write_text(self.folder / LOCK_RECORD, json.dumps(record) + "\n")

    def release(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.fd)  # closing the last descriptor drops the flock
            self.fd = None
