"""Batches from a reader actor to its consumer on the same node, without a copy through Ray's object store.

Through the object store, every batch is copied once more than it needs to be: the actor gathers it into its
own memory, Ray copies it into a plasma object (the raylet allocates and maps fresh pages for it), and the
consumer maps those pages again; measured on 2 cores, that is 0.3-0.5 µs per cell of ~100 non-zeros on top of
the ~1 µs of reading it. A reader actor beside its consumer (the Loader places it there) instead gathers its
batch arrays straight into shared-memory segments (`Arena`) and returns only where they lie (`SharedArray`);
the consumer maps each segment once (`SharedViews`) and hands out numpy views of it, zero copies. Ray still
carries the small rest of each batch (cell ids, obs codes) and the call itself.

Lifetime: the segments one read call filled are the consumer's until every array it handed out from them is
gone (torch tensors included: a finalizer on the views sees it); the consumer then names them in its next call to
that actor, which reuses them. The files live in /dev/shm only until the consumer has mapped them (it unlinks them
then), so a killed process leaves nothing behind there. An actor on another node, or a machine without /dev/shm,
falls back to the object store.
"""

from __future__ import annotations

import mmap
import os
import secrets
import threading
import weakref
from collections import defaultdict
from dataclasses import dataclass, fields, is_dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

SHM_DIR = Path("/dev/shm")
_ALIGN = 64
_KEEP_FREE = 4  # released segments an actor keeps for reuse; more are returned to the OS


@dataclass(frozen=True)
class SharedArray:
    """Where an array of a batch lies in a shared segment."""

    segment: str
    offset: int
    dtype: str
    shape: tuple[int, ...]


