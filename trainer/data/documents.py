"""Reading the documents of a raw source, unit by unit (text, jsonl, parquet, saved and streamed datasets), and
numbering them as users count them.

Documents: text files hold paragraphs separated by blank lines (one or more empty lines; a line of spaces is text);
jsonl files one JSON object per line with the text under `text_field`; parquet files and datasets a `text_field`
column. Documents are stripped; empty ones are skipped. Each document has an id within its file that also seeks to it:
its byte offset (text, jsonl) or its row (parquet, datasets).
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
import re
import sys
from collections.abc import Iterator

import datasets
import pyarrow.parquet as pq

from trainer.data.hf_datasets import saved_dataset, streamed_dataset
from trainer.data.sources import Source
from trainer.data.units import Unit, plan_units
from trainer.errors import UserError

BAD_LINES = ("skip", "error")
_READ_CHUNK = 1 << 20  # bytes read at a time
_ROW_BATCH = 1000  # rows pulled at a time from parquet/datasets
_PARAGRAPH_BREAK = re.compile(rb"\n(?:\r?\n)+")  # one or more empty lines

# jsonl files whose skipped lines this process has reported: one summary line per file and process (see
# _report_skipped), not one per unit read or per pass.
_REPORTED: set[str] = set()


def check_read_args(fmt: str, text_field: str, bad_lines: str, label: str = "") -> None:
    """Validate reader options early, in the main process, so errors name the config key (and `label`: the source's
    key and paths, Source.label())."""
    if fmt == "tokens":
        raise UserError(
            f"{label or 'a prepared token directory'} holds prepared token shards, no raw documents; use the text, "
            "jsonl or parquet files it was prepared from here"
        )
    if not isinstance(text_field, str) or not text_field:
        raise UserError("data.text_field must be a non-empty column/key name such as 'text'")
    if bad_lines not in BAD_LINES:
        raise UserError(f"bad_lines={bad_lines!r} is not valid; use 'skip' or 'error'")


def read_unit(
    source: Source, unit: Unit, bad_lines: str = "skip", warn: bool = True, resume_at: int | None = None
) -> Iterator[tuple[int, str]]:
    """(document id, text) of the documents that start in `unit`, in order; from document `resume_at` on if given
    (an id this reader yielded before, so it seeks straight to it)."""
    try:
        if source.fmt == "text":
            yield from _text_documents(unit, resume_at)
        elif source.fmt == "jsonl":
            yield from _jsonl_documents(unit, source.text_field, bad_lines, warn, resume_at)
        elif source.fmt == "parquet":
            parquet = pq.ParquetFile(unit.file)
            group_first = sum(parquet.metadata.row_group(g).num_rows for g in range(unit.group))
            table = parquet.read_row_group(unit.group, columns=[source.text_field])
            first = unit.start if resume_at is None else resume_at  # rows of the file
            column = table.column(0).slice(first - group_first, unit.stop - first)
            yield from _rows(column.to_pylist(), first)
        elif source.fmt == "saved":
            column = saved_dataset(unit.file).select_columns([source.text_field])
            first = unit.start if resume_at is None else resume_at
            for a in range(first, unit.stop, _ROW_BATCH):
                yield from _rows(column[a : min(a + _ROW_BATCH, unit.stop)][source.text_field], a)
        elif source.fmt == "dataset":
            shard = streamed_dataset(source).shard(num_shards=unit.stop, index=unit.start, contiguous=True)
            first = 0 if resume_at is None else resume_at
            row = 0
            for batch in shard.select_columns([source.text_field]).iter(batch_size=_ROW_BATCH):
                texts = batch[source.text_field]
                if row + len(texts) > first:
                    yield from _rows(texts[max(0, first - row) :], max(row, first))
                row += len(texts)
        else:
            raise UserError(f"{source.label()} ({source.fmt}) has no raw documents")
    except UserError:
        raise
    except (OSError, ValueError, KeyError, datasets.exceptions.DatasetGenerationError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot read {unit.file!r} as {source.fmt}: {first_line}; fix or remove the file") from exc


def iter_documents(source: Source, bad_lines: str = "skip", warn: bool = True) -> Iterator[tuple[str, int, str]]:
    """(file, document id, text) of one pass over a raw source, in corpus order."""
    check_read_args(source.fmt, source.text_field, bad_lines, source.label())
    for unit in plan_units(source, 1):
        for doc, text in read_unit(source, unit, bad_lines, warn):
            yield unit.file, doc, text


class DocumentNumbers:
    """Text/jsonl documents as users count them, from their ids (byte offsets): the document's number among its
    file's documents (from 0, as the reader yields them) and the line it starts on (from 1, as editors number lines).
    For `trainer data`; each file is read once, up to the furthest document asked about."""

    def __init__(self, source: Source) -> None:
        self.source = source
        self._files: dict[str, _FileNumbers] = {}

    def __call__(self, file: str, doc_id: int) -> tuple[int, int]:
        """(document number, line) of the document at byte `doc_id` of `file`."""
        if file not in self._files:
            self._files[file] = _FileNumbers(self.source, file)
        return self._files[file].number(doc_id)

    def close(self) -> None:
        for numbers in self._files.values():
            numbers.close()
        self._files.clear()


class _FileNumbers:
    """The starts of one file's documents and their lines, read as far as asked."""

    def __init__(self, source: Source, path: str) -> None:
        if source.fmt not in ("text", "jsonl"):
            raise ValueError(f"{source.fmt} documents are numbered by row already")
        self.path = path
        self._docs = read_unit(source, Unit(path, 0, os.path.getsize(path)), warn=False)
        self._file = open(path, "rb")  # noqa: SIM115 - held while numbering; close() closes it
        self.starts: list[int] = []
        self.lines: list[int] = []
        self._line = 1  # the line of byte `self._file.tell()`

    def number(self, doc_id: int) -> tuple[int, int]:
        while not self.starts or self.starts[-1] < doc_id:
            start, _ = next(self._docs, (None, None))
            if start is None:
                break
            while (gap := start - self._file.tell()) > 0:
                self._line += self._file.read(min(gap, _READ_CHUNK)).count(b"\n")
            self.starts.append(start)
            self.lines.append(self._line)
        j = bisect.bisect_left(self.starts, doc_id)
        if j == len(self.starts) or self.starts[j] != doc_id:
            raise UserError(f"{self.path} has no document at byte {doc_id}; did the file change during the run?")
        return j, self.lines[j]

    def close(self) -> None:
        self._file.close()


