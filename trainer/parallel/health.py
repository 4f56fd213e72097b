"""Which rank stopped: a thread on every rank records in the process group's store, every few seconds, that the rank
is alive and which step it has finished. When a collective fails on a rank (a peer died, or hung past
`parallel.timeout_s`), that rank reads the others' records and names the ones that went silent (dead or stopped) or
fell behind, with host, process id and last step, instead of printing the backend's socket error. Ranks waiting in a
collective keep beating (the wait releases the GIL), so the silent ones are the culprits.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from datetime import timedelta

import torch.distributed as dist

from trainer.errors import PeerFailure
from trainer.parallel.dims import ParallelDims

KEY = "trainer/heartbeat/{rank}"
INTERVAL_S = 2.0  # between records; a rank silent for SILENT_S is named
SILENT_S = 10.0


def is_collective_failure(exc: BaseException) -> bool:
    """A failed collective or store operation: a peer is gone or did not answer in time."""
    if isinstance(exc, dist.DistError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(s in text for s in ("gloo", "Gloo", "NCCL", "Connection reset"))


class Heartbeat:
    def __init__(self, dims: ParallelDims, timeout_s: float) -> None:
        self.dims, self.timeout_s = dims, timeout_s
        self.host, self.pid = socket.gethostname(), os.getpid()
        self.store = None
        if dist.is_initialized() and dims.world_size > 1:
            self.store = dist.distributed_c10d._get_default_store()
        self.step = -1  # the last step this rank finished (-1: still setting up)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # the loop and the thread share one store client
        self._last_write = 0.0

    def start(self) -> Heartbeat:
        if self.store is not None:
            self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=INTERVAL_S + 5)

    def beat(self, step: int) -> None:
        """This rank has finished `step` (published at most once a second: a store write is a network round trip)."""
        self.step = step
        if self.store is not None and time.monotonic() - self._last_write >= 1.0:
            self._publish()

    def _publish(self) -> bool:
        record = {"step": self.step, "time": time.time(), "host": self.host, "pid": self.pid}
        try:
            with self._lock:
                self.store.set(KEY.format(rank=self.dims.rank), json.dumps(record))
                self._last_write = time.monotonic()
        except Exception:  # noqa: BLE001 - the store is gone (its host died): the failure report says so
            return False
        return True

    def _run(self) -> None:
        while not self._stop.is_set() and self._publish():
            self._stop.wait(INTERVAL_S)

    def failure(self, exc: BaseException) -> PeerFailure:
        """The one-line failure this rank reports when a collective failed with `exc`."""
        me = f"rank {self.dims.rank}{self._stage(self.dims.rank)} ({self.host})"
        detail = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        records = self._records()
        if records is None:
            return PeerFailure(
                f"{me} lost contact with the job at step {self.step + 1} ({detail}); the rendezvous store is gone "
                f"too, so rank 0 is likely the one that failed: see its log"
            )
        now = time.time()
        others = [r for r in records if r != self.dims.rank]
        silent = [r for r in others if now - records[r]["time"] > SILENT_S]
        if not silent:  # a peer that died just now: its record stops changing
            time.sleep(2 * INTERVAL_S + 1)
            later = self._records() or {}
            silent = [r for r in others if later.get(r, records[r])["time"] == records[r]["time"]]
            now = time.time()
        behind = [r for r in others if r not in silent and records[r]["step"] < self.step]
        names = [f"rank {r}{self._stage(r)} (never reported)" for r in range(self.dims.world_size) if r not in records]
        names += [
            f"rank {r}{self._stage(r)} on {records[r]['host']} (pid {records[r]['pid']}, last reported step "
            f"{records[r]['step']}, silent for {now - records[r]['time']:.0f} s)"
            for r in silent
        ]
        names += [
            f"rank {r}{self._stage(r)} on {records[r]['host']} (pid {records[r]['pid']}, behind at step "
            f"{records[r]['step']})"
            for r in behind
        ]
        if not names:
            return PeerFailure(f"{me} failed in a collective at step {self.step + 1}: {detail}")
        return PeerFailure(
            f"{'; '.join(names)} stopped responding; {me} stopped at step {self.step + 1} (collective timeout "
            f"parallel.timeout_s={self.timeout_s:g}): see that rank's log [{detail}]"
        )

    def _stage(self, rank: int) -> str:
        """`rank`'s pipeline stage (its pp coordinate), in words; nothing without a pipeline."""
        return f" [pipeline stage {self.dims.pp_of(rank)}]" if self.dims.pp > 1 else ""

    def _records(self) -> dict[int, dict] | None:
        if self.store is None:
            return {}
        try:
            with self._lock:
                return self._read()
        except Exception:  # noqa: BLE001 - the store died with its host: say so instead
            return None

    def _read(self) -> dict[int, dict]:
        self.store.set_timeout(timedelta(seconds=5))
        keys = {r: KEY.format(rank=r) for r in range(self.dims.world_size)}
        present = {r: k for r, k in keys.items() if self.store.check([k])}
        return {r: json.loads(self.store.get(k)) for r, k in present.items()}
