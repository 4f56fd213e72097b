"""Whether a checkpoint directory is complete, by the save protocol's own evidence, before anything trusts it.

The last file a save writes, once every rank's files are on disk, is `manifest.json`: every other file of the
checkpoint with its size. A checkpoint is complete when its manifest parses and every file it lists is there with that
size, and the files that describe it parse: `state.json`, each data-parallel rank's RNG file, the payload's metadata
(DCP's `.metadata`, whose entries must lie inside the shard files; DeepSpeed's layout and its own files). Checkpoints
written before manifests existed are held to the same parse checks, without the size list.

`damage(path)` returns None for a complete checkpoint, else what is wrong with it in a few words ("dcp/.metadata
missing"), for a one-line message.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import torch

from trainer.engines.base import DCP_DIR
from trainer.engines.deepspeed import LAYOUT_FILE as DS_LAYOUT
from trainer.engines.deepspeed import PAYLOAD_DIR as DS_DIR

MANIFEST = "manifest.json"  # the last file a save writes: every other file of the checkpoint with its size
STATE_FILE = "state.json"


def write_manifest(directory: Path) -> Path:
    """Lists every file under `directory` (all ranks' files, complete: called after they are fsynced) with its size;
    the caller fsyncs it. Returns the manifest's path."""
    files = {}
    for root, _, names in os.walk(directory):
        for name in names:
            path = Path(root) / name
            rel = path.relative_to(directory).as_posix()
            if rel != MANIFEST:
                files[rel] = path.stat().st_size
    out = directory / MANIFEST
    out.write_text(json.dumps({"bytes": sum(files.values()), "files": dict(sorted(files.items()))}, indent=1))
    return out


def checkpoint_bytes(directory: Path) -> int:
    """The size of a checkpoint on disk: its manifest's total, or the sum of its files' sizes."""
    try:
        return int(json.loads((directory / MANIFEST).read_text())["bytes"])
    except (OSError, ValueError, KeyError, TypeError):
        return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


def damage(path: Path) -> str | None:
    """None when the checkpoint at `path` is complete; otherwise the first thing found wrong with it."""
    if not path.is_dir():
        return "not a directory"
    return _check_manifest(path) or _check_state(path) or _check_payload(path)


def _check_manifest(path: Path) -> str | None:
    file = path / MANIFEST
    if not file.exists():
        return None  # written before manifests existed: the parse checks below still apply
    try:
        files = json.loads(file.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{MANIFEST} unreadable: {_short(e)}"
    for rel, size in files.items():
        try:
            actual = (path / rel).stat().st_size
        except OSError:
            return f"{rel} missing"
        if actual != size:
            return f"{rel} has {actual} of its {size} bytes"
    return None


def _check_state(path: Path) -> str | None:
    try:
        state = json.loads((path / STATE_FILE).read_text())
    except FileNotFoundError:
        return f"{STATE_FILE} missing"
    except (OSError, ValueError) as e:
        return f"{STATE_FILE} unreadable: {_short(e)}"
    if not isinstance(state, dict) or not {"train_state", "model_config"} <= state.keys():
        return f"{STATE_FILE} lacks the training state"
    for r in range(int(state.get("dp", 1))):  # every data-parallel rank saved its RNG streams
        rng = path / f"rng_dp{r}.pt"
        if not rng.is_file():
            return f"{rng.name} missing"
        try:
            torch.load(rng, weights_only=False)
        except Exception as e:  # noqa: BLE001 - any failure to read it is damage
            return f"{rng.name} unreadable: {_short(e)}"
    return None


def _check_payload(path: Path) -> str | None:
    if (path / DS_DIR).is_dir():
        try:
            json.loads((path / DS_DIR / DS_LAYOUT).read_text())
        except FileNotFoundError:
            return f"{DS_DIR}/{DS_LAYOUT} missing"
        except (OSError, ValueError) as e:
            return f"{DS_DIR}/{DS_LAYOUT} unreadable: {_short(e)}"
        return None
    meta = path / DCP_DIR / ".metadata"
    if not meta.is_file():
        return f"{DCP_DIR}/.metadata missing"
    try:
        with meta.open("rb") as f:
            metadata = pickle.load(f)  # what DCP's FileSystemReader reads; written by our own save
        entries = list(metadata.storage_data.values())
    except Exception as e:  # noqa: BLE001 - any failure to read it is damage
        return f"{DCP_DIR}/.metadata unreadable: {_short(e)}"
    ends: dict[str, int] = {}
    for info in entries:
        ends[info.relative_path] = max(ends.get(info.relative_path, 0), info.offset + info.length)
    for rel, end in sorted(ends.items()):
        try:
            size = (path / DCP_DIR / rel).stat().st_size
        except OSError:
            return f"{DCP_DIR}/{rel} missing"
        if size < end:
            return f"{DCP_DIR}/{rel} has {size} of its {end} bytes"
    return None


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text[:100]