def _rows(texts: list, first: int) -> Iterator[tuple[int, str]]:
    for i, text in enumerate(texts):
        if isinstance(text, str) and (text := text.strip()):
            yield first + i, text


def _decode(data: bytes, path: str, pos: int) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text near byte {pos + exc.start}; convert the file to UTF-8") from None


def _text_documents(unit: Unit, resume_at: int | None) -> Iterator[tuple[int, str]]:
    """Paragraphs whose first byte lies in [unit.start, unit.stop). A paragraph starts at byte 0 or right after a
    run of empty lines; three bytes of look-behind suffice to see such a run end at the unit's start."""
    with open(unit.file, "rb") as f:
        if resume_at is not None:
            base, doc_start = resume_at, resume_at
        else:
            base = max(0, unit.start - 3)
            doc_start = 0 if unit.start == 0 else None  # absolute start of the paragraph being read, if ours
        f.seek(base)
        buf, scan, eof = b"", 0, False  # buf holds the file from `base`
        while True:
            m = _PARAGRAPH_BREAK.search(buf, scan)
            if m is None or (m.end() == len(buf) and not eof):
                if eof:
                    if doc_start is not None and (
                        text := _decode(buf[doc_start - base :], unit.file, doc_start).strip()
                    ):
                        yield doc_start, text
                    return
                keep = min(doc_start - base if doc_start is not None else len(buf), max(scan, len(buf) - 3))
                buf, base, scan = buf[keep:], base + keep, max(0, scan - keep)
                chunk = f.read(_READ_CHUNK)
                eof = not chunk
                buf += chunk
                continue
            if doc_start is not None:
                text = _decode(buf[doc_start - base : m.start()], unit.file, doc_start).strip()
                if text:
                    yield doc_start, text
            scan = m.end()
            start = base + m.end()
            if start >= unit.stop:
                return
            doc_start = start if start >= unit.start else None


