"""The checkpoint directory protocol: `step_<N>` directories, the `latest` pointer naming the newest, which of them
are complete, and which one a resume, `trainer export` or `load_model` takes (verified by trainer/integrity.py)."""

from __future__ import annotations

from pathlib import Path

from trainer.errors import SharedError
from trainer.integrity import STATE_FILE, damage

LATEST = "latest"
DAMAGED_PREFIX = "damaged_"  # a damaged checkpoint moved aside: kept for inspection, never counted by `keep`


def _step_of(path: Path) -> int:
    return int(path.name.split("_", 1)[1])


def step_dirs(ckpt_root: Path) -> list[Path]:
    """Every `step_<N>` directory, oldest first, complete or not."""
    if not ckpt_root.is_dir():
        return []
    return sorted((p for p in ckpt_root.glob("step_*") if p.name[5:].isdigit() and p.is_dir()), key=_step_of)


def complete_checkpoints(ckpt_root: Path) -> list[Path]:
    """Checkpoints that a save finished (their state file is there), oldest first: what `checkpoint.keep` counts."""
    return [p for p in step_dirs(ckpt_root) if (p / STATE_FILE).is_file()]


def read_pointer(ckpt_root: Path) -> tuple[Path | None, str | None]:
    """The checkpoint `latest` names, or (None, why it names none usable); (None, None) when there is no pointer."""
    pointer = ckpt_root / LATEST
    if not pointer.exists():
        return None, None
    try:
        name = pointer.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None, f"the pointer {LATEST} is unreadable"
    if not (name.startswith("step_") and name[5:].isdigit()):
        return None, f"the pointer {LATEST} holds no checkpoint name"
    if not (ckpt_root / name).is_dir():
        return None, f"the pointer {LATEST} names {name}, which is missing"
    return ckpt_root / name, None


def candidates(ckpt_root: Path) -> tuple[list[Path], str | None]:
    """Checkpoints to resume from, newest first: the one `latest` names and those before it (or, when the pointer is
    unusable, every `step_<N>`); and why the pointer was not used, if it was not."""
    target, why = read_pointer(ckpt_root)
    found = step_dirs(ckpt_root)[::-1]
    if target is not None:
        found = [p for p in found if _step_of(p) <= _step_of(target)]
    return found, why


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    """The newest complete checkpoint (verified; nothing is moved)."""
    found, _ = candidates(ckpt_root)
    return next((p for p in found if damage(p) is None), None)


def resolve_checkpoint_dir(path: str | Path) -> Path:
    """Accepts a checkpoint directory, the `latest` pointer (the checkpoint it names), a run's `checkpoints/`
    directory, or a run directory; the checkpoint must be complete (a damaged one is refused in one line)."""
    p = Path(path)
    if p.name == LATEST and p.is_file():  # the pointer: the checkpoint it names, or why it names none
        target, why = read_pointer(p.parent)
        if target is None:
            raise SharedError(f"{p} names no checkpoint ({why}): give a checkpoints/step_<N> directory of the run")
        p = target
    if (p / STATE_FILE).is_file() or (p.name.startswith("step_") and p.is_dir()):
        why = damage(p)
        if why is not None:
            raise SharedError(f"checkpoint {p} is damaged ({why}): give another checkpoints/step_<N> directory")
        return p
    for root in (p, p / "checkpoints"):
        found = latest_checkpoint(root)
        if found is not None:
            return found
    raise SharedError(f"no complete checkpoint at {p}: give a checkpoints/step_<N> directory of a run")
