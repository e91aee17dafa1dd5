"""Output paths, checked before any work: every command that writes a file or a folder asks here first, so a typo
in `-o` costs a second, not a whole run, and every command words the problem the same way.

Writability is tested by creating (and removing) a scratch file, not with `os.access`: as root, or on a read-only
mount, `os.access` answers wrongly.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import FlexSelectError


def check_output_file(path: str | os.PathLike, suffixes: tuple[str, ...] = ()) -> Path:
    """`path` can be written as a file with one of `suffixes` (any when empty); its folder must exist."""
    p = Path(path)
    if p.is_dir():
        raise FlexSelectError(f"cannot write {p}: it is a directory; give a file name inside it")
    if suffixes and p.suffix.lower() not in suffixes:
        raise FlexSelectError(f"cannot write {p}: the file name must end in {' or '.join(suffixes)}")
    folder = p.parent
    if not folder.exists():
        raise FlexSelectError(f"cannot write {p}: the folder {folder} does not exist; create it first")
    if not folder.is_dir():
        raise FlexSelectError(f"cannot write {p}: {folder} is a file, not a folder")
    _check_writable(folder, p)
    return p


def check_output_dir(path: str | os.PathLike) -> Path:
    """`path` is a folder, or can be made one (its missing parents too)."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise FlexSelectError(f"cannot write into {p}: it is a file, not a folder; give a folder path")
    existing = p
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise FlexSelectError(f"cannot create the folder {p}: {existing} is a file, not a folder")
    _check_writable(existing, p)
    return p


@contextmanager
def output_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Create the folder `path` (checked by `check_output_dir`); if the block fails, remove the folders it made
    that are still empty, so a failed export leaves nothing behind."""
    p = check_output_dir(path)
    missing = []
    parent = p
    while not parent.exists():
        missing.append(parent)
        parent = parent.parent
    p.mkdir(parents=True, exist_ok=True)
    try:
        yield p
    except BaseException:
        for folder in missing:  # deepest first
            try:
                folder.rmdir()
            except OSError:  # not empty (or gone): leave it
                break
        raise


def _check_writable(folder: Path, target: Path) -> None:
    try:
        fd, scratch = tempfile.mkstemp(prefix=".flexselect-write-test-", dir=folder)
    except OSError as e:
        raise FlexSelectError(f"cannot write {target}: the folder {folder} is not writable ({e.strerror})") from None
    os.close(fd)
    os.unlink(scratch)
