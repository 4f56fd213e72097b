"""The worker transport of logical streams: DataLoader workers build this rank's blocks and send them in the order
the training process needs them (see logical_streams.py for what a block is).

All streams are at the same place in their blocks, so their blocks fall due together: at batch 1, the 64 blocks of a
round within 64 samples. A worker paces its read-ahead: it builds a stream's next block once the training process
has gone a share of the way through that stream's current block (the training process publishes its position), the
shares staggered over the worker's streams within the first half. Its tokenizing is then spread over the round, at
least half a block's span ahead of need, instead of a burst of a whole round's blocks whenever a round begins.
"""

from __future__ import annotations

import atexit
import ctypes
import gc
import multiprocessing
import os
import signal
import sys
import traceback
import weakref
from collections.abc import Iterator
from dataclasses import dataclass

import fsspec
import torch
from tokenizers import Tokenizer
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from trainer.data.logical_streams import Block, StreamPlan, StreamReader
from trainer.errors import UserError

PREFETCH = 2  # rounds of blocks each DataLoader worker keeps ready beyond the current one
PACE_POLL_S = 0.05  # how often a worker waiting to build a block looks at the training process's position


@dataclass
class Filler:
    """A round-robin turn in which a worker has no block to send."""


@dataclass
class WorkerFailure:
    """An error in a DataLoader worker, sent to the main process as an item (its one-line message)."""

    message: str


class Pace:
    """The training process's sample position, shared with its DataLoader workers, and a wake-up call per worker."""

    def __init__(self, workers: int) -> None:
        self._state = multiprocessing.RawArray("q", 2)  # [position, closed]
        self._wake = [multiprocessing.Event() for _ in range(workers)]

    def at(self, position: int) -> None:
        """(training process) It is at global sample `position`."""
        self._state[0] = position

    def wake(self) -> None:
        """(training process) It waits for a block: workers look at the position now, not at their next poll."""
        for event in self._wake:
            event.set()

    def close(self) -> None:
        self._state[1] = 1
        self.wake()

    def position(self) -> int:
        return self._state[0]

    def wait_until(self, worker: int, position: int) -> bool:
        """(worker) Wait until the training process reaches `position`; False if the feed was closed meanwhile."""
        event = self._wake[worker]
        while True:
            event.clear()  # before the check: a wake-up after it is not lost
            if self._state[1]:
                return False
            if self._state[0] >= position:
                return True
            event.wait(PACE_POLL_S)


class BlockFeed(IterableDataset):
    """The blocks this rank needs, in the order it needs them; in DataLoader workers each worker builds the blocks of
    its own streams and takes its turns in the round-robin order the DataLoader serves them in, pacing its builds by
    the training process's position (see the module's docstring)."""

    def __init__(self, plans: dict[int, StreamPlan], needs, readers_args: dict, cursors: dict, keys: list) -> None:
        self.plans, self.needs, self.readers_args = plans, needs, readers_args
        self.cursors = cursors  # {(source, stream): cursor of the block the stream starts at}
        self.keys = keys  # the rank's streams, sorted
        self.pace: Pace | None = None  # set when DataLoader workers build the blocks

    def __iter__(self) -> Iterator[Block | Filler | WorkerFailure]:
        info = get_worker_info()
        if info is None:
            yield from self._blocks(0, 1)
            return
        fsspec.asyn.reset_lock()  # a lock inherited through fork can hang fsspec in the worker
        try:
            yield from self._blocks(info.id, info.num_workers)
        except UserError as exc:
            yield WorkerFailure(str(exc))
        except Exception as exc:  # noqa: BLE001 - any failure must reach the main process as one line
            traceback.print_exc()
            yield WorkerFailure(f"data worker failed with {type(exc).__name__}: {first_line(exc)}")

    def _blocks(self, worker: int, workers: int) -> Iterator[Block | Filler]:
        owner = {key: i % workers for i, key in enumerate(self.keys)}
        own = self.keys[worker::workers]
        share = {key: (j + 1) / (2 * (len(own) + 1)) for j, key in enumerate(own)}  # of a block's span, see above
        tokenizer = Tokenizer.from_file(self.readers_args["tokenizer_path"])
        args = {k: v for k, v in self.readers_args.items() if k != "tokenizer_path"}
        readers: dict[tuple[int, int], StreamReader] = {}
        last_due: dict[tuple[int, int], int] = {}  # where each of this worker's streams needed its previous block
        niced = False
        slot, next_turn = -1, 0  # last assigned slot (turn * workers + worker), this worker's next turn
        for key, index, due in self.needs():
            slot += 1 + (owner[key] - slot - 1) % workers
            mine = slot // workers if owner[key] == worker else None
            last_turn = (slot - 1 - worker) // workers  # this worker's turns before this slot
            while next_turn <= last_turn:
                yield Filler()
                next_turn += 1
            if mine is None:
                continue
            if key not in readers:
                readers[key] = StreamReader(
                    self.plans[key[0]], key[1], self.cursors[key], tokenizer=tokenizer, warn=True, **args
                )
            reader = readers[key]
            if reader.next_block < index:
                reader.skip_to(index)
            if reader.next_block != index:
                raise RuntimeError(f"stream {key} asked for block {index}, at block {reader.next_block}")
            built_at = None
            if self.pace is not None:
                previous, last_due[key] = last_due.get(key), due
                release = -1 if previous is None else previous + int((due - previous) * share[key])
                if previous is not None and not niced:  # the first blocks are read; the rest is read-ahead
                    os.nice(WORKER_NICE)
                    niced = True
                if not self.pace.wait_until(worker, release):  # (-1: a stream's first block, needed at once)
                    return  # the training process closed the feed
                built_at = self.pace.position()
            block = reader.read_block(key)
            block.built_at = built_at
            yield block
            next_turn = mine + 1


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


