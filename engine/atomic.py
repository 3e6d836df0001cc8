"""Atomic writes: everything cellray writes appears whole under its final name, or not at all.

A writer writes under a temporary name beside the destination (same filesystem, so the final rename is atomic),
then renames it into place. A crash leaves either the old state or the new one, plus at most a hidden temporary.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from engine.errors import CellrayError


def temporary_sibling(path: Path, suffix: str = "") -> Path:
    """A unique hidden name beside `path` (`.NAME.tmp-XXXXXXXX`, plus `suffix` for tools that need one)."""
    path = Path(path)
    return path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}{suffix}"


def replace_atomically(tmp: Path, dest: Path, overwrite: bool) -> None:
    """Move a finished `tmp` (file or directory) to `dest`; an existing `dest` is refused unless `overwrite`."""
    if dest.exists():
        if not overwrite:
            raise CellrayError(f"{dest}: already exists (pass --overwrite to replace it)")
        if tmp.is_file() and dest.is_file():
            os.replace(tmp, dest)
            return
        trash = temporary_sibling(dest)
        os.rename(dest, trash)
        os.rename(tmp, dest)
        if trash.is_dir():
            shutil.rmtree(trash, ignore_errors=True)
        else:
            trash.unlink(missing_ok=True)
    else:
        os.rename(tmp, dest)


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike, overwrite: bool = True, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path to write `dest` under; rename it into place on success, remove it on failure.

    `suffix` (default: `dest`'s own) is kept on the temporary name for writers that look at it (.png, .h5ad).
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(dest, dest.suffix if suffix is None else suffix)
    try:
        yield tmp
        replace_atomically(tmp, dest, overwrite)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


def write_text_atomically(dest: str | os.PathLike, text: str) -> None:
    with atomic_path(dest) as tmp:
        tmp.write_text(text)
