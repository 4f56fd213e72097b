"""Corpus sources, their units and their documents.

A *source* is one named corpus of a run: files (text, jsonl, parquet), a directory written by `trainer prepare`
(format tokens), a directory written by `datasets.Dataset.save_to_disk`, or a dataset `datasets.load_dataset` finds
by name (streamed). `data.train` is a list of paths (one source) or a mapping of named sources with weights.

A raw source is cut into *units*: text/jsonl files into byte ranges, parquet files into row ranges of a row group,
saved datasets into row ranges, streamed datasets into their shards. Units are what the logical streams deal out
(sample_stream.py), so a rank opens only the units of its own streams; a unit is read without reading anything before it.

Documents: text files hold paragraphs separated by blank lines (one or more empty lines; a line of spaces is text);
jsonl files one JSON object per line with the text under `text_field`; parquet files and datasets a `text_field`
column. Documents are stripped; empty ones are skipped. Each document has an id within its file that also seeks to it:
its byte offset (text, jsonl) or its row (parquet, datasets).
"""

from __future__ import annotations

import bisect
import glob
import hashlib
import itertools
import json
import math
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import pyarrow.parquet as pq

from trainer.errors import UserError

FORMATS = ("auto", "text", "jsonl", "parquet", "tokens", "saved")
BAD_LINES = ("skip", "error")
_EXTENSIONS = {".txt": "text", ".text": "text", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}
MAX_UNIT_BYTES = 32 << 20  # a text/jsonl unit reads at most this many bytes (plus its last document)
MIN_UNIT_BYTES = 1 << 10  # and at least this many: smaller units would mostly hold no document start
MIN_UNIT_ROWS = 4
UNITS_PER_STREAM = 4  # files are cut until every logical stream gets about this many units per pass
_READ_CHUNK = 1 << 20  # bytes read at a time
_ROW_BATCH = 1000  # rows pulled at a time from parquet/datasets
_PARAGRAPH_BREAK = re.compile(rb"\n(?:\r?\n)+")  # one or more empty lines

# load_dataset() of a packaged builder otherwise sends a "download count" HEAD request to the Hub on every call
datasets.config.HF_UPDATE_DOWNLOAD_COUNTS = False

# jsonl files whose skipped lines this process has reported: one summary line per file and process (see
# _report_skipped), not one per unit read or per pass.
_REPORTED: set[str] = set()


@dataclass(frozen=True)
class Source:
    """One named corpus: its inputs, their format, the text column and its weight in the mixture."""

    name: str
    fmt: str  # text | jsonl | parquet | tokens | saved | dataset
    paths: tuple[str, ...] = ()  # resolved files, or one directory (tokens, saved)
    text_field: str = "text"
    weight: float = 1.0
    dataset: str | None = None  # fmt dataset: the name/path given to datasets.load_dataset
    subset: str | None = None  # its configuration name
    split: str = "train"
    options: dict = field(default_factory=dict, compare=False)
    key: str = field(default="", compare=False)  # the config key it came from: data.train, data.valid, data.train.NAME

    @property
    def raw(self) -> bool:
        """True when the source holds text to tokenize (all but prepared token shards)."""
        return self.fmt != "tokens"

    def describe(self) -> str:
        return self.dataset if self.fmt == "dataset" else ", ".join(self.paths)

    def label(self) -> str:
        """How messages name the source: its config key (else its name) and inputs, e.g. "data.valid (valid.txt)"."""
        return f"{self.key or f'source {self.name}'} ({self.describe()})"


@dataclass(frozen=True)
class Unit:
    """A piece of a raw source read on its own: bytes [start, stop) of a file, rows [start, stop) of a parquet file
    (within row group `group`) or of a saved dataset, or shard `start` of `stop` of a streamed dataset."""

    file: str
    start: int
    stop: int
    group: int = 0  # parquet row group


def is_tokens_dir(path: str | os.PathLike) -> bool:
    """True for a directory written by `trainer prepare` (it holds meta.json)."""
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, "meta.json"))


