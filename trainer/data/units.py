"""Units: how a raw source is cut into pieces read on their own, and its fingerprint.

A raw source is cut into *units*: text/jsonl files into byte ranges, parquet files into row ranges of a row group,
saved datasets into row ranges, streamed datasets into their shards. Units are what the logical streams deal out
(sample_stream.py), so a rank opens only the units of its own streams; a unit is read without reading anything before it.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import os
from dataclasses import dataclass

import pyarrow.parquet as pq

from trainer.data.hf_datasets import saved_dataset, streamed_dataset
from trainer.data.sources import Source
from trainer.errors import UserError

MAX_UNIT_BYTES = 32 << 20  # a text/jsonl unit reads at most this many bytes (plus its last document)
MIN_UNIT_BYTES = 1 << 10  # and at least this many: smaller units would mostly hold no document start
MIN_UNIT_ROWS = 4
UNITS_PER_STREAM = 4  # files are cut until every logical stream gets about this many units per pass


@dataclass(frozen=True)
class Unit:
    """A piece of a raw source read on its own: bytes [start, stop) of a file, rows [start, stop) of a parquet file
    (within row group `group`) or of a saved dataset, or shard `start` of `stop` of a streamed dataset."""

    file: str
    start: int
    stop: int
    group: int = 0  # parquet row group


def fingerprint(source: Source) -> str:
    """A short hash of what defines the source's document sequence: its format, text field and inputs (file names
    and sizes, not locations: a moved corpus keeps its fingerprint). Prepared shards carry their own (meta.json,
    read by TokenShards)."""
    h = hashlib.blake2b(digest_size=8)
    h.update(f"{source.fmt}|{source.text_field}|".encode())
    if source.fmt == "dataset":
        h.update(f"{source.dataset}|{source.subset}|{source.split}".encode())
    elif source.fmt == "saved":
        h.update(f"{saved_dataset(source.paths[0]).num_rows}".encode())
    else:
        for path in source.paths:
            h.update(f"{os.path.basename(path)}:{os.path.getsize(path)}|".encode())
    return h.hexdigest()


def plan_units(source: Source, streams: int) -> list[Unit]:
    """The source's units in corpus order, cut so that each of `streams` logical streams gets about
    UNITS_PER_STREAM of them per pass (within MIN/MAX_UNIT_BYTES), so streams stay alike in length."""
    target = max(1, UNITS_PER_STREAM * streams)
    if source.fmt in ("text", "jsonl"):
        sizes = [os.path.getsize(p) for p in source.paths]
        piece = min(MAX_UNIT_BYTES, max(MIN_UNIT_BYTES, math.ceil(sum(sizes) / target)))
        return [u for p, size in zip(source.paths, sizes) for u in _cut(p, 0, size, piece)]
    if source.fmt == "parquet":
        groups = []  # (file, row group, its first row in the file, its rows)
        for path in source.paths:
            meta = _parquet_meta(path, source.text_field)
            first = 0
            for g in range(meta.num_row_groups):
                groups.append((path, g, first, meta.row_group(g).num_rows))
                first += meta.row_group(g).num_rows
        piece = max(MIN_UNIT_ROWS, math.ceil(sum(n for *_, n in groups) / target))
        return [Unit(p, u.start, u.stop, g) for p, g, first, n in groups for u in _cut(p, first, first + n, piece)]
    if source.fmt == "saved":
        n = saved_dataset(source.paths[0]).num_rows
        return _cut(source.paths[0], 0, n, max(MIN_UNIT_ROWS, math.ceil(n / target)))
    if source.fmt == "dataset":
        n = streamed_dataset(source).num_shards
        return [Unit(source.dataset, i, n) for i in range(n)]
    raise UserError(f"{source.label()} ({source.fmt}) has no raw documents to cut into units")


def _cut(path: str, start: int, stop: int, piece: int) -> list[Unit]:
    n = max(1, math.ceil((stop - start) / piece))
    bounds = [start + (stop - start) * i // n for i in range(n + 1)]
    return [Unit(path, a, b) for a, b in itertools.pairwise(bounds)]


def _parquet_meta(path: str, text_field: str):
    meta = pq.read_metadata(path)
    names = meta.schema.to_arrow_schema().names
    if text_field not in names:
        raise UserError(f"{path} has no column {text_field!r} (columns: {', '.join(names)}); set data.text_field")
    return meta
