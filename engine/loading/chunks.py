"""Cell ranges of many shards of a store, read as one concatenated CSR with one decode per chunk.

The arrays are read through `engine.store.chunkfile.ArrayReader` (direct, every chunk verified). The chunks every
segment of a buffer needs are merged per shard into runs, and every run of both arrays is decoded once into a reused
per-thread pool, in one call (`ChunkBatch`);
X/indptr chunks are decoded the same way and cached per shard (bounded), so a block of a big shard costs no
zarr-python call. A layout the direct reader does not handle goes through `Store.read_array`. For a store in a bucket,
the byte ranges of every run of a buffer (and the indptr chunks it needs) are fetched into the node's cache before
the first is decoded: one call per array (its ranges merged where close), every array's at once on a pool of threads.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.errors import StoreError
from engine.store.chunkfile import ArrayReader, ChunkBatch
from engine.store.csr import CSRRows, gather_rows_csr
from engine.store.format import Store

log = logging.getLogger(__name__)

INDPTR_CACHE_BYTES = 64 * 2**20  # decoded indptr chunks kept per reader: all of them for stores up to ~8M cells


class LRU(OrderedDict):
    """A dict of at most `capacity` entries, the least recently used dropped first."""

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity

    def get_or(self, key, make):
        if key in self:
            self.move_to_end(key)
            return self[key]
        value = make()
        self[key] = value
        while len(self) > self.capacity:
            self.popitem(last=False)
        return value


class ScratchArrays:
    """Reused arrays, one set per thread: a pool decoded into one is valid until the same thread asks for it again
    (the readers copy every batch out of a buffer before reading the next), and costs no fresh pages per buffer."""

    def __init__(self):
        self._local = threading.local()

    def get(self, name: str, n: int, dtype: np.dtype) -> np.ndarray:
        """This thread's array `name`, n elements of `dtype` (grown by a quarter when too small)."""
        buf = getattr(self._local, name, None)
        if buf is None or buf.dtype != dtype or len(buf) < n:
            buf = np.empty(max(n, int(1.25 * len(buf)) if buf is not None else n), dtype=dtype)
            setattr(self._local, name, buf)
        return buf[:n]


@dataclass
class PoolRead:
    """A planned read of cells: the chunk runs (shard, first, last chunk) to decode, one after another, into a pool
    of `size` elements, and where each cell's non-zeros then lie in it."""

    runs: list[tuple[int, int, int]]
    bases: np.ndarray  # each run's first element in the pool; bases[-1] is the pool's size
    row_start: np.ndarray  # per cell, int64
    row_len: np.ndarray
    used: int  # elements of the cells themselves (the rest is the runs' edges)
    dtypes: tuple[np.dtype, np.dtype]  # of the decoded indices and data
    cast: tuple[np.dtype, np.dtype]  # of the store's indices and data, as its manifest says

    @property
    def size(self) -> int:
        return int(self.bases[-1])

    def rows(self, pool_i: np.ndarray, pool_d: np.ndarray) -> CSRRows:
        """The cells, once decoded into pool_i/pool_d (of the store's dtypes, cast where the chunks' differ)."""
        return CSRRows(
            pool_i.astype(self.cast[0], copy=False),
            pool_d.astype(self.cast[1], copy=False),
            self.row_start,
            self.row_len,
        )


