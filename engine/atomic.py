"""Atomic writes: everything cellray writes appears whole under its final name, or not at all.

A writer writes under a temporary name beside the destination (same filesystem, so the final rename is atomic),
then renames it into place. A crash leaves either the old state or the new one, plus at most a hidden temporary
whose name carries the writer's pid and host (`.NAME.tmp-PID@HOST-XXXXXXXX`): the next writer of the same
destination removes it once that process is gone. `writer_lock` keeps two writers off one destination.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import re
import shutil
import socket
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from engine.errors import CellrayError
from engine.objects import ObjectPath, is_uri, location, store_path, write_bytes

log = logging.getLogger(__name__)


HOST = socket.gethostname()
_TEMP = re.compile(r"\.tmp-(\d+)@(.+)-[0-9a-f]{8}")


def temporary_sibling(path: Path, suffix: str = "") -> Path:
    """A unique hidden name beside `path` (`.NAME.tmp-PID@HOST-XXXXXXXX`, plus `suffix` for tools that need one)."""
    path = Path(path)
    return path.parent / f".{path.name}.tmp-{os.getpid()}@{HOST}-{uuid.uuid4().hex[:8]}{suffix}"


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def temporaries_in(directory: Path) -> list[Path]:
    """Every writer's temporary in `directory`, whoever wrote it: orphans, when the caller knows no writer runs."""
    directory = Path(directory)
    return [p for p in directory.glob(".*.tmp-*") if _TEMP.search(p.name)] if directory.is_dir() else []


def remove_stale_temporaries(dest: Path) -> list[Path]:
    """Remove the temporaries of `dest` left by dead processes of this host (a writer killed mid-write)."""
    dest = Path(dest)
    removed = []
    for tmp in dest.parent.glob(f".{glob.escape(dest.name)}.tmp-*") if dest.parent.is_dir() else ():
        m = _TEMP.match(tmp.name[len(dest.name) + 1 :])
        if m and m.group(2) == HOST and not process_alive(int(m.group(1))):
            remove(tmp)
            log.warning("removed %s, left by process %s (no longer running)", tmp, m.group(1))
            removed.append(tmp)
    return removed


@contextlib.contextmanager
def writer_lock(dest: str | os.PathLike) -> Iterator[None]:
    """Hold `.NAME.lock` beside `dest` while writing it: a second writer fails with a clear message; the lock and
    temporaries of a writer that died are removed (with a line saying so)."""
    dest = Path(dest)
    for parent in (dest.parent, *dest.parent.parents):
        if parent.exists() and not parent.is_dir():
            raise CellrayError(f"{dest}: {parent} is not a directory")
    dest.parent.mkdir(parents=True, exist_ok=True)
    lock = dest.parent / f".{dest.name}.lock"
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            try:
                pid, host = lock.read_text().split("@", 1)
            except (OSError, ValueError):
                pid, host = "0", HOST
            if host.strip() == HOST and not process_alive(int(pid)):
                lock.unlink(missing_ok=True)
                log.warning("removed the lock of %s left by process %s (no longer running)", dest, pid)
                continue
            raise CellrayError(
                f"{dest}: another cellray process (pid {pid} on {host.strip()}) is writing it; wait for it to finish "
                f"(or, if that process is gone, remove {lock})"
            ) from None
    else:
        raise CellrayError(f"{dest}: could not take the lock {lock}")
    try:
        os.write(fd, f"{os.getpid()}@{HOST}".encode())
        os.close(fd)
        remove_stale_temporaries(dest)
        yield
    finally:
        lock.unlink(missing_ok=True)


def replace_atomically(
    tmp: Path, dest: Path, overwrite: bool, replaceable: Callable[[Path], bool] | None = None
) -> None:
    """Move a finished `tmp` (file or directory) to `dest`. An existing `dest` is refused unless `overwrite`, and
    then only if `replaceable(dest)` says it is something cellray wrote (never an arbitrary directory)."""
    if dest.exists():
        if not overwrite:
            raise CellrayError(f"{dest}: already exists (pass --overwrite to replace it)")
        if replaceable is not None and not replaceable(dest):
            raise CellrayError(f"{dest}: exists and is not something cellray wrote: refusing to replace it")
        if tmp.is_file() and dest.is_file():
            os.replace(tmp, dest)
            return
        trash = temporary_sibling(dest)
        os.rename(dest, trash)
        os.rename(tmp, dest)
        remove(trash)
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
        remove(tmp)
        raise


def write_text_atomically(dest: str | os.PathLike | ObjectPath, text: str) -> None:
    """A text file replaced whole: renamed into place, or in a bucket one put (atomic by itself)."""
    if is_uri(dest):
        write_bytes(location(dest), text.encode())
        return
    with atomic_path(dest) as tmp:
        tmp.write_text(text)


def read_text(path: str | os.PathLike | ObjectPath) -> str:
    """A text file's contents, local or in a bucket (FileNotFoundError, or MissingObjectError, when absent)."""
    return store_path(path).read_text()