WORKER_NICE = 19


def _init_worker(worker_id: int) -> None:
    """Workers leave SIGTERM/SIGUSR1/SIGINT to the training process: torchrun and Slurm signal the whole process
    group, and the trainer must outlive SIGTERM/SIGUSR1 by one step to checkpoint; after any of them the DataLoader
    stops its workers itself. (A worker that left on its own SIGINT could hang at exit: its queue, full of
    prefetched blocks nobody reads, keeps it from exiting, and the SIGTERM the DataLoader would end it with is
    ignored.)
    Ignoring them, a worker must still die with its rank: on Linux the kernel kills it when the rank exits (a rank
    killed with SIGKILL would otherwise leave it running, holding copies of the rank's sockets, and an elastic
    restart of the job would wait on them).
    A worker reads the first block of each of its streams at normal priority: the run needs them at once, and
    reading them takes seconds (64 x 128 windows), best spent while the model is built and compiled. From its first
    read-ahead block on it runs at a lower CPU priority (nice +WORKER_NICE) and takes what training leaves idle,
    which is far more than steady-state tokenizing needs."""
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    die_with_parent()


def die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent exits (prctl PR_SET_PDEATHSIG); elsewhere, nothing."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(1, signal.SIGKILL, 0, 0, 0) == 0 and os.getppid() == 1:  # 1 = PR_SET_PDEATHSIG
        os._exit(1)  # the parent died before the request took effect


def _keep(item):
    """Collate function for batch_size=None: pass each item through unchanged."""
    return item


_OPEN: weakref.WeakSet = weakref.WeakSet()  # block sources whose workers may still run


@atexit.register
def _close_open_sources() -> None:
    """Stop the workers of streams nobody closed before the interpreter exits. multiprocessing's own exit handler
    (which runs after this one) would SIGTERM them, which they ignore, and then wait for them forever."""
    for source in list(_OPEN):
        source.close()


class BlockSource:
    """The training process's end: blocks from the feed (in this process, or from DataLoader workers), in order."""

    def __init__(self, feed: BlockFeed, num_workers: int) -> None:
        self._feed, self._num_workers = feed, num_workers
        self._items: Iterator | None = None
        self._closed = False
        _OPEN.add(self)

    def at(self, position: int) -> None:
        """The training process is at global sample `position` (workers pace their read-ahead by it)."""
        if self._feed.pace is not None:
            self._feed.pace.at(position)

    def next_block(self, key: tuple[int, int], index: int) -> Block:
        """Block `index` of stream `key`, which the position last given to at() is the first to need."""
        if self._closed:
            raise UserError("this data stream was closed (or failed before); build a new stream with build_stream")
        if self._feed.pace is not None:
            self._feed.pace.wake()  # a worker may wait for this position to build it
        try:
            block = self._next()
        except UserError:
            self.close()  # stop the workers now, not when the error object is collected
            raise
        if block.key != key or block.index != index:
            raise RuntimeError(f"data feed sent block {block.key}/{block.index}, expected {key}/{index}")
        return block

    def start(self) -> None:
        """Start the workers now (otherwise at the first block): they tokenize while the caller does other work."""
        if self._items is None and self._num_workers > 0 and not self._closed:
            self._open()

    def _next(self) -> Block:
        if self._items is None:
            self._open()
        while True:
            try:
                item = next(self._items)
            except StopIteration:
                raise RuntimeError("the data feed ended") from None
            except UserError:
                raise
            except Exception as exc:  # e.g. a worker killed by the OOM killer: the DataLoader raises RuntimeError
                raise UserError(
                    f"data loader failed: {first_line(exc)}; check memory or use fewer data workers"
                ) from exc
            if isinstance(item, WorkerFailure):
                raise UserError(item.message)
            if not isinstance(item, Filler):
                return item

    def _open(self) -> None:
        if self._num_workers == 0:
            self._items = iter(self._feed)
        else:
            self._feed.pace = Pace(self._num_workers)  # before the workers fork: they share it
            loader = DataLoader(
                self._feed,
                batch_size=None,
                num_workers=self._num_workers,
                collate_fn=_keep,
                # a worker builds the next block of each of its streams while the current ones are in use:
                # blocks of all streams fall due together, and would otherwise stall the step when they do
                prefetch_factor=PREFETCH + -(-len(self._feed.keys) // self._num_workers),
                # Its own generator: starting workers must not draw from the global RNG (dropout), or a resumed
                # run, whose workers start at another step, would continue on a different random stream.
                generator=torch.Generator().manual_seed(0),
                worker_init_fn=_init_worker,
            )
            # Forked workers must never free objects they inherit: a process group left over from an earlier run in
            # this process (a user's script, a test) would wait forever in its destructor for threads the fork did
            # not copy. Unreachable cycles are collected here, and the rest is frozen for the children's collector.
            gc.collect()
            gc.freeze()
            try:
                self._items = iter(loader)
            finally:
                gc.unfreeze()

    def __del__(self) -> None:
        self.close()  # a worker waiting to build a block would keep the DataLoader's own shutdown waiting

    def close(self) -> None:
        """Stop the worker processes for good (they also stop when this object is garbage collected)."""
        self._closed = True
        if self._feed.pace is not None:
            self._feed.pace.close()  # a worker waiting to build a block returns at once
        items, self._items = self._items, None
        shutdown = getattr(items, "_shutdown_workers", None)  # the DataLoader's own shutdown, at once
        if shutdown is not None:
            shutdown()
        _OPEN.discard(self)
