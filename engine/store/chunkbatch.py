"""Chunk runs of one or more arrays, each to decode into its place in a pool: a loader buffer's decoding in one call.

Every blosc chunk of a batch is checked and decoded in one `chunk_kernel` call, with the GIL released throughout, so
reader threads overlap instead of taking turns once per run. A buffer's runs are added per array name for all its
shards at once (`add_runs`): a few array operations and a dict lookup per file, no Python per shard, run or chunk
(with 16 shards a buffer, Python per shard was ~7% of a reader's time). Other codecs, and v1 files never written,
decode chunk by chunk in `add_runs`. A chunk the kernel stops at (missing, failing a check) is decoded again by its
reader's `decode`, which raises the error naming it (or, in a v1 store, fills a chunk never written), and the kernel
goes on after it. Bytes of an array in a bucket must be fetched first (`ArrayReader.prefetch`); a chunk whose bytes
are not is refetched by `decode`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from engine.store import chunkfile

if TYPE_CHECKING:
    from engine.store.chunkfile import ArrayReader, MappedFile


class _Part(NamedTuple):
    """Chunks of an `add_runs` call, ready for the kernel, and what names each one when it fails."""

    readers: Sequence[ArrayReader]
    owner: np.ndarray  # each chunk's reader (a position in readers)
    chunks: np.ndarray  # each chunk's number in its array
    pool: np.ndarray
    at: np.ndarray  # each chunk's first element in the pool
    files: list[MappedFile]  # kept alive while the batch holds addresses into their maps
    src: np.ndarray  # each chunk's address and byte count in its map (`MappedFile.src`, `.size`)
    size: np.ndarray
    tail: np.ndarray  # 4 where a chunk ends in its crc32c
    dest: np.ndarray  # each chunk's address in the pool


class ChunkBatch:
    """Chunk runs of any arrays, decoded by `run` in one kernel call (see the module's docstring)."""

    def __init__(self) -> None:
        self._parts: list[_Part] = []

    def __len__(self) -> int:
        """Chunks waiting for `run`'s kernel."""
        return sum(len(p.chunks) for p in self._parts)

    def add(self, reader: ArrayReader, c0, c1, pool: np.ndarray, at) -> None:
        """Chunks [c0, c1] of `reader` into pool[at : at + (c1 - c0 + 1) * chunk_elems] (a contiguous array of the
        reader's dtype); c0, c1 and at are ints, or int64 arrays of them (many runs)."""
        c0, c1, at = (np.atleast_1d(np.asarray(v, dtype=np.int64)) for v in (c0, c1, at))
        self.add_runs([reader], np.zeros(len(c0), dtype=np.int64), c0, c1, pool, at)

    def add_runs(
        self, readers: Sequence[ArrayReader], owner: np.ndarray, c0: np.ndarray, c1: np.ndarray, pool: np.ndarray, at
    ) -> None:
        """Run r, chunks [c0[r], c1[r]] of readers[owner[r]], into pool[at[r] :] (int64 arrays; the readers: arrays
        of one chunk size and dtype, such as one array of each shard of a buffer)."""
        if not len(c0):
            return
        lay, chunk = readers[0].layout, readers[0].layout.chunk_elems
        if pool.dtype.itemsize != lay.dtype.itemsize or not pool.flags.c_contiguous:
            raise ValueError(f"pool: a contiguous array of {lay.dtype.itemsize}-byte elements, got {pool.dtype}")
        for r in readers:  # one pool, one place per chunk: a chunk of another size or element would land wrong
            if r.layout.chunk_elems != chunk or r.layout.dtype.itemsize != lay.dtype.itemsize:
                raise ValueError(
                    f"{r.path}: chunks of {r.layout.chunk_elems} {r.layout.dtype} elements, where {readers[0].path} "
                    f"has {chunk} {lay.dtype}: one call takes arrays of one chunk size and element size"
                )
        n = c1 - c0 + 1
        if at.min() < 0 or (at + n * chunk).max() > len(pool):
            r = int(np.flatnonzero((at < 0) | (at + n * chunk > len(pool)))[0])
            raise ValueError(f"pool of {len(pool)} elements: no room for chunks {c0[r]}-{c1[r]} at {at[r]}")
        # every run's chunks, one after another, each one's place in the pool, its reader and its file
        chunks = np.repeat(c0 - np.cumsum(n) + n, n) + np.arange(int(n.sum()), dtype=np.int64)
        pos = np.repeat(at - c0 * chunk, n) + chunks * chunk
        who = np.repeat(owner, n)
        files = chunks // np.array([r.per_file for r in readers], dtype=np.int64)[who]
        span = int(files.max()) + 1
        keys, group = np.unique(who * span + files, return_inverse=True)
        # each (reader, file) once: its map, and where its chunk addresses start in their concatenation
        from engine.store import chunk_kernel  # here: importing numba costs every CLI command ~0.5 s otherwise

        kernel = chunk_kernel.available()
        maps, first, direct = [], np.zeros(len(keys), dtype=np.int64), np.zeros(len(keys), dtype=bool)
        n_addresses = 0
        for g, (r, file_id) in enumerate(zip((keys // span).tolist(), (keys % span).tolist())):
            reader = readers[r]
            f = reader.mapped_file(file_id)
            if kernel and reader.layout.codec == "blosc" and f.buf is not None:
                maps.append(f)
                first[g], direct[g] = n_addresses - file_id * reader.per_file, True
                n_addresses += len(f.src)
        slow = ~direct[group]
        for r, c, p in zip(who[slow].tolist(), chunks[slow].tolist(), pos[slow].tolist()):  # other codecs, v1 holes
            readers[r].decode(c, pool[p : p + chunk])
        if slow.any():
            chunks, pos, who, group = chunks[~slow], pos[~slow], who[~slow], group[~slow]
        if not maps:
            return
        k = first[group] + chunks
        src = np.concatenate([f.src for f in maps])[k]
        size = np.concatenate([f.size for f in maps])[k]
        tail = np.array([4 if r.layout.checksum else 0 for r in readers], dtype=np.int64)[who]
        dest = (pool.ctypes.data + pos * pool.itemsize).astype(np.uint64)
        self._parts.append(_Part(readers, who, chunks, pool, pos, maps, src, size, tail, dest))

    def run(self) -> None:
        """Decode every chunk added (raising the error of the first bad one)."""
        if not self._parts:
            return
        from engine.store import chunk_kernel

        parts = self._parts
        counts = np.array([len(p.chunks) for p in parts], dtype=np.int64)
        firsts = np.cumsum(counts) - counts
        chunk_bytes = np.repeat([p.readers[0].layout.chunk_elems * p.pool.itemsize for p in parts], counts)
        src, size, tail, dest = (
            np.concatenate([getattr(p, a) for p in parts]) for a in ("src", "size", "tail", "dest")
        )
        k = 0
        while (
            k := chunk_kernel.decode_blosc_at(src, size, tail, dest, chunk_bytes, chunkfile.VERIFY_CHECKSUMS, k)
        ) >= 0:
            i = int(np.searchsorted(firsts, k, side="right")) - 1
            p, j = parts[i], k - int(firsts[i])
            chunk = p.readers[0].layout.chunk_elems
            p.readers[int(p.owner[j])].decode(int(p.chunks[j]), p.pool[p.at[j] : p.at[j] + chunk])
            k += 1
        self._parts.clear()
