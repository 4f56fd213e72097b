"""One writer per run directory: a lock that rank 0 of a job takes on `run.dir/.lock` before anything is written there,
and holds for the job's lifetime.

It is a POSIX record lock (`fcntl.lockf`): the kernel releases it when the holding process dies, by any signal, so a
crash never leaves a stale lock behind, and it is not inherited by the processes a rank forks (data workers), so a
dead rank's workers cannot keep it. A second job on the same directory is refused with one line naming the holder,
read from the file the holder wrote (host, pid, since when, the Slurm job when there is one). While the lock is held,
nothing in the run directory can be another live job's work in progress: start-up may remove half-written
checkpoints.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket
from pathlib import Path

from trainer.errors import UserError
from trainer.writable import REFUSALS

LOCK_FILE = ".lock"


class RunLock:
    """The lock on one run directory (taken by `acquire`, released by `release` or by the process's death)."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        """Takes the lock or raises a UserError naming the job that holds it, or saying why run.dir cannot be written
        (a read-only file system, permissions, a path under a file): the lock is the first thing written there."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            if e.errno not in REFUSALS:
                raise
            raise UserError(
                f"run.dir {self.path.parent} cannot be written ({e.strerror}: {e.filename}): give run.dir a writable "
                f"location"
            ) from None
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)  # closing our own descriptor releases nothing: we hold no lock on it
            raise UserError(
                f"run.dir {self.path.parent} is in use by another job ({self.holder()}): wait for it to end or stop "
                f"it, or give this run another run.dir"
            ) from None
        holder = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "since": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        }
        if os.environ.get("SLURM_JOB_ID"):
            holder["slurm_job"] = os.environ["SLURM_JOB_ID"]
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        self._fd = fd

    def holder(self) -> str:
        """Who holds the lock, in words, as its holder wrote it."""
        try:
            info = json.loads(self.path.read_text())
            job = f", Slurm job {info['slurm_job']}" if info.get("slurm_job") else ""
            return f"pid {info['pid']} on {info['host']} since {info['since']}{job}"
        except (OSError, ValueError, KeyError, TypeError):
            return f"its holder has not written {self.path.name} yet"

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the lock
            self._fd = None
