"""What went wrong in a checkpoint write, in one line every rank agrees on: a full disk (on any rank, through
DCP's report), and which rank failed."""

from __future__ import annotations

import errno

import torch.distributed as dist


def is_disk_full(exc: BaseException) -> bool:
    """A write that failed for lack of space (or quota), on this rank or, through DCP's report, on any."""
    seen: list[BaseException] = [exc]
    while seen:
        e = seen.pop()
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(e) or "Disk quota exceeded" in str(e):
            return True
        failures = getattr(e, "failures", None)  # DCP's CheckpointException: {rank: (exception, traceback)}
        if isinstance(failures, dict):
            seen += [f[0] if isinstance(f, tuple) else f for f in failures.values()]
        seen += [c for c in (e.__cause__, e.__context__) if c is not None]
    return False


def write_failure(exc: BaseException) -> str:
    """What failed in a checkpoint write, in a few words naming the rank(s): DCP reports every rank's failure."""
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict) and failures:
        said = []
        for rank, failure in sorted(failures.items()):
            e = failure[0] if isinstance(failure, tuple) else failure
            said.append(f"rank {rank}: {type(e).__name__}: {_first_line(e)}")
        return "; ".join(said)
    return f"{type(exc).__name__}: {_first_line(exc)}"


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


def agree(error: str | None) -> str | None:
    """Collective: the first error any rank had (every rank gets the same answer), or None."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return error
    errors: list = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    return next((e for e in errors if e), None)