class Arena:
    """Actor side: batch arrays carved out of shared segments, with the interface of `BatchBuffers` (`empty`,
    `get`), so the reader's gather kernels write into shared memory directly. One call's arrays are placed
    back to back (`begin` ... `share` ... `end`)."""

    def __init__(self, prefix: str) -> None:
        self.prefix = f"{prefix}-{os.getpid()}"  # the consumer's prefix, then this process: unique across restarts
        self._n = 0
        self._maps: dict[str, mmap.mmap] = {}
        self._base: dict[str, int] = {}  # segment -> address of its first byte in this process
        self._free: list[str] = []  # released by the consumer: reusable
        self._busy: set[str] = set()  # holding batches the consumer has not released
        self._call: list[str] = []  # segments of the call in progress, in order
        self._pos = 0  # next free byte in self._call[-1]
        self._call_bytes = 0
        self._last_call_bytes = 4 * 2**20
        self._dropped: list[str] = []  # segments given back to the OS since the last call

    @classmethod
    def create(cls, prefix: str) -> Arena | None:
        """An arena naming its segments `PREFIX-PID-N` (`prefix` from `new_prefix` in the consumer), or None where
        shared memory cannot be made (no writable /dev/shm). Segments of consumers that died (killed between a
        read and mapping its result) are removed first: no one can map them any more."""
        if not (SHM_DIR.is_dir() and os.access(SHM_DIR, os.W_OK)):
            return None
        for f in SHM_DIR.glob("cellray-*"):
            pid = f.name.split("-")[1]
            if pid.isdigit() and not Path(f"/proc/{pid}").exists():
                _unlink(f.name)
        return cls(prefix)

    # -- a call
    def begin(self, released: list[str]) -> None:
        for name in released:
            if name in self._busy:
                self._busy.discard(name)
                self._free.append(name)
        self._free.sort(key=lambda n: len(self._maps[n]))
        while len(self._free) > _KEEP_FREE:
            self._drop(self._free.pop(0))  # the smallest go first
        self._call, self._pos, self._call_bytes = [], 0, 0

    def end(self, ok: bool) -> list[str]:
        """Finish a call: its segments now belong to the consumer (or, if the call failed, are free again).
        Returns the segments dropped since the last call, so the consumer can unmap them too."""
        (self._busy.update if ok else self._free.extend)(self._call)
        self._last_call_bytes = max(2**20, self._call_bytes)
        self._call, self._pos = [], 0
        dropped, self._dropped = self._dropped, []
        return dropped

    # -- BatchBuffers' interface
    def empty(self, n: int, dtype) -> np.ndarray:
        dtype = np.dtype(dtype)
        nbytes = max(1, n * dtype.itemsize)
        try:
            seg, off = self._room(nbytes)
        except OSError:  # /dev/shm full: this array goes through the object store
            return np.empty(n, dtype=dtype)
        return np.frombuffer(self._maps[seg], dtype=dtype, count=n, offset=off)

    def get(self, shape: tuple[int, int]) -> tuple[np.ndarray, bool]:
        """(array, fresh=False): contents undefined; the dense kernels clear what they reuse."""
        return self.empty(shape[0] * shape[1], np.float32).reshape(shape), False

    def _room(self, nbytes: int) -> tuple[str, int]:
        if self._call and self._pos + nbytes <= len(self._maps[self._call[-1]]):
            seg = self._call[-1]
        else:
            fits = [n for n in self._free if len(self._maps[n]) >= nbytes]
            if fits:
                seg = fits[-1]  # the largest: the rest of the call likely fits in it too
                self._free.remove(seg)
                self._call.append(seg)
            else:
                seg = self._new_segment(max(nbytes, int(1.25 * self._last_call_bytes)))
            self._pos = 0
        off = self._pos
        self._pos = -(-(off + nbytes) // _ALIGN) * _ALIGN
        self._call_bytes += nbytes
        return seg, off

    def _new_segment(self, size: int) -> str:
        size = -(-size // 2**20) * 2**20
        name = f"{self.prefix}-{self._n}"
        self._n += 1
        fd = os.open(SHM_DIR / name, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, size)
            mm = mmap.mmap(fd, size)
        except OSError:
            os.unlink(SHM_DIR / name)
            raise
        finally:
            os.close(fd)
        self._maps[name] = mm
        self._base[name] = np.frombuffer(mm, dtype=np.uint8).ctypes.data
        self._call.append(name)
        return name

    def _drop(self, name: str) -> None:
        self._maps.pop(name)  # closed when the last view is gone
        self._base.pop(name)
        _unlink(name)
        self._dropped.append(name)

    def close(self) -> None:
        for name in list(self._maps):
            self._drop(name)

    # -- the wire format
    def share(self, value: Any) -> Any:
        """`value` (a batch, a list of them, a CSRBlock, an array) with every array that lies in this call's
        segments replaced by its `SharedArray`; anything else is left for Ray to ship."""
        if isinstance(value, np.ndarray):
            return self._locate(value) or value
        if isinstance(value, dict):
            return {k: self.share(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self.share(v) for v in value]
        if is_dataclass(value) and not isinstance(value, type):
            return replace(value, **{f.name: self.share(getattr(value, f.name)) for f in fields(value)})
        return value

    def _locate(self, arr: np.ndarray) -> SharedArray | None:
        if not arr.flags.c_contiguous or arr.dtype.hasobject:
            return None
        addr = arr.__array_interface__["data"][0]
        for seg in self._call:
            base = self._base[seg]
            if base <= addr and addr + arr.nbytes <= base + len(self._maps[seg]):
                return SharedArray(seg, addr - base, arr.dtype.str, tuple(arr.shape))
        return None


def new_prefix() -> str:
    """Segment names for one consumer's readers: `cellray-PID-TOKEN` (the consumer's pid: see `Arena.create`)."""
    return f"cellray-{os.getpid()}-{secrets.token_hex(4)}"


class SharedViews:
    """Consumer side: turns `SharedArray`s back into numpy views of the mapped segments, and collects, per
    reader, the segments whose views are all gone (to name in the next call to that reader)."""

    def __init__(self) -> None:
        self.prefix = new_prefix()
        self._maps: dict[str, mmap.mmap] = {}
        self._released: dict[Any, list[str]] = defaultdict(list)
        self._lock = threading.Lock()  # finalizers run in whichever thread drops the last view

    def attach(self, value: Any, reader: Any, dropped: list[str] = ()) -> Any:
        """`value` with its SharedArrays as views. When every view of this value is gone, its segments are
        released to `reader`."""
        for name in dropped:
            self._maps.pop(name, None)
        segments: set[str] = set()
        views: list[np.ndarray] = []
        out = self._resolve(value, segments, views)
        if views:
            left = [len(views)]
            for v in views:
                weakref.finalize(v, self._view_done, reader, segments, left)
        return out

    def released(self, reader: Any) -> list[str]:
        with self._lock:
            return self._released.pop(reader, [])

    def forget(self, reader: Any) -> None:
        """A reader is gone: what it would have reused needs no release."""
        with self._lock:
            self._released.pop(reader, None)

    def close(self) -> None:
        """After the readers are gone: remove every segment they made that is still named (those of calls whose
        results were never fetched); each map closes when its last view is gone."""
        for f in SHM_DIR.glob(f"{self.prefix}-*"):
            _unlink(f.name)
        self._maps.clear()

    def _view_done(self, reader: Any, segments: set[str], left: list[int]) -> None:
        with self._lock:
            left[0] -= 1
            if left[0] == 0:
                self._released[reader].extend(segments)

    def _resolve(self, value: Any, segments: set[str], views: list) -> Any:
        if isinstance(value, SharedArray):
            mm = self._map(value.segment)
            dtype = np.dtype(value.dtype)
            n = int(np.prod(value.shape))
            buf = memoryview(mm)[value.offset : value.offset + n * dtype.itemsize]
            arr = np.frombuffer(buf, dtype=dtype, count=n)
            # arr.base is the memoryview made for it: every view of arr (numpy or torch) keeps exactly that
            # object alive, so its death means no one can see this part of the segment any more
            views.append(arr.base)
            segments.add(value.segment)
            return arr.reshape(value.shape)
        if isinstance(value, dict):
            return {k: self._resolve(v, segments, views) for k, v in value.items()}
        if isinstance(value, list):
            return [self._resolve(v, segments, views) for v in value]
        if is_dataclass(value) and not isinstance(value, type):
            return replace(
                value, **{f.name: self._resolve(getattr(value, f.name), segments, views) for f in fields(value)}
            )
        return value

    def _map(self, name: str) -> mmap.mmap:
        mm = self._maps.get(name)
        if mm is None:
            with open(SHM_DIR / name, "r+b") as fh:
                mm = mmap.mmap(fh.fileno(), 0)
            _unlink(name)  # both sides have it mapped: nothing needs the name any more
            self._maps[name] = mm
        return mm


def _unlink(name: str) -> None:
    try:
        os.unlink(SHM_DIR / name)
    except FileNotFoundError:
        pass
