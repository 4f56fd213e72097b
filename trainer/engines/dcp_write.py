"""Where `save_sharded` sends an engine's DCP state: written before the call returns (`dcp.save`), or, inside
`background(writer)`, handed to a `BackgroundWriter` (checkpoint.async).

The background writer is DCP's `async_save` on a gloo process group of its own (created once, collectively, when the
checkpointer is set up): its planning and result gathering run in a thread while the training group carries the
step's collectives, and on one group the two would deadlock. The state is first copied aside ("staged") into host
memory by DCP's DefaultStager, in a thread of its own; the step that follows may run its forward and backward
meanwhile, but must call `wait_staged()` before its optimizer changes the weights. The staged copy is cached by the
stager and reused by every later save: one full copy of this rank's state in host memory for the run's life.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

_writer: contextvars.ContextVar[BackgroundWriter | None] = contextvars.ContextVar("dcp_background", default=None)


class BackgroundWriter:
    """One DCP write at a time in the background, on its own gloo group. Collective to construct."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.group = dist.new_group(backend="gloo") if dist.is_initialized() else None
        accelerator = device.type != "cpu"  # pinned host memory and a side stream exist only beside a device
        options = StagingOptions(
            use_pinned_memory=accelerator,
            use_shared_memory=False,  # the writer is a thread of this process
            use_async_staging=True,  # the copy runs in a thread: the next step's forward/backward overlaps it
            use_non_blocking_copy=accelerator,
        )
        self.stager = DefaultStager(options)
        self.staged: Future | None = None  # done once the state is copied aside
        self.written: Future | None = None  # done once every rank's files are written and fsynced (or one failed)

    def start(self, state: dict, path: Path) -> None:
        """Stages `state` and writes it into `path` in the background (collective over the writer's group)."""
        self.staged = self.written = None
        if self.device.type != "cpu":  # the staging stream must copy values the step has finished writing
            torch.accelerator.synchronize()
        response = dcp.async_save(
            state,
            checkpoint_id=str(path),
            process_group=self.group,
            async_stager=self.stager,
            no_dist=not dist.is_initialized(),
        )
        self.staged, self.written = response.staging_completion, response.upload_completion

    def wait_staged(self) -> None:
        """Returns once the state handed to `start` is copied aside (the weights may change from then on)."""
        if self.staged is not None:
            self.staged.result()
            self.staged = None

    def close(self) -> None:
        self.stager.close()


@contextlib.contextmanager
def background(writer: BackgroundWriter | None) -> Iterator[None]:
    """Within it, `write` hands the state to `writer` (None: written before `write` returns)."""
    token = _writer.set(writer)
    try:
        yield
    finally:
        _writer.reset(token)


def write(state: dict, path: Path) -> None:
    """Writes a DCP state dict into `path`: at once (every rank's files fsynced when it returns), or in the
    background when called inside `background(writer)`."""
    writer = _writer.get()
    if writer is None:
        dcp.save(state, checkpoint_id=str(path), no_dist=not dist.is_initialized())
    else:
        writer.start(state, path)
