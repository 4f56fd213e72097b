"""The data stream the training loop iterates: micro-batches of this rank's share of the global sample sequence.

Rank r of dp takes global samples start_sample + r, start_sample + r + dp, ...; micro-batches are consecutive groups of
micro_batch of them (see packing.py for what sample i is). Two sources supply content windows:

- streaming raw files (text/jsonl/parquet): DataLoader workers tokenize documents, the main process packs. Every
  rank reads and packs the whole stream and keeps its own samples; fine for one or a few files, at scale use
  prepared shards (`trainer prepare`), which any rank reads at random.
- prepared token shards (format "tokens"): sample i is read directly from np.memmap.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import traceback
from collections.abc import Iterator
from dataclasses import dataclass

import fsspec
import numpy as np
import torch
from tokenizers import Tokenizer
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from trainer.data.packing import DocumentPacker, SampleSpec
from trainer.data.shards import TokenShards
from trainer.data.sources import check_read_args, detect_format, iter_documents, resolve_files
from trainer.errors import UserError
from trainer.tokenizer import load_tokenizer

PREFETCH_DOCS = 16  # documents each worker keeps ready


class DocumentFeed(IterableDataset):
    """Tokenized documents, epoch after epoch, from (start_epoch, start_doc) on, as (epoch, doc, tokens + separator).

    Order trick: worker w of W tokenizes only documents k = w (mod W) (k counted from the feed's start) and yields one
    per item; the DataLoader takes items from workers round-robin, so the main process receives documents in the
    original order. Every worker reads the whole document sequence itself (reading is cheap; tokenizing is not).
    """

    def __init__(
        self,
        files: list[str],
        fmt: str,
        text_field: str,
        bad_lines: str,
        tokenizer_path: str,
        separator: int,
        start_epoch: int = 0,
        start_doc: int = 0,
    ) -> None:
        self.files, self.fmt, self.text_field, self.bad_lines = files, fmt, text_field, bad_lines
        self.tokenizer_path, self.separator = tokenizer_path, separator
        self.start_epoch, self.start_doc = start_epoch, start_doc

    def __iter__(self) -> Iterator[tuple[int, int, np.ndarray] | WorkerFailure]:
        info = get_worker_info()
        if info is None:
            yield from self._documents(0, 1)
            return
        fsspec.asyn.reset_lock()  # a lock inherited through fork can hang fsspec in the worker
        try:
            yield from self._documents(info.id, info.num_workers)
        except UserError as exc:
            yield WorkerFailure(str(exc))
        except Exception as exc:  # noqa: BLE001 - any failure must reach the main process as one line
            traceback.print_exc()  # keep the full traceback of an unexpected error on stderr
            yield WorkerFailure(f"data worker failed with {type(exc).__name__}: {_first_line(exc)}")
        # Ending normally, rather than raising, lets the DataLoader shut its workers down at once (after a raise
        # it waits out a 5 s join timeout).

    def _documents(self, worker: int, n_workers: int) -> Iterator[tuple[int, int, np.ndarray]]:
        tokenizer = Tokenizer.from_file(self.tokenizer_path)
        k = 0
        epoch, skip = self.start_epoch, self.start_doc
        while True:
            n_docs = 0
            docs = iter_documents(self.files, self.fmt, self.text_field, self.bad_lines, warn=worker == 0)
            for doc, text in enumerate(docs):
                if doc < skip:
                    continue  # resume: skip by index, without tokenizing
                if k % n_workers == worker:
                    ids = tokenizer.encode(text, add_special_tokens=False).ids
                    yield epoch, doc, np.asarray(ids + [self.separator], dtype=np.int64)
                k += 1
                n_docs += 1
            if n_docs == 0 and skip:
                raise UserError(
                    f"the saved data position (epoch {epoch}, document {skip}) is past the end of the corpus; "
                    "restore the original data files or resume without the data position"
                )
            if n_docs == 0:
                raise UserError(f"no documents found in {', '.join(self.files)}; check the files and data.text_field")
            epoch, skip = epoch + 1, 0


@dataclass
class WorkerFailure:
    """An error in a DataLoader worker, sent to the main process as an item (its one-line message)."""

    message: str


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _init_worker(worker_id: int) -> None:
    """Workers leave SIGTERM/SIGUSR1 to the training process: torchrun and Slurm signal the whole process group, and
    the trainer must outlive that signal by one step to checkpoint (its DataLoader then stops the workers itself).
    Ignoring them, a worker must still die with its rank: on Linux the kernel kills it when the rank exits (a rank
    killed with SIGKILL would otherwise leave it running, holding copies of the rank's sockets, and an elastic
    restart of the job would wait on them)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    die_with_parent()


def die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent exits (prctl PR_SET_PDEATHSIG); elsewhere, nothing."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(1, signal.SIGKILL, 0, 0, 0) == 0 and os.getppid() == 1:  # 1 = PR_SET_PDEATHSIG
        os._exit(1)  # the parent died before the request took effect


def _keep(item: tuple[int, int, np.ndarray]) -> tuple[int, int, np.ndarray]:
    """Collate function for batch_size=None: pass each (epoch, doc, tokens) item through unchanged."""
    return item


def _raise_failures(items: Iterator) -> Iterator[tuple[int, int, np.ndarray]]:
    """Pass documents through; raise a worker's failure (or a DataLoader error) as a one-line UserError."""
    while True:
        try:
            item = next(items)
        except StopIteration:
            return
        except Exception as exc:  # e.g. a worker killed by the OOM killer: the DataLoader raises RuntimeError
            raise UserError(f"data loader failed: {_first_line(exc)}; check memory or use fewer data workers") from exc
        if isinstance(item, WorkerFailure):
            items = None  # drop the loader from this frame, which the raised error's traceback keeps
            raise UserError(item.message)
        yield item


class StreamSource:
    """Content windows from raw files: documents tokenized in DataLoader workers, packed in this process."""

    def __init__(self, feed: DocumentFeed, first_doc_start: int, num_workers: int) -> None:
        self._feed, self._first_doc_start, self._num_workers = feed, first_doc_start, num_workers
        self._packer: DocumentPacker | None = None  # started on first use: no worker processes until then
        self._loader_iter: Iterator | None = None
        self._closed = False

    def _start(self) -> DocumentPacker:
        if self._closed:
            raise UserError("this data stream was closed (or failed before); build a new stream with build_stream")
        if self._packer is None:
            if self._num_workers == 0:
                items = iter(self._feed)
            else:
                loader = DataLoader(
                    self._feed,
                    batch_size=None,
                    num_workers=self._num_workers,
                    collate_fn=_keep,
                    prefetch_factor=PREFETCH_DOCS,
                    # Its own generator: starting workers must not draw from the global RNG (dropout), or a resumed
                    # run, whose workers start at another step, would continue on a different random stream.
                    generator=torch.Generator().manual_seed(0),
                    worker_init_fn=_init_worker,
                )
                self._loader_iter = iter(loader)
                items = _raise_failures(self._loader_iter)
            self._packer = DocumentPacker(items, self._first_doc_start, self._feed.separator)
        return self._packer

    def window(self, start: int, length: int) -> np.ndarray:
        try:
            return self._start().window(start, length)
        except UserError:
            self.close()  # stop the workers now, not when the error object is collected
            raise

    def locate(self, pos: int) -> dict:
        try:
            return self._start().locate(pos)
        except UserError:
            self.close()
            raise

    def close(self) -> None:
        """Stop the worker processes for good (they would also stop when this object is garbage collected)."""
        self._closed = True
        self._packer = None
        self._loader_iter = None


class SampleStream:
    """Iterator of this rank's micro-batches: dicts of LongTensors input_ids (mb, T), labels (mb, T) with -100 =
    ignored, and sample_index (mb,) holding the global sample indices."""

    def __init__(
        self,
        source: StreamSource | TokenShards,
        spec: SampleSpec,
        dp_rank: int,
        dp_size: int,
        micro_batch: int,
        start_sample: int,
    ) -> None:
        self.source, self.spec = source, spec
        self.dp_rank, self.dp_size, self.micro_batch, self.start_sample = dp_rank, dp_size, micro_batch, start_sample
        self.consumed = 0  # local samples yielded so far

    def __iter__(self) -> SampleStream:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        indices = [
            self.start_sample + self.dp_rank + (self.consumed + j) * self.dp_size for j in range(self.micro_batch)
        ]
        rows = [self.spec.make(self.source.window(i * self.spec.stride, self.spec.span), i) for i in indices]
        self.consumed += self.micro_batch
        return {
            "input_ids": torch.stack([r[0] for r in rows]),
            "labels": torch.stack([r[1] for r in rows]),
            "sample_index": torch.tensor(indices, dtype=torch.long),
        }

    def state_dict(self) -> dict:
        """Data position after the batches consumed so far, valid for every rank at a step boundary (JSON-safe).

        next_sample is the global index to resume at; epoch/doc/offset (streaming only) locate where that sample's
        content begins, so resume skips documents by index instead of re-tokenizing the prefix.
        """
        next_sample = self.start_sample + self.consumed * self.dp_size
        state = {"next_sample": next_sample, "arch": self.spec.arch, "seq_len": self.spec.seq_len}
        state.update(self.source.locate(next_sample * self.spec.stride))
        return state

    def close(self) -> None:
        """Release worker processes, if any."""
        if isinstance(self.source, StreamSource):
            self.source.close()


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UserError(f"{name}={value!r} is invalid; use an integer >= {minimum}")
    return value


def build_stream(
    files: list[str] | str,
    *,
    fmt: str,
    text_field: str,
    tokenizer_path: str | os.PathLike,
    arch: str,
    seq_len: int,
    seed: int,
    dp_rank: int,
    dp_size: int,
    micro_batch: int,
    start_sample: int = 0,
    num_workers: int = 1,
    bad_lines: str = "skip",
    seek: dict | None = None,
) -> SampleStream:
    """The micro-batch stream of data-parallel rank `dp_rank`, starting at global sample `start_sample`.

    `seek` is a state_dict() of an earlier stream (its next_sample must equal start_sample); it lets the streaming
    path jump to the right document instead of re-reading and re-tokenizing everything before it.
    Streaming raw files, `num_workers` DataLoader workers tokenize (0 = in this process) and every rank reads the
    whole corpus, keeping its own samples: fine for one or a few files; at scale use prepared shards (fmt "tokens"),
    which are read at random and need no workers (num_workers is ignored there).
    """
    _check_int("dp_size", dp_size, 1)
    _check_int("dp_rank", dp_rank, 0)
    if dp_rank >= dp_size:
        raise UserError(f"dp_rank={dp_rank} is not below dp_size={dp_size}; check the launch world size")
    _check_int("micro_batch", micro_batch, 1)
    _check_int("start_sample", start_sample, 0)
    _check_int("num_workers", num_workers, 0)
    info = load_tokenizer(tokenizer_path)
    spec = SampleSpec.create(info, arch, seq_len, seed)
    paths = resolve_files(files)
    fmt = detect_format(paths, fmt)
    position = _check_seek(seek, start_sample, spec)

    if fmt == "tokens":
        if len(paths) != 1:
            raise UserError(f"format tokens takes one prepared directory, got {len(paths)} paths; pass just one")
        source: StreamSource | TokenShards = TokenShards(paths[0], info, arch)
    else:
        check_read_args(fmt, text_field, bad_lines)
        epoch, doc, offset = (position["epoch"], position["doc"], position["offset"]) if position else (0, 0, 0)
        feed = DocumentFeed(paths, fmt, text_field, bad_lines, str(info.path), spec.separator_id, epoch, doc)
        first_doc_start = start_sample * spec.stride - offset if position else 0
        source = StreamSource(feed, first_doc_start, num_workers)
    return SampleStream(source, spec, dp_rank, dp_size, micro_batch, start_sample)


def _check_seek(seek: dict | None, start_sample: int, spec: SampleSpec) -> dict | None:
    """Validate a saved data position; return its (epoch, doc, offset) part, or None when there is none to use."""
    if seek is None:
        return None
    if not isinstance(seek, dict) or "next_sample" not in seek:
        raise UserError("the saved data position is not a stream state_dict; resume from an intact checkpoint")
    if seek["next_sample"] != start_sample:
        raise UserError(
            f"saved data position is sample {seek['next_sample']} but start_sample={start_sample}; pass them equal"
        )
    if seek.get("arch", spec.arch) != spec.arch or seek.get("seq_len", spec.seq_len) != spec.seq_len:
        raise UserError(
            f"the checkpoint's data position is for {seek.get('arch')} seq_len {seek.get('seq_len')}, not "
            f"{spec.arch} seq_len {spec.seq_len}; keep model.arch and data.seq_len when resuming"
        )
    keys = ("epoch", "doc", "offset")
    if not all(isinstance(seek.get(k), int) and seek[k] >= 0 for k in keys):
        return None  # e.g. a position saved from prepared shards: fall back to reading from the start
    return {k: seek[k] for k in keys}
