"""Reusable batch arrays for the loader (no fresh mapping, and no page faults, per batch)."""

from __future__ import annotations

import threading

import numpy as np


class BatchBuffers:
    """Reusable batch arrays. A batch handed out returns its memory here once nothing references it
    any more (the consumer's tensor included), so a steady stream of batches stops paying a fresh
    mapping and its page faults per batch (a 32 MB batch allocated in a thread is always a new mmap; the
    ~1.5 MB arrays of a CSR batch cost 20-30% of the loader's CPU in page faults when fresh)."""

    def __init__(self, keep: int = 16):
        self.keep = keep
        self._free: list[np.ndarray] = []
        self.reused = 0  # arrays handed out on a returned base (tests and benchmarks read it)
        # reentrant: a finalizer run by the garbage collector inside get() puts its base back in this thread
        self._lock = threading.RLock()

    def get(self, shape: tuple[int, int]) -> tuple[np.ndarray, bool]:
        """(array, fresh): fresh arrays are zero-filled, reused ones hold an old batch."""
        import weakref

        n = shape[0] * shape[1]
        base = None
        with self._lock:
            for i, b in enumerate(self._free):
                if b.size >= n:
                    base = self._free.pop(i)
                    self.reused += 1
                    break
        fresh = base is None
        if fresh:
            base = np.zeros(n, dtype=np.float32)
        arr = base[:n].reshape(shape)  # a view: its death (not base's) returns base to the pool
        weakref.finalize(arr, self._put, base)
        return arr, fresh

    def empty(self, n: int, dtype) -> np.ndarray:
        """A 1-D array of n elements of `dtype`, contents undefined, from the pool when a free base fits."""
        import weakref

        nbytes = n * np.dtype(dtype).itemsize
        with self._lock:  # the smallest base that fits: a small array should not take a large one's base
            fits = [i for i, b in enumerate(self._free) if b.nbytes >= nbytes]
            base = self._free.pop(min(fits, key=lambda i: self._free[i].nbytes)) if fits else None
            self.reused += base is not None
        if base is None:  # headroom, so the next batch's slightly larger nnz still fits
            base = np.empty(-(-nbytes * 5 // 16), dtype=np.float32)
        arr = np.frombuffer(memoryview(base), dtype=dtype, count=n)
        # arr.base is the memoryview numpy made for it: every view of arr (numpy or torch) keeps exactly that
        # object alive, so its death means no one can see the memory any more
        weakref.finalize(arr.base, self._put, base)
        return arr

    def _put(self, base: np.ndarray) -> None:
        with self._lock:
            if len(self._free) < self.keep:
                self._free.append(base)
