"""Corpus files and their documents: path/glob resolution, format detection and lazy document readers.

Documents are read with `datasets.load_dataset(..., streaming=True)`, so memory does not grow with the corpus size.
We iterate with `IterableDataset.iter(batch_size=...)`, which (unlike `__iter__`) does not split files among torch
DataLoader workers: the caller decides which worker handles which document, and every worker sees the full sequence.
"""

from __future__ import annotations

import glob
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import datasets
import pyarrow.parquet as pq
from datasets.exceptions import DatasetGenerationError

from trainer.errors import UserError

FORMATS = ("auto", "text", "jsonl", "parquet", "tokens")
BAD_LINES = ("skip", "error")
_EXTENSIONS = {".txt": "text", ".text": "text", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}
_READ_BATCH = 1000  # rows per Arrow batch pulled from `datasets`; small enough to keep memory flat

# load_dataset() of a packaged builder otherwise sends a "download count" HEAD request to the Hub on every call (one
# per file per epoch per worker, with a 3 s timeout on machines without internet); we only ever read local files.
datasets.config.HF_UPDATE_DOWNLOAD_COUNTS = False

# Files whose bad-line count was already reported by this process, so the warning appears once, not every epoch.
_WARNED: set[str] = set()


def is_tokens_dir(path: str | os.PathLike) -> bool:
    """True for a directory written by `trainer prepare` (it holds meta.json)."""
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, "meta.json"))


def resolve_files(paths: list[str] | str) -> list[str]:
    """Expand globs and directories into the sorted list of corpus files; a prepared tokens dir stays one entry.

    Sorting makes the document order (and thus the global sample sequence) independent of how the user listed paths.
    """
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
            if os.path.isdir(match) and not is_tokens_dir(match):
                inside = sorted(str(p) for p in Path(match).rglob("*") if p.is_file() and not p.name.startswith("."))
                if not inside:
                    raise UserError(f"directory {match!r} holds no files; point data paths at the corpus files")
                files.update(inside)
            else:
                files.add(match)
    return sorted(files)


def detect_format(files: list[str], fmt: str = "auto") -> str:
    """Return the one format of `files`: the given one, or (for "auto") the one their extensions imply."""
    if fmt not in FORMATS:
        raise UserError(f"unknown data format {fmt!r}; use one of {', '.join(FORMATS)}")
    if fmt != "auto":
        if fmt == "tokens" and not all(is_tokens_dir(f) for f in files):
            raise UserError("data.format=tokens needs a directory written by `trainer prepare` (with meta.json)")
        if fmt != "tokens" and any(is_tokens_dir(f) for f in files):
            raise UserError(f"data.format={fmt} was given a prepared token directory; set data.format=tokens or auto")
        return fmt
    found = set()
    for f in files:
        kind = "tokens" if is_tokens_dir(f) else _EXTENSIONS.get(Path(f).suffix.lower())
        if kind is None:
            raise UserError(f"cannot tell the format of {f!r} from its extension; set data.format explicitly")
        found.add(kind)
    if len(found) != 1:
        raise UserError(f"data files mix formats ({', '.join(sorted(found))}); use one format per data list")
    return found.pop()


def check_read_args(fmt: str, text_field: str, bad_lines: str) -> None:
    """Validate reader options early, in the main process, so errors name the config key."""
    if fmt not in ("text", "jsonl", "parquet"):
        raise UserError(f"format {fmt!r} holds no raw documents; use text, jsonl or parquet files here")
    if not isinstance(text_field, str) or not text_field:
        raise UserError("data.text_field must be a non-empty column/key name such as 'text'")
    if bad_lines not in BAD_LINES:
        raise UserError(f"bad_lines={bad_lines!r} is not valid; use 'skip' or 'error'")


def iter_documents(
    files: list[str], fmt: str, text_field: str = "text", bad_lines: str = "skip", warn: bool = True
) -> Iterator[str]:
    """Yield the documents of one pass over `files` (in the given order), lazily.

    text: a document is a blank-line-separated paragraph (stripped; empty ones skipped).
    jsonl: one JSON object per line, its `text_field`; invalid lines are skipped and counted, or fatal.
    parquet: the `text_field` column; null or empty values are skipped.
    """
    check_read_args(fmt, text_field, bad_lines)
    reader = {"text": _iter_text, "jsonl": _iter_jsonl, "parquet": _iter_parquet}[fmt]
    for path in files:
        try:
            yield from reader(path, text_field, bad_lines, warn)
        except UserError:
            raise
        except (OSError, UnicodeDecodeError, ValueError, DatasetGenerationError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(f"cannot read {path!r} as {fmt}: {first}; fix or remove the file") from exc


def _stream(builder: str, path: str, **kwargs) -> Iterator[dict]:
    """Arrow batches (dict of column lists) of one local file, streamed by `datasets`."""
    ds = datasets.load_dataset(builder, data_files=[path], split="train", streaming=True, **kwargs)
    yield from ds.iter(batch_size=_READ_BATCH)


def _iter_text(path: str, text_field: str, bad_lines: str, warn: bool) -> Iterator[str]:
    for batch in _stream("text", path, sample_by="paragraph"):
        for paragraph in batch["text"]:
            paragraph = paragraph.strip()
            if paragraph:
                yield paragraph


def _iter_jsonl(path: str, text_field: str, bad_lines: str, warn: bool) -> Iterator[str]:
    bad = 0
    line_no = 0
    for batch in _stream("text", path, sample_by="line"):
        for line in batch["text"]:
            line_no += 1
            if not line.strip():
                continue  # blank lines (e.g. a trailing newline) are not records
            try:
                record = json.loads(line)
                text = record[text_field]
                if not isinstance(text, str):
                    raise TypeError(f"{text_field!r} is {type(text).__name__}, not a string")
            except (ValueError, KeyError, TypeError, IndexError) as exc:
                if bad_lines == "error":
                    reason = f"no {text_field!r} field" if isinstance(exc, KeyError) else type(exc).__name__
                    raise UserError(
                        f"{path}:{line_no}: invalid JSON line ({reason}); fix the line or set data.bad_lines=skip"
                    ) from None
                bad += 1
                continue
            text = text.strip()
            if text:
                yield text
    if bad and warn and path not in _WARNED:
        _WARNED.add(path)
        print(f"warning: skipped {bad} invalid JSON line(s) in {path} (no {text_field!r} string)", file=sys.stderr)


def _iter_parquet(path: str, text_field: str, bad_lines: str, warn: bool) -> Iterator[str]:
    names = pq.read_schema(path).names
    if text_field not in names:
        raise UserError(f"{path} has no column {text_field!r} (columns: {', '.join(names)}); set data.text_field")
    for batch in _stream("parquet", path, columns=[text_field]):
        for text in batch[text_field]:
            if isinstance(text, str) and text.strip():
                yield text.strip()