class StoreBlocks:
    """Reads cell ranges of many shards of a store as one concatenated CSR, plus obs codes.

    Decoded indptr chunks and obs codes are cached (LRU), so their memory stays bounded by `indptr_cache_bytes` and
    `cache_shards`, not by the store size. `stats` counts elements decoded against elements used (over-decoding).
    """

    def __init__(
        self,
        store: Store,
        direct: bool = True,
        cache_shards: int = 64,
        indptr_cache_bytes: int = INDPTR_CACHE_BYTES,
    ):
        self.store = store
        self.direct = direct and (store.remote or Path(store.path).exists())
        self.strict = store.manifest.version >= 2  # v2 writes every chunk: a missing one is corruption
        self._arrays: dict[tuple[int, str], ArrayReader | None] = {}
        self._indptr_bytes = indptr_cache_bytes
        self._indptr: LRU | None = None  # (shard, chunk) -> decoded indptr chunk; sized on first use
        self._obs: LRU = LRU(cache_shards)
        self._lock = threading.Lock()
        self.scratch = ScratchArrays()  # decode pools, reused: no page faults per buffer
        self.stats = {"decoded": 0, "used": 0}  # elements of X/data (= X/indices) decoded and delivered

    @property
    def cell_offsets(self) -> np.ndarray:
        return self.store.cell_offsets

    def close(self) -> None:
        for r in self._arrays.values():
            if r is not None:
                r.close()

    def _array(self, shard: int, name: str) -> ArrayReader | None:
        """The direct reader of X/`name` of a shard, or None (zarr-python path). Its shape is checked against the
        manifest first, so a shard that disagrees with the manifest is refused before any read."""
        key = (shard, name)
        with self._lock:
            if key not in self._arrays:
                reader = None
                if self.direct:
                    place = self.store.placement(shard, name)
                    reader = ArrayReader.open(self.store.array_path(shard, name), self.strict, place)
                    info = self.store.manifest.shards[shard]
                    want = info.n_cells + 1 if name == "indptr" else info.nnz
                    if reader is not None and reader.layout.shape != want:
                        raise StoreError(
                            f"{self.store.where(shard, name)}: {reader.layout.shape} elements, the manifest says "
                            f"{want} (the manifest and the shard disagree)"
                        )
                self._arrays[key] = reader
            return self._arrays[key]

    # -- indptr
    def _indptr_chunk(self, shard: int, reader: ArrayReader, c: int) -> np.ndarray:
        key = (shard, c)
        with self._lock:
            if self._indptr is None:
                self._indptr = LRU(max(4, self._indptr_bytes // (8 * reader.layout.chunk_elems)))
            if key in self._indptr:
                self._indptr.move_to_end(key)
                return self._indptr[key]
        out = np.empty(reader.layout.chunk_elems, dtype=reader.layout.dtype)
        reader.decode(c, out)  # outside the lock: another thread may decode the same chunk, harmlessly
        out = out.astype(np.int64, copy=False)
        with self._lock:
            return self._indptr.get_or(key, lambda: out)

    def indptr_range(self, shard: int, start: int, stop: int) -> np.ndarray:
        """indptr[start : stop + 1] of a shard (int64), from its cached, verified chunks."""
        reader = self._array(shard, "indptr")
        if reader is None:
            return self.store.read_array(shard, "indptr", start, stop + 1).astype(np.int64, copy=False)
        per = reader.layout.chunk_elems
        c0, c1 = start // per, stop // per
        if c0 == c1:
            return self._indptr_chunk(shard, reader, c0)[start - c0 * per : stop - c0 * per + 1]
        parts = [self._indptr_chunk(shard, reader, c) for c in range(c0, c1 + 1)]
        return np.concatenate(parts)[start - c0 * per : stop - c0 * per + 1]

    def indptr(self, shard: int) -> np.ndarray:
        """A shard's whole indptr."""
        return self.indptr_range(shard, 0, self.store.manifest.shards[shard].n_cells)

    def obs_codes(self, shard: int, key: str) -> np.ndarray:
        """Integer codes of a categorical obs column (or the values of a numeric one) for a whole shard."""
        with self._lock:
            return self._obs.get_or((shard, key), lambda: self.store.obs_codes(shard, key))

    # -- cells
    def read_pool(self, segments: np.ndarray) -> CSRRows:
        """Cells of `segments` (rows of shard, start, stop) in order, as a `CSRRows` pointing into decoded chunks.

        The chunks every segment needs are merged per shard into runs, and each run is decoded once into a pool
        (so segments of one buffer that share a chunk decode it once); each cell's non-zeros are contiguous in the
        pool, and nothing is copied after decoding."""
        read = self.plan_read(segments)
        return read if isinstance(read, CSRRows) else self.decode(read)  # a CSRRows: read through zarr-python

    def decode(self, read: PoolRead) -> CSRRows:
        """A planned read, decoded into this thread's pool."""
        pool_i = self.scratch.get("indices", read.size, read.dtypes[0])
        pool_d = self.scratch.get("data", read.size, read.dtypes[1])
        batch = ChunkBatch()  # every chunk of the buffer in one call: one GIL release per buffer, not per run
        self.decode_into(read, batch, pool_i, pool_d, 0)
        batch.run()
        return read.rows(pool_i, pool_d)

    def plan_read(self, segments: np.ndarray) -> PoolRead | CSRRows:
        """What `read_pool` decodes for `segments`: its chunk runs and where each cell lands in a pool of
        `PoolRead.size` elements. A layout the direct reader does not handle is read at once (a `CSRRows`)."""
        n_seg = segments.shape[0]
        if self.store.remote and self.direct:
            self._prefetch_indptr(segments)
        nnz_lo, nnz_hi, starts, lens = [], [], [], []
        for shard, start, stop in segments:
            ip = self.indptr_range(int(shard), int(start), int(stop))
            nnz_lo.append(int(ip[0]))
            nnz_hi.append(int(ip[-1]))
            starts.append(ip[:-1])
            lens.append(np.diff(ip))
        readers = [(self._array(int(sh), "indices"), self._array(int(sh), "data")) for sh, _, _ in segments]
        direct = n_seg > 0 and all(ri is not None and rd is not None for ri, rd in readers)
        if direct:
            chunk = readers[0][0].layout.chunk_elems
            direct = all(ri.layout.chunk_elems == chunk == rd.layout.chunk_elems for ri, rd in readers)
        if not direct:
            return self._read_pool_zarr(segments, nnz_lo, nnz_hi, starts, lens)

        # chunk runs per segment, merged per shard where they overlap or touch: each chunk decoded once per call
        need = sorted(
            (int(segments[i, 0]), lo // chunk, (hi - 1) // chunk, i)
            for i, (lo, hi) in enumerate(zip(nnz_lo, nnz_hi))
            if hi > lo
        )
        runs: list[list[int]] = []  # [shard, c0, c1]
        run_of = np.zeros(n_seg, dtype=np.int64)
        for shard, c0, c1, i in need:
            if runs and runs[-1][0] == shard and c0 <= runs[-1][2] + 1:
                runs[-1][2] = max(runs[-1][2], c1)
            else:
                runs.append([shard, c0, c1])
            run_of[i] = len(runs) - 1
        sizes = np.array([(c1 - c0 + 1) * chunk for _, c0, c1 in runs], dtype=np.int64)
        bases = np.zeros(len(runs) + 1, dtype=np.int64)
        np.cumsum(sizes, out=bases[1:])
        if self.store.remote:
            self._prefetch([(self._array(sh, a), (c0, c1)) for sh, c0, c1 in runs for a in ("indices", "data")])
        shift = [int(bases[run_of[i]] - runs[run_of[i]][1] * chunk) if runs else 0 for i in range(n_seg)]
        return PoolRead(
            runs=[tuple(r) for r in runs],
            bases=bases,
            row_start=np.concatenate([st + sh for st, sh in zip(starts, shift)]).astype(np.int64),
            row_len=np.concatenate(lens).astype(np.int64),
            used=sum(hi - lo for lo, hi in zip(nnz_lo, nnz_hi)),
            dtypes=(readers[0][0].layout.dtype, readers[0][1].layout.dtype),
            cast=(np.dtype(self.store.manifest.index_dtype), np.dtype(self.store.manifest.count_dtype)),
        )

    def decode_into(self, read: PoolRead, batch: ChunkBatch, pool_i: np.ndarray, pool_d: np.ndarray, at: int) -> None:
        """Adds `read`'s runs to `batch`, decoding into pool_i/pool_d from element `at` on (when the batch runs)."""
        for r, (shard, c0, c1) in enumerate(read.runs):
            batch.add(self._array(shard, "indices"), c0, c1, pool_i, at + int(read.bases[r]))
            batch.add(self._array(shard, "data"), c0, c1, pool_d, at + int(read.bases[r]))
        with self._lock:
            self.stats["decoded"] += read.size
            self.stats["used"] += read.used

    @staticmethod
    def _prefetch(jobs: list[tuple[ArrayReader, tuple[int, int]]]) -> None:
        """Fetch the chunk runs of many arrays of a bucket's store into the node's cache: all runs of one array in
        one call (its ranges merged where close: fewer, larger requests), every array's call at once."""
        from engine.store.remote import fetch_pool

        by_array: dict[int, tuple[ArrayReader, list[tuple[int, int]]]] = {}
        for reader, run in jobs:
            if not reader.cached_whole():  # a warm cache: no thread hand-offs
                by_array.setdefault(id(reader), (reader, []))[1].append(run)
        calls = list(by_array.values())
        if len(calls) == 1:
            calls[0][0].prefetch(calls[0][1])
        elif calls:
            list(fetch_pool().map(lambda call: call[0].prefetch(call[1]), calls))

    def _prefetch_indptr(self, segments: np.ndarray) -> None:
        jobs = []
        for shard, start, stop in segments:
            reader = self._array(int(shard), "indptr")
            if reader is not None:
                per = reader.layout.chunk_elems
                for c in range(int(start) // per, int(stop) // per + 1):
                    if self._indptr is None or (int(shard), c) not in self._indptr:
                        jobs.append((reader, (c, c)))
        self._prefetch(jobs)

    def _read_pool_zarr(self, segments, nnz_lo, nnz_hi, starts, lens) -> CSRRows:
        """The reference path through zarr-python (checked reads): one read per segment and array, concatenated."""
        parts_i, parts_d, shift, pos = [], [], [], 0
        for (shard, _, _), lo, hi in zip(segments, nnz_lo, nnz_hi):
            parts_i.append(self.store.read_array(int(shard), "indices", lo, hi))
            parts_d.append(self.store.read_array(int(shard), "data", lo, hi))
            shift.append(pos - lo)
            pos += hi - lo
        dt_i = np.dtype(self.store.manifest.index_dtype)
        dt_d = np.dtype(self.store.manifest.count_dtype)
        return CSRRows(
            np.concatenate(parts_i) if parts_i else np.empty(0, dt_i),
            np.concatenate(parts_d) if parts_d else np.empty(0, dt_d),
            np.concatenate([st + sh for st, sh in zip(starts, shift)]).astype(np.int64)
            if starts
            else np.empty(0, np.int64),
            np.concatenate(lens).astype(np.int64) if lens else np.empty(0, np.int64),
        )

    def read(self, segments: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Cells of `segments` concatenated as plain CSR arrays: (indptr int64, indices, data)."""
        pool = self.read_pool(segments)
        rows = np.arange(pool.n_cells, dtype=np.int64)
        return gather_rows_csr(pool, rows, data_dtype=pool.data.dtype, index_dtype=pool.indices.dtype)
