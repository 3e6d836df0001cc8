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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numba
import numpy as np

from engine.errors import StoreError
from engine.store.chunkbatch import ChunkBatch
from engine.store.chunkfile import ArrayReader
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

    runs: np.ndarray  # (shard, first chunk, last chunk) per run, int64, sorted by shard and first chunk
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

    def array(self, shard: int, name: str) -> ArrayReader | None:
        """The direct reader of X/`name` of a shard, or None (zarr-python path). Its shape is checked against the
        manifest first, so a shard that disagrees with the manifest is refused before any read."""
        key = (shard, name)
        if key in self._arrays:  # no lock to look one up: entries are only ever added
            return self._arrays[key]
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
        reader = self.array(shard, "indptr")
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
        segments = np.ascontiguousarray(segments[:, :3], dtype=np.int64)
        if self.store.remote and self.direct:
            self._prefetch_indptr(segments)
        ip = self.indptr_of(segments)  # each segment's indptr[start : stop + 1], one after another
        cast = (np.dtype(self.store.manifest.index_dtype), np.dtype(self.store.manifest.count_dtype))
        read = plan_pool(segments, ip, self.array, cast)
        if read is None:
            return self._read_pool_zarr(segments, ip)
        if self.store.remote:
            jobs = [(self.array(sh, a), (c0, c1)) for sh, c0, c1 in read.runs.tolist() for a in ("indices", "data")]
            self._prefetch(jobs)
        return read

    def indptr_of(self, segments: np.ndarray) -> np.ndarray:
        """indptr[start : stop + 1] of every segment (shard, start, stop), one after another (int64): slices of the
        cached chunks, looked up under one lock for the whole buffer."""
        if not len(segments):
            return np.empty(0, np.int64)
        readers = {sh: self.array(sh, "indptr") for sh in dict.fromkeys(segments[:, 0].tolist())}
        per = {sh: r.layout.chunk_elems for sh, r in readers.items() if r is not None}  # None: zarr-python's path
        parts: list[np.ndarray | None] = []
        with self._lock:
            cache = self._indptr
            for sh, a, b in segments.tolist():
                n = per.get(sh)
                c = a // n if n else -1
                got = cache.get((sh, c)) if cache is not None and n and c == b // n else None
                if got is not None:
                    cache.move_to_end((sh, c))
                    got = got[a - c * n : b - c * n + 1]
                parts.append(got)
        for i, part in enumerate(parts):  # the rest decoded (and cached) outside the lock
            if part is None:
                parts[i] = self.indptr_range(*(int(v) for v in segments[i]))
        return np.concatenate(parts)

    def decode_into(self, read: PoolRead, batch: ChunkBatch, pool_i: np.ndarray, pool_d: np.ndarray, at: int) -> None:
        """Adds `read`'s runs to `batch`, decoding into pool_i/pool_d from element `at` on (when the batch runs)."""
        add_pool_runs(batch, read, self.array, pool_i, pool_d, at)
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
            reader = self.array(int(shard), "indptr")
            if reader is not None:
                per = reader.layout.chunk_elems
                for c in range(int(start) // per, int(stop) // per + 1):
                    if self._indptr is None or (int(shard), c) not in self._indptr:
                        jobs.append((reader, (c, c)))
        self._prefetch(jobs)

    def _read_pool_zarr(self, segments: np.ndarray, ip: np.ndarray) -> CSRRows:
        """The reference path through zarr-python (checked reads): one read per segment and array, concatenated,
        each segment's cells after the previous segment's non-zeros."""
        row_start, row_len, _, _, _ = _plan(segments, ip, 0)
        n = segments[:, 2] - segments[:, 1]
        first = np.cumsum(n + 1) - (n + 1)  # each segment's indptr[start] in ip
        parts_i, parts_d = [], []
        for shard, lo, hi in zip(segments[:, 0].tolist(), ip[first].tolist(), ip[first + n].tolist()):
            parts_i.append(self.store.read_array(shard, "indices", lo, hi))
            parts_d.append(self.store.read_array(shard, "data", lo, hi))
        dt_i = np.dtype(self.store.manifest.index_dtype)
        dt_d = np.dtype(self.store.manifest.count_dtype)
        return CSRRows(
            np.concatenate(parts_i) if parts_i else np.empty(0, dt_i),
            np.concatenate(parts_d) if parts_d else np.empty(0, dt_d),
            row_start,
            row_len,
        )

    def read(self, segments: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Cells of `segments` concatenated as plain CSR arrays: (indptr int64, indices, data)."""
        pool = self.read_pool(segments)
        rows = np.arange(pool.n_cells, dtype=np.int64)
        return gather_rows_csr(pool, rows, data_dtype=pool.data.dtype, index_dtype=pool.indices.dtype)


def plan_pool(
    segments: np.ndarray,
    ip: np.ndarray,
    array: Callable[[int, str], ArrayReader | None],
    cast: tuple[np.dtype, np.dtype],
) -> PoolRead | None:
    """The chunk runs of `segments` (shard, start, stop; `ip`: each one's indptr[start : stop + 1], one after
    another) and where their cells land in a pool, for shards whose X/indices and X/data `array(shard, name)` reads
    directly, all in chunks of one size and one dtype per array; None where any does not (zarr-python's path). `cast`:
    the dtypes the store's manifest gives indices and data."""
    readers = [(array(sh, "indices"), array(sh, "data")) for sh in dict.fromkeys(segments[:, 0].tolist())]
    if not readers or any(ri is None or rd is None for ri, rd in readers):
        return None

    def layout(ri: ArrayReader, rd: ArrayReader) -> tuple:
        return ri.layout.chunk_elems, rd.layout.chunk_elems, ri.layout.dtype, rd.layout.dtype

    chunk, _, dt_i, dt_d = want = layout(*readers[0])
    if want[1] != chunk or any(layout(ri, rd) != want for ri, rd in readers):
        return None
    row_start, row_len, runs, bases, used = _plan(segments, ip, chunk)
    return PoolRead(runs, bases, row_start, row_len, used, (dt_i, dt_d), cast)


def add_pool_runs(
    batch: ChunkBatch,
    read: PoolRead,
    array: Callable[[int, str], ArrayReader | None],
    pool_i: np.ndarray,
    pool_d: np.ndarray,
    at: int,
) -> None:
    """`read`'s runs into `batch` (of the shards `array(shard, name)` reads), to decode into pool_i/pool_d from
    element `at` on: one `add_runs` per array name for every shard's runs."""
    shards, owner = np.unique(read.runs[:, 0], return_inverse=True)
    to = at + read.bases[:-1]
    for name, pool in (("indices", pool_i), ("data", pool_d)):
        batch.add_runs([array(sh, name) for sh in shards.tolist()], owner, read.runs[:, 1], read.runs[:, 2], pool, to)


def _plan(segments: np.ndarray, ip: np.ndarray, chunk: int):
    """`_plan_pool` with its arrays: (row_start, row_len, runs, bases, used)."""
    n_cells = int((segments[:, 2] - segments[:, 1]).sum())
    row_start, row_len = np.empty(n_cells, np.int64), np.empty(n_cells, np.int64)
    runs, bases = np.empty((len(segments), 3), np.int64), np.zeros(len(segments) + 1, np.int64)
    n_runs, used = _plan_pool(segments, ip, chunk, row_start, row_len, runs, bases)
    return row_start, row_len, runs[:n_runs], bases[: n_runs + 1], int(used)


@numba.njit(nogil=True, cache=True)
def _plan_pool(segments, ip, chunk, row_start, row_len, runs, bases):
    """`StoreBlocks.plan_read` in one call: per cell its non-zeros' start in the pool and their count, from `ip`
    (each segment's indptr[start : stop + 1], one after another). chunk > 0: the chunks each segment needs, merged
    per shard into runs where they overlap or touch (each chunk decoded once), laid out run after run (bases[r]: run
    r's first element); chunk 0: the segments' non-zeros one after another. Returns (runs, non-zeros of the cells)."""
    n_seg = segments.shape[0]
    lo, hi, first = np.empty(n_seg, np.int64), np.empty(n_seg, np.int64), np.empty(n_seg, np.int64)
    o, c, used = 0, 0, 0
    for i in range(n_seg):
        m = segments[i, 2] - segments[i, 1]
        lo[i], hi[i], first[i] = ip[o], ip[o + m], c
        for j in range(m):
            row_start[c + j] = ip[o + j]
            row_len[c + j] = ip[o + j + 1] - ip[o + j]
        o += m + 1
        c += m
        used += hi[i] - lo[i]
    shift = np.zeros(n_seg, np.int64)
    n_runs = 0
    if chunk == 0:
        pos = 0
        for i in range(n_seg):
            shift[i] = pos - lo[i]
            pos += hi[i] - lo[i]
    else:
        top = 0
        for i in range(n_seg):
            top = max(top, hi[i] // chunk + 1)
        order = np.argsort(segments[:, 0] * top + lo // chunk, kind="mergesort")  # by shard, then first chunk
        run_of = np.zeros(n_seg, np.int64)
        for i in order:
            if hi[i] <= lo[i]:
                continue
            shard, c0, c1 = segments[i, 0], lo[i] // chunk, (hi[i] - 1) // chunk
            if n_runs > 0 and runs[n_runs - 1, 0] == shard and c0 <= runs[n_runs - 1, 2] + 1:
                runs[n_runs - 1, 2] = max(runs[n_runs - 1, 2], c1)
            else:
                runs[n_runs, 0], runs[n_runs, 1], runs[n_runs, 2] = shard, c0, c1
                n_runs += 1
            run_of[i] = n_runs - 1
        for r in range(n_runs):
            bases[r + 1] = bases[r] + (runs[r, 2] - runs[r, 1] + 1) * chunk
        if n_runs > 0:
            for i in range(n_seg):  # a segment of empty cells keeps run 0's shift: its cells read nothing
                shift[i] = bases[run_of[i]] - runs[run_of[i], 1] * chunk
    for i in range(n_seg):
        for j in range(first[i], first[i] + segments[i, 2] - segments[i, 1]):
            row_start[j] += shift[i]
    return n_runs, used
