"""Logical streams of a raw source: what lets each rank read and tokenize only its share.

A raw source's units are dealt into L logical streams: the endless unit sequence U = pass 0, pass 1, ... (each pass a
permutation of all units, seeded by the pass; identity with shuffle off) gives stream l the units U[l], U[l + L], ...
Each stream tokenizes and packs its own documents into windows; its windows come in blocks of `block` samples, and
with shuffle on the samples of block b are served in a permutation seeded by (source, stream, block). A block is
always rebuilt from the cursor at its start, so nothing buffered has to be saved: a checkpoint stores, per stream,
where its current block starts (unit, document, token offset).

Global sample g, when it comes from this source, is the next sample of stream g mod L. With dp dividing L, rank r
needs only streams l = r (mod dp); DataLoader workers split those streams again. Each block is needed at a known
point of the rank's sample sequence (schedule.py computes it on every process alike), and every worker sends its
blocks in that order, with small fillers in the round-robin turns it has nothing for: the training process receives
exactly the blocks it needs, in order, and holds one block per stream (workers.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from tokenizers import Tokenizer

from trainer.data.documents import held_out, read_unit
from trainer.data.order import Permutation, block_permutation, derive_key
from trainer.data.packing import DocumentPacker
from trainer.data.sources import Source
from trainer.data.units import Unit
from trainer.errors import UserError

ENCODE_BATCH = 64  # documents tokenized per encode_batch call


@dataclass(frozen=True)
class StreamPlan:
    """Everything a process needs to rebuild any stream of one raw source (picklable for DataLoader workers)."""

    source: Source
    units: tuple[Unit, ...]
    streams: int
    shuffle: bool
    seed: int
    fingerprint: str
    holdout: tuple[float, bool] | None = None  # (valid_fraction, keep the held-out documents?)

    def unit_at(self, stream: int, k: int) -> Unit:
        """The k-th unit of logical stream `stream`."""
        n = len(self.units)
        pass_, index = divmod(stream + k * self.streams, n)
        if self.shuffle:
            index = Permutation(n, derive_key(self.seed, self.fingerprint, "units", pass_))[index]
        return self.units[index]


@dataclass
class Block:
    """`block` windows of one stream, in serving order, with where each begins and where the block starts/ends."""

    key: tuple[int, int]  # (source index, stream)
    index: int
    windows: np.ndarray  # (block, span) int32: half the memory of blocks held ahead
    origins: list[tuple[int, int, int]]  # (unit, doc, offset) of each window's first token
    start: dict  # cursor of the block's first content position
    end: dict  # cursor of the next block's first content position
    built_at: int | None = None  # the training process's sample position when a worker began it (None: built there)


class StreamReader:
    """Builds the blocks of one logical stream, in order, from a cursor."""

    def __init__(
        self,
        plan: StreamPlan,
        stream: int,
        cursor: dict,
        *,
        stride: int,
        span: int,
        block: int,
        tokenizer: Tokenizer,
        separator: int,
        bad_lines: str,
        warn: bool,
    ) -> None:
        self.plan, self.stream, self.next_block = plan, stream, cursor["block"]
        self.stride, self.span, self.block = stride, span, block
        self.tokenizer, self.separator, self.bad_lines, self.warn = tokenizer, separator, bad_lines, warn
        first_doc_start = cursor["block"] * block * stride - cursor["offset"]
        self.packer = DocumentPacker(self._documents(cursor["unit"], cursor["doc"]), first_doc_start)

    def skip_to(self, index: int) -> None:
        """Pass over the blocks before block `index` (tokenizing, not building windows)."""
        self.packer.skip_to(index * self.block * self.stride)
        self.next_block = index

    def _documents(self, k: int, resume_at: int | None) -> Iterator[tuple[int, int, np.ndarray]]:
        plan, empty = self.plan, set()
        while True:
            unit = plan.unit_at(self.stream, k)
            found = False
            batch: list[tuple[int, str]] = []
            for doc, text in read_unit(plan.source, unit, self.bad_lines, self.warn, resume_at):
                if plan.holdout is not None and held_out(text, plan.holdout[0]) != plan.holdout[1]:
                    continue
                batch.append((doc, text))
                if len(batch) == ENCODE_BATCH:
                    yield from self._encode(k, batch)
                    found, batch = True, []
            if batch:
                yield from self._encode(k, batch)
                found = True
            if not found and resume_at is None:
                empty.add(unit)
                if len(empty) == len(plan.units):
                    what = " held-out" if plan.holdout and plan.holdout[1] else ""
                    also = ", data.valid_fraction" if plan.holdout else ""
                    raise UserError(
                        f"{plan.source.label()} has no{what} documents; check the files, data.text_field, "
                        f"data.format{also}"
                    )
            k, resume_at = k + 1, None

    def _encode(self, k: int, batch: list[tuple[int, str]]) -> Iterator[tuple[int, int, np.ndarray]]:
        encoded = self.tokenizer.encode_batch_fast([t for _, t in batch], add_special_tokens=False)
        for (doc, _), enc in zip(batch, encoded):
            ids = np.empty(len(enc.ids) + 1, dtype=np.int64)
            ids[:-1] = enc.ids
            ids[-1] = self.separator
            yield k, doc, ids

    def read_block(self, key: tuple[int, int]) -> Block:
        b, size, stride = self.next_block, self.block, self.stride
        start = self.packer.locate(b * size * stride)
        windows, origins = np.empty((size, self.span), dtype=np.int32), []
        for i in range(size):
            pos = (b * size + i) * stride
            where = self.packer.locate(pos)
            origins.append((where["unit"], where["doc"], where["offset"]))
            windows[i] = self.packer.window(pos, self.span)
        end = self.packer.locate((b + 1) * size * stride)
        if self.plan.shuffle:
            order = block_permutation(size, derive_key(self.plan.seed, self.plan.fingerprint, "block", self.stream, b))
            windows, origins = windows[order], [origins[i] for i in order]
        self.next_block += 1
        return Block(key, b, windows, origins, start, end)
