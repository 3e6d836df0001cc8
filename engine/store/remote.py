"""The node-local read-through cache of objects in a bucket: shard files read by byte ranges, kept on local disk.

A `CachedObject` mirrors one object as a sparse local file of the object's size plus a presence map of its 64 KiB
slots. `ensure(ranges)` fetches the slots a read needs that are not there yet (runs of missing slots closer than
1 MiB merged into one range; one request per range, all in flight at once), writes them into the mirror and only then
marks them present; the reader memory-maps the mirror and decodes from it as from a local store, so every chunk is
still checked (crc32c) before it is decoded, cached or not. A chunk that fails its check in the cache is forgotten
and fetched again once (`forget`); a second failure is the object's. A mirror is bound to its object's e_tag and size:
a changed object starts a fresh mirror.

The cache lives under `CELLRAY_CACHE_DIR` (default `~/.cache/cellray`), is shared by every process of the node, and
is capped at `CELLRAY_CACHE_GB` (default 100 GB) of fetched bytes: the least recently opened objects go first.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from engine.objects import ObjectPath, cache_dir, head, read_ranges

log = logging.getLogger(__name__)

SLOT = 1 << 16  # bytes per presence slot
GAP = 1 << 20  # missing runs closer than this are fetched as one range (a GET costs ~ 1 MiB of transfer)
FETCH_THREADS = 16  # files fetched at once by `prefetch`: enough to hide ~20 ms per request
_EVICT_EVERY = 256 * 2**20  # check the cap after this many bytes fetched by this process
_fetched_since_check = 0
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def cache_cap_bytes() -> int:
    return int(float(os.environ.get("CELLRAY_CACHE_GB", "100")) * 2**30)


def fetch_pool() -> ThreadPoolExecutor:
    """The process's pool for fetching many objects' ranges at once."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(FETCH_THREADS, thread_name_prefix="cellray-fetch")
        return _pool


def _mirror(p: ObjectPath) -> Path:
    return cache_dir() / "objects" / p.scheme / p.bucket / p.key


class CachedObject:
    """One object of a bucket, mirrored on local disk as far as it has been read. Thread-safe."""

    def __init__(self, path: ObjectPath):
        self.path = path
        meta = head(path)  # MissingObjectError when there is no such object
        self.size = int(meta["size"])
        self.local = _mirror(path)
        self.local.parent.mkdir(parents=True, exist_ok=True)
        n_slots = max(1, -(-self.size // SLOT))
        tag_file = self.local.with_name(self.local.name + ".meta")
        present_file = self.local.with_name(self.local.name + ".present")
        tag = json.dumps({"e_tag": meta.get("e_tag"), "size": self.size})
        fresh = not (self.local.exists() and present_file.exists() and _read(tag_file) == tag)
        if fresh:  # a new object, or one that changed: a new mirror (written beside, renamed into place)
            for f, size in ((self.local, self.size), (present_file, n_slots)):
                tmp = f.with_name(f"{f.name}.tmp-{os.getpid()}-{threading.get_ident()}")
                with open(tmp, "wb") as fh:
                    fh.truncate(size)
                os.replace(tmp, f)
            _write(tag_file, tag)
        os.utime(tag_file)  # least recently opened goes first
        self.present = np.memmap(present_file, dtype=np.uint8, mode="r+", shape=(n_slots,))
        self._fd = os.open(self.local, os.O_RDWR)
        self._fetching = threading.Lock()
        self._complete = bool(self.present.all())  # every byte here: reads need no bookkeeping
        if fresh:
            evict()

    @property
    def complete(self) -> bool:
        """Every byte of the object is in the mirror."""
        return self._complete

    def close(self) -> None:
        os.close(self._fd)

    def ensure(self, ranges: list[tuple[int, int]]) -> None:
        """Make bytes [lo, hi) of every range present in the mirror, fetching what is missing."""
        if self._complete:
            return
        want: set[int] = set()
        for lo, hi in ranges:
            if hi > lo:
                want.update(range(lo // SLOT, (min(hi, self.size) - 1) // SLOT + 1))
        if not want:
            return
        slots = np.fromiter(sorted(want), dtype=np.int64)
        if not (self.present[slots] == 0).any():
            self._complete = len(want) == len(self.present) or bool(self.present.all())
            return
        with self._fetching:  # one fetch of this object at a time: a merged range covers gaps another read needs
            slots = slots[self.present[slots] == 0]
            self._fetch([int(s) for s in slots])
        self._complete = bool(self.present.all())

    def _fetch(self, slots: list[int]) -> None:
        global _fetched_since_check
        if not slots:
            return
        runs: list[list[int]] = []
        for s in slots:
            if runs and (s - runs[-1][1] - 1) * SLOT <= GAP:
                runs[-1][1] = s
            else:
                runs.append([s, s])
        starts = [a * SLOT for a, _ in runs]
        ends = [min(self.size, (b + 1) * SLOT) for _, b in runs]
        parts = read_ranges(self.path, starts, ends)
        for (a, b), start, part in zip(runs, starts, parts):
            os.pwrite(self._fd, part, start)  # bytes first, then the mark: a mark never stands for missing bytes
            self.present[a : b + 1] = 1
        _fetched_since_check += sum(e - s for s, e in zip(starts, ends))
        if _fetched_since_check > _EVICT_EVERY:
            _fetched_since_check = 0
            evict()

    def forget(self, lo: int, hi: int) -> None:
        """Drop bytes [lo, hi) from the mirror (they failed a check): the next `ensure` fetches them again."""
        if hi > lo:
            self.present[lo // SLOT : (min(hi, self.size) - 1) // SLOT + 1] = 0
            self._complete = False


def evict(cap: int | None = None) -> int:
    """Remove the least recently opened mirrors until the cache holds at most `cap` bytes (default
    `CELLRAY_CACHE_GB`); returns the bytes removed. Mirrors open elsewhere stay valid for their readers."""
    cap = cache_cap_bytes() if cap is None else cap
    root = cache_dir() / "objects"
    entries = []
    for tag in root.rglob("*.meta") if root.is_dir() else ():
        data = tag.with_name(tag.name.removesuffix(".meta"))
        try:
            entries.append((tag.stat().st_mtime, data.stat().st_blocks * 512, tag, data))
        except FileNotFoundError:
            continue
    total = sum(e[1] for e in entries)
    removed = 0
    for _, size, tag, data in sorted(entries):
        if total - removed <= cap:
            break
        for f in (tag, data, data.with_name(data.name + ".present")):
            f.unlink(missing_ok=True)
        removed += size
    if removed:
        log.info("cache %s: removed %.0f MB of least recently used objects (cap %.1f GB)", root, removed / 2**20,
                 cap / 2**30)  # fmt: skip
    return removed


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    tmp.write_text(text)
    os.replace(tmp, path)