def is_saved_dataset(path: str | os.PathLike) -> bool:
    """True for a directory written by `datasets.Dataset.save_to_disk`."""
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, "state.json"))


def resolve_files(paths: list[str] | str) -> list[str]:
    """Expand globs and directories into the sorted list of corpus files; a prepared tokens dir or a saved dataset
    stays one entry. Sorting makes the document order independent of how the user listed paths."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [str(paths)]
    if not paths:
        raise UserError("no data files given; set data.train (and data.valid) to a list of paths or globs")
    files: set[str] = set()
    for raw in paths:
        path = os.path.expanduser(str(raw))
        if glob.has_magic(path):
            matches = sorted(glob.glob(path, recursive=True))
            if not matches:
                raise UserError(f"glob {raw!r} matches no files; fix the pattern or the data path")
        elif os.path.exists(path):
            matches = [path]
        else:
            raise UserError(f"data path {raw!r} does not exist; fix the path in the data section")
        for match in matches:
            if os.path.isdir(match) and not (is_tokens_dir(match) or is_saved_dataset(match)):
                inside = sorted(str(p) for p in Path(match).rglob("*") if p.is_file() and not p.name.startswith("."))
                if not inside:
                    raise UserError(f"directory {match!r} holds no files; point data paths at the corpus files")
                files.update(inside)
            else:
                files.add(match)
    return sorted(files)


def path_kind(path: str) -> str | None:
    """What one path holds: "tokens", "saved", or the raw format its extension implies (None when it has none)."""
    if is_tokens_dir(path):
        return "tokens"
    if is_saved_dataset(path):
        return "saved"
    return _EXTENSIONS.get(Path(path).suffix.lower())


_WHAT = {
    "tokens": "a directory written by `trainer prepare` (with meta.json)",
    "saved": "a directory written by datasets' save_to_disk (with state.json)",
}
_IS = {
    **_WHAT,
    "text": "a text file",
    "jsonl": "a jsonl file",
    "parquet": "a parquet file",
    None: "a file of no known format",
}


def detect_format(files: list[str], fmt: str = "auto", *, key: str = "", setting: str = "data.format") -> str:
    """Return the one format of `files`: the given one, or (for "auto") the one their extensions imply. Errors name
    the offending path, `key` (the config key the files came from, e.g. data.valid) and `setting` (the key that set
    `fmt`)."""
    where = f"{key}: " if key else ""
    if fmt not in FORMATS:
        raise UserError(f"{where}unknown data format {fmt!r} ({setting}); use one of {', '.join(FORMATS)}")
    kinds = {f: path_kind(f) for f in files}
    if fmt == "auto":
        for f, kind in kinds.items():
            if kind is None:
                raise UserError(f"{where}cannot tell the format of {f!r} from its extension; set {setting} explicitly")
        found = sorted(set(kinds.values()))
        if len(found) != 1:
            examples = ", ".join(f"{k} ({next(f for f, kind in kinds.items() if kind == k)})" for k in found)
            raise UserError(
                f"{where}data files mix formats: {examples}; use one format per source (named sources: "
                "data.train={NAME: {path: [...]}, ...})"
            )
        return found[0]
    if fmt in ("tokens", "saved"):
        wrong = next((f for f, kind in kinds.items() if kind != fmt), None)
        if wrong is not None:
            fix = f"set {setting}=auto to read each path as what it is"
            if fmt == "tokens" and key:
                target = f"{key}.path" if key.count(".") > 1 else key  # a named source's paths are under .path
                fix += f", or run `trainer prepare CONFIG --out OUT` and set {target}=[{_prepared_dir(key)}]"
            raise UserError(f"{where}{setting}={fmt} needs {_WHAT[fmt]}, but {wrong!r} is {_IS[kinds[wrong]]}; {fix}")
        return fmt
    wrong = next((f for f, kind in kinds.items() if kind in ("tokens", "saved")), None)
    if wrong is not None:
        raise UserError(
            f"{where}{setting}={fmt} reads raw files, but {wrong!r} is {_IS[kinds[wrong]]}; set {setting}=auto to "
            "read each path as what it is"
        )
    return fmt


def _prepared_dir(key: str) -> str:
    """Where `trainer prepare CONFIG --out OUT` writes the source of config key `key`: data.valid -> OUT/valid,
    data.train -> OUT/train, data.train.NAME of a mixture -> OUT/train/NAME."""
    if key.startswith("data.valid"):
        return "OUT/valid"
    name = key.removeprefix("data.train").lstrip(".")
    return f"OUT/train/{name}" if name else "OUT/train"


SOURCE_KEYS = ("path", "dataset", "name", "split", "weight", "format", "text_field")


def parse_sources(
    train: list[str] | dict, fmt: str = "auto", text_field: str = "text", key: str = "data.train"
) -> list[Source]:
    """The sources of `data.train` (or `data.valid`: `key`): a list of paths (one source, named after the key:
    "train", "valid") or {name: {path|dataset, weight, format, text_field, ...}}; sorted by name, so the mixture does
    not depend on the order they are listed in."""
    if isinstance(train, (list, tuple, str)):
        return [_make_source(key.rsplit(".", 1)[-1], {"path": train}, fmt, text_field, key)]
    if not isinstance(train, dict) or not train:
        raise UserError(f"{key} must be a list of paths or a mapping of named sources, got {train!r}")
    sources = []
    for name, spec in sorted(train.items(), key=lambda kv: str(kv[0])):
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", str(name)):
            raise UserError(f"source name {name!r} in {key} may hold only letters, digits, '_', '.' and '-'")
        if isinstance(spec, (list, str)):
            spec = {"path": spec}
        if not isinstance(spec, dict):
            raise UserError(f"{key}.{name} must be a mapping such as {{path: [files], weight: 0.5}}, got {spec!r}")
        sources.append(_make_source(str(name), spec, fmt, text_field, f"{key}.{name}"))
    return sources


def _make_source(name: str, spec: dict, fmt: str, text_field: str, key: str) -> Source:
    unknown = sorted(set(spec) - set(SOURCE_KEYS))
    if unknown:
        raise UserError(f"unknown key {key}.{unknown[0]}; a source takes {', '.join(SOURCE_KEYS)}")
    weight = spec.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0 or math.isinf(weight):
        raise UserError(f"{key}.weight={weight!r} is invalid; use a positive number")
    field_ = spec.get("text_field", text_field)
    if not isinstance(field_, str) or not field_:
        raise UserError(f"{key}.text_field must be a non-empty column/key name such as 'text'")
    fmt = spec.get("format", fmt)
    if ("path" in spec) == ("dataset" in spec):
        raise UserError(f"{key} needs exactly one of path (files, globs, directories) or dataset (a datasets name)")
    if "dataset" in spec:
        if not isinstance(spec["dataset"], str) or not spec["dataset"]:
            raise UserError(f"{key}.dataset must be a datasets name or local dataset folder")
        return Source(
            name,
            "dataset",
            (),
            field_,
            float(weight),
            spec["dataset"],
            spec.get("name"),
            str(spec.get("split", "train")),
            key=key,
        )
    paths = resolve_files(spec["path"])
    fmt = detect_format(paths, fmt, key=key, setting=f"{key}.format" if "format" in spec else "data.format")
    if fmt in ("tokens", "saved") and len(paths) != 1:
        raise UserError(
            f"{key}: format {fmt} takes one directory, got {len(paths)} ({', '.join(paths)}); make each its own "
            f"source in a mapping {key}={{NAME: {{path: [DIR]}}, ...}}"
        )
    return Source(name, fmt, tuple(paths), field_, float(weight), key=key)


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


# ---- fingerprints and units -------------------------------------------------------------------------------------


def fingerprint(source: Source) -> str:
    """A short hash of what defines the source's document sequence: its format, text field and inputs (file names
    and sizes, not locations: a moved corpus keeps its fingerprint). Prepared shards carry their own (meta.json,
    read by TokenShards)."""
    h = hashlib.blake2b(digest_size=8)
    h.update(f"{source.fmt}|{source.text_field}|".encode())
    if source.fmt == "dataset":
        h.update(f"{source.dataset}|{source.subset}|{source.split}".encode())
    elif source.fmt == "saved":
        h.update(f"{_saved_dataset(source.paths[0]).num_rows}".encode())
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
        n = _saved_dataset(source.paths[0]).num_rows
        return _cut(source.paths[0], 0, n, max(MIN_UNIT_ROWS, math.ceil(n / target)))
    if source.fmt == "dataset":
        n = _streamed_dataset(source).num_shards
        return [Unit(source.dataset, i, n) for i in range(n)]
    raise UserError(f"{source.label()} ({source.fmt}) has no raw documents to cut into units")


def _cut(path: str, start: int, stop: int, piece: int) -> list[Unit]:
    n = max(1, math.ceil((stop - start) / piece))
    bounds = [start + (stop - start) * i // n for i in range(n + 1)]
    return [Unit(path, a, b) for a, b in itertools.pairwise(bounds)]


# ---- reading documents ------------------------------------------------------------------------------------------


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
            column = _saved_dataset(unit.file).select_columns([source.text_field])
            first = unit.start if resume_at is None else resume_at
            for a in range(first, unit.stop, _ROW_BATCH):
                yield from _rows(column[a : min(a + _ROW_BATCH, unit.stop)][source.text_field], a)
        elif source.fmt == "dataset":
            shard = _streamed_dataset(source).shard(num_shards=unit.stop, index=unit.start, contiguous=True)
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


_CACHE: dict = {}


def _parquet_meta(path: str, text_field: str):
    meta = pq.read_metadata(path)
    names = meta.schema.to_arrow_schema().names
    if text_field not in names:
        raise UserError(f"{path} has no column {text_field!r} (columns: {', '.join(names)}); set data.text_field")
    return meta


def _saved_dataset(path: str) -> datasets.Dataset:
    """A save_to_disk directory, memory-mapped (opened once per process)."""
    if ("saved", path) not in _CACHE:
        try:
            ds = datasets.load_from_disk(path)
        except (OSError, ValueError, FileNotFoundError) as exc:
            raise UserError(f"cannot open {path!r} as a saved dataset ({exc}); write it with save_to_disk") from None
        if isinstance(ds, datasets.DatasetDict):
            raise UserError(f"{path!r} holds splits {', '.join(ds)}; point the source at one split's directory")
        _CACHE["saved", path] = ds
    return _CACHE["saved", path]


def _streamed_dataset(source: Source) -> datasets.IterableDataset:
    """datasets.load_dataset(name, streaming=True) of a dataset source (opened once per process)."""
    key = ("dataset", source.dataset, source.subset, source.split)
    if key not in _CACHE:
        try:
            ds = datasets.load_dataset(source.dataset, source.subset, split=source.split, streaming=True)
        except Exception as exc:  # noqa: BLE001 - datasets raises many kinds; all mean the same to the user
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(f"cannot load dataset {source.dataset!r} (split {source.split}): {first}") from None
        if ds.column_names is not None and source.text_field not in ds.column_names:
            raise UserError(
                f"dataset {source.dataset!r} has no column {source.text_field!r} "
                f"(columns: {', '.join(ds.column_names)}); set text_field"
            )
        _CACHE[key] = ds
    return _CACHE[key]


def held_out(text: str, fraction: float) -> bool:
    """Whether a document belongs to the validation share (`data.valid_fraction`): decided by a hash of its text,
    so the split is the same however the corpus is cut into units or streams, and copies of a document fall on the
    same side."""
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") < fraction * 2**64
