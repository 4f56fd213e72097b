"""Hugging Face datasets sources, opened once per process: a `datasets.Dataset.save_to_disk` directory
(memory-mapped) and a dataset `datasets.load_dataset` finds by name (streamed)."""

from __future__ import annotations

import datasets

from trainer.data.sources import Source
from trainer.errors import UserError

# load_dataset() of a packaged builder otherwise sends a "download count" HEAD request to the Hub on every call
datasets.config.HF_UPDATE_DOWNLOAD_COUNTS = False

_CACHE: dict = {}


def saved_dataset(path: str) -> datasets.Dataset:
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


def streamed_dataset(source: Source) -> datasets.IterableDataset:
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
