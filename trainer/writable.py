"""Directories a command must create or write into (run.dir, --out): refused before any work, in one line naming the
setting, and the one line for a file-system refusal met later (a read-only mount, a permission, a path under a file).

A run that would fail at its first checkpoint, or a tokenizer that would fail after its training, wastes the time
before the write; `check_writable_dir` asks the file system up front (os.access: a read-only mount, an immutable or
unwritable directory, a path under a regular file), without creating anything."""

from __future__ import annotations

import errno
import os
from pathlib import Path

from trainer.errors import UserError

# errors of the file system that are the user's to fix (not the program's): reported in one line, never a traceback
REFUSALS = (errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EEXIST, errno.EISDIR)


def check_writable_dir(path: str | os.PathLike, setting: str) -> None:
    """Raises a UserError naming `setting` (e.g. "run.dir", "--out") unless `path` is a directory this process can
    write into, or one it can create: its nearest existing ancestor is a writable directory."""
    given = Path(path).expanduser()
    target = given.absolute()
    if target.exists() and not target.is_dir():
        raise UserError(
            f"{setting} {given} is a file, not a directory: give {setting} the path of a directory (created if missing)"
        )
    probe = target
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise UserError(
            f"{setting} {given} cannot be created: {probe} is a file, not a directory; give {setting} a path of "
            f"directories"
        )
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"{setting} {given} cannot be written: {_why_not(probe)}; give {setting} a writable location")


def _why_not(path: Path) -> str:
    """Why `path` refuses writes, in words."""
    try:
        if os.statvfs(path).f_flag & os.ST_RDONLY:
            return f"{path} is on a read-only file system"
    except OSError:
        pass
    return f"{path} is not writable by this user (permissions or an immutable directory)"


def refusal_line(e: OSError, hint: str) -> str | None:
    """The one line for a file-system refusal (`REFUSALS`) met while a command ran, naming the path and what to do
    (`hint`: the setting behind it); None for any other OSError (a bug or an I/O failure: its traceback stays)."""
    if e.errno not in REFUSALS:
        return None
    where = f" {e.filename}" if e.filename else ""
    also = f" -> {e.filename2}" if getattr(e, "filename2", None) else ""
    return f"cannot use{where}{also} ({e.strerror}): {hint}"