def _jsonl_documents(
    unit: Unit, text_field: str, bad_lines: str, warn: bool, resume_at: int | None
) -> Iterator[tuple[int, str]]:
    """The `text_field` of each JSON line starting in [unit.start, unit.stop). Lines that are not JSON, or JSON
    without a string `text_field`, are errors (bad_lines=error) or skipped and summarised once per file (warn)."""
    with open(unit.file, "rb") as f:
        if resume_at is not None:
            f.seek(resume_at)
        elif unit.start > 0:
            f.seek(unit.start - 1)
            f.readline()  # the rest of the line holding byte start - 1: it began in an earlier unit
        while (pos := f.tell()) < unit.stop:
            line = f.readline()
            if not line:
                break
            if not line.strip():
                continue  # blank lines (e.g. a trailing newline) are not records
            try:
                text = _line_text(line, text_field)
            except ValueError as exc:
                if bad_lines == "error":
                    raise UserError(
                        f"{unit.file}:{_line_number(unit.file, pos)}: invalid JSON line ({_first_line(exc)}); "
                        "fix the line or set data.bad_lines=skip"
                    ) from None
                text = None
            else:
                if text is None and bad_lines == "error":
                    raise UserError(
                        f"{unit.file}:{_line_number(unit.file, pos)}: line has no string {text_field!r} field "
                        f"(data.text_field={text_field}); fix the line or set data.bad_lines=skip"
                    )
            if text is None:
                if warn and unit.file not in _REPORTED:
                    _REPORTED.add(unit.file)
                    _report_skipped(unit.file, text_field)
                continue
            if text := text.strip():
                yield pos, text


def _line_text(line: bytes, text_field: str) -> str | None:
    """The text of one jsonl line; None when it is JSON but has no string `text_field`; ValueError if not JSON."""
    record = json.loads(line)
    text = record.get(text_field) if isinstance(record, dict) else None
    return text if isinstance(text, str) else None


def _report_skipped(path: str, text_field: str) -> None:
    """One stderr line for the lines of `path` that are skipped: how many lack a string `text_field` and how many are
    not JSON. A process reads only some units of a file, in any order, and never knows it has read its last one; so
    when it meets the file's first bad line it counts them over the whole file (one extra read of that file, once per
    process), and the summary is exact and printed once."""
    missing = invalid = 0
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                try:
                    missing += _line_text(line, text_field) is None
                except ValueError:
                    invalid += 1
    parts, settings = [], []
    if missing:
        parts.append(f"{_lines(missing)} without a string {text_field!r} field")
        settings.append(f"data.text_field={text_field}")
    if invalid:
        parts.append(f"{_lines(invalid)} of invalid JSON")
    settings.append("data.bad_lines=skip")
    print(f"warning: {path}: skipped {' and '.join(parts)} ({', '.join(settings)})", file=sys.stderr, flush=True)


def _lines(n: int) -> str:
    return f"{n} line" if n == 1 else f"{n} lines"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _line_number(path: str, pos: int) -> int:
    """1-based number of the line starting at byte `pos` (counted only for an error message)."""
    with open(path, "rb") as f:
        return f.read(pos).count(b"\n") + 1


def held_out(text: str, fraction: float) -> bool:
    """Whether a document belongs to the validation share (`data.valid_fraction`): decided by a hash of its text,
    so the split is the same however the corpus is cut into units or streams, and copies of a document fall on the
    same side."""
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") < fraction * 2**64
