"""Corpus sources: their specs (data.train, data.valid) and the format of each path.

A *source* is one named corpus of a run: files (text, jsonl, parquet), a directory written by `trainer prepare`
(format tokens), a directory written by `datasets.Dataset.save_to_disk`, or a dataset `datasets.load_dataset` finds
by name (streamed). `data.train` is a list of paths (one source) or a mapping of named sources with weights.

This module parses source specs (data.train, data.valid) and tells each path's format; trainer/data/units.py cuts
a raw source into units, trainer/data/documents.py reads its documents, trainer/data/hf_datasets.py opens the
datasets ones.
"""

from __future__ import annotations

import glob
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from trainer.errors import UserError

FORMATS = ("auto", "text", "jsonl", "parquet", "tokens", "saved")
_EXTENSIONS = {".txt": "text", ".text": "text", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}


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
