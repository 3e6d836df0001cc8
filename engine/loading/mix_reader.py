"""A mix's buffers read as one store's (`engine.loading.mixing` plans them): `MixBlocks` decodes a buffer's cells of
every source into one pool in one call (sources of the run's genes and dtypes planned as one store's shards; one of
another vocabulary or dtype remapped and copied in), and `MixedReader` gathers each shuffled batch straight out of
it, as `engine.loading.readers.BufferReader` does out of one store's.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import numba
import numpy as np

from engine.loading.chunks import LRU, PoolRead, ScratchArrays, StoreBlocks, add_pool_runs, plan_pool
from engine.loading.mixing import Mix, OpenMix, remap_genes
from engine.loading.readers import BatchCutter, build_pipeline, collect, single_threaded_kernels
from engine.loading.sampler import BufferPlan
from engine.store.chunkbatch import ChunkBatch
from engine.store.chunkfile import ArrayReader
from engine.store.csr import CSRRows, gather_rows_csr
from engine.store.format import CSRBlock


class MixBlocks:
    """A mix's stores read as one store's `StoreBlocks` (what `engine.loading.readers.collect` reads): segments name
    virtual shards (`OpenMix.shard_base`), a cell's global index is its index within its source, and obs codes come
    in the run's categories.

    `read_pool` decodes every source of a buffer into one pool, in one decoding call (`ChunkBatch`), so a batch is
    gathered out of decoded chunks in one pass, as for one store. Sources of the run's genes, one dtype pair and one
    chunk size are planned as one store's shards too (`_read_joined`: one plan, cells in order as decoded). Other
    sources are planned one by one; one of another vocabulary or count dtype is decoded on its own, and its cells
    (remapped, cast) copied in behind the others."""

    def __init__(self, mix: OpenMix, code_maps: list[dict[str, np.ndarray | None]], direct_io: bool = True):
        self.mix, self.code_maps = mix, code_maps
        self.parts = [StoreBlocks(st, direct=direct_io) for st in mix.stores]
        self.cell_offsets = np.concatenate([st.cell_offsets[:-1] for st in mix.stores])  # within each source
        self.scratch = ScratchArrays()  # the buffers' pools
        self._obs = LRU(64)  # (virtual shard, key) -> codes in the run's categories (only where a source's differ)
        self._lock = threading.Lock()
        # sources read as one store (`_read_joined`): the run's genes, on this machine's disk, read directly, and
        # the manifest dtypes and chunk size of the first such source (a buffer with a source of another chunk size
        # is planned source by source from the start, not planned whole and then again)
        formats = [
            (np.dtype(st.manifest.index_dtype), np.dtype(st.manifest.count_dtype), st.manifest.chunk_elements)
            for st in mix.stores
        ]
        local = [m is None and not st.remote and p.direct for m, st, p in zip(mix.gene_maps, mix.stores, self.parts)]
        first = next((f for f, ok in zip(formats, local) if ok), None)
        self._cast = first[:2] if first is not None else None
        self._joinable = np.array([ok and f == first for f, ok in zip(formats, local)], dtype=bool)
        self._joined_stats = {"decoded": 0, "used": 0}

    @property
    def stats(self) -> dict[str, int]:
        return {k: sum(p.stats[k] for p in self.parts) + self._joined_stats[k] for k in ("decoded", "used")}

    def close(self) -> None:
        for p in self.parts:
            p.close()

    def obs_codes(self, shard: int, key: str) -> np.ndarray:
        s = int(self.mix.source_of(shard))
        codes, m = self.parts[s].obs_codes(shard - int(self.mix.shard_base[s]), key), self.code_maps[s][key]
        if m is None:
            return codes
        with self._lock:
            return self._obs.get_or((shard, key), lambda: m[codes])

    def array(self, shard: int, name: str) -> ArrayReader | None:
        """The direct reader of X/`name` of a virtual shard (`StoreBlocks.array` of its source)."""
        s = int(self.mix.source_of(shard))
        return self.parts[s].array(shard - int(self.mix.shard_base[s]), name)

    def indptr_of(self, segments: np.ndarray, src: np.ndarray) -> np.ndarray:
        """indptr[start : stop + 1] of every segment (virtual shard, start, stop; `src`: each one's source), one
        after another, from the sources' cached chunks."""
        pieces: list[np.ndarray] = [np.empty(0, np.int64)] * len(segments)
        for s in np.unique(src).tolist():
            at = np.flatnonzero(src == s)
            own = segments[at].copy()
            own[:, 0] -= self.mix.shard_base[s]
            ip, n = self.parts[s].indptr_of(own), own[:, 2] - own[:, 1] + 1
            ends = np.cumsum(n)
            for i, a, b in zip(at.tolist(), (ends - n).tolist(), ends.tolist()):
                pieces[i] = ip[a:b]
        return np.concatenate(pieces)

    def read_pool(self, segments: np.ndarray) -> CSRRows:
        """Cells of `segments` (virtual shard, start, stop) in order, in the run's genes, as one `CSRRows`."""
        base = self.mix.shard_base
        src = self.mix.source_of(segments[:, 0])
        if len(segments) and self._joinable[src].all():
            pool = self._read_joined(segments, src)
            if pool is not None:
                return pool
        reads = []  # per source: its segments' positions, its planned read
        for s in np.unique(src):
            own = segments[src == s].copy()
            own[:, 0] -= base[s]
            reads.append((int(s), np.flatnonzero(src == s), self.parts[s].plan_read(own)))
        common = self._pool_dtypes([(s, read) for s, _, read in reads])
        in_place = [self._in_place(s, read, common) for s, _, read in reads]
        copied = {}  # source -> its cells, compacted into CSR arrays of the run's genes and the pool's dtypes
        for (s, _, read), keep in zip(reads, in_place):
            if not keep:
                pool = read if isinstance(read, CSRRows) else self.parts[s].decode(read)
                rows = np.arange(pool.n_cells, dtype=np.int64)
                block = CSRBlock(*gather_rows_csr(pool, rows, np.float32, np.int32), self.mix.stores[s].n_genes)
                if self.mix.gene_maps[s] is not None:
                    block = remap_genes(block, self.mix.gene_maps[s], self.mix.n_genes)
                copied[s] = block
        size = sum(read.size for (_, _, read), keep in zip(reads, in_place) if keep)
        size += sum(len(block.data) for block in copied.values())
        pool_i, pool_d = self.scratch.get("indices", size, common[0]), self.scratch.get("data", size, common[1])
        batch, pos, row_start, row_len, order = ChunkBatch(), 0, [], [], []
        for (s, at, read), keep in zip(reads, in_place):
            if keep:
                self.parts[s].decode_into(read, batch, pool_i, pool_d, pos)
                row_start.append(read.row_start + pos)
                row_len.append(read.row_len)
                pos += read.size
            else:
                block, nnz = copied[s], len(copied[s].data)
                pool_i[pos : pos + nnz], pool_d[pos : pos + nnz] = block.indices, block.data
                row_start.append(block.indptr[:-1] + pos)
                row_len.append(np.diff(block.indptr))
                pos += nnz
            order.append(at)
        batch.run()
        # the cells so far lie source after source; put them back in the segments' order
        n = segments[:, 2] - segments[:, 1]
        by_source = np.concatenate(order)
        first = np.empty(len(n), dtype=np.int64)  # each segment's first cell, source after source
        first[by_source] = np.cumsum(n[by_source]) - n[by_source]
        start, length = np.empty(int(n.sum()), dtype=np.int64), np.empty(int(n.sum()), dtype=np.int64)
        _in_segment_order(np.concatenate(row_start), np.concatenate(row_len), first, n, start, length)
        return CSRRows(pool_i, pool_d, start, length)

    def _read_joined(self, segments: np.ndarray, src: np.ndarray) -> CSRRows | None:
        """Sources of one vocabulary, dtypes and chunk size, read as one store's shards: one plan, one decoding call,
        the cells in the segments' order as they are decoded (3 sources cost a buffer 6 array additions, 3 plans and
        a reordering of every cell otherwise). None where a shard's layout needs the general path (a small shard of a
        store written before every shard had the store's chunk size)."""
        segments = np.ascontiguousarray(segments[:, :3], dtype=np.int64)
        read = plan_pool(segments, self.indptr_of(segments, src), self.array, self._cast)
        if read is None or read.dtypes != read.cast:
            return None
        pool_i = self.scratch.get("indices", read.size, read.dtypes[0])
        pool_d = self.scratch.get("data", read.size, read.dtypes[1])
        batch = ChunkBatch()
        add_pool_runs(batch, read, self.array, pool_i, pool_d, 0)
        batch.run()
        with self._lock:
            self._joined_stats["decoded"] += read.size
            self._joined_stats["used"] += read.used
        return read.rows(pool_i, pool_d)

    def _pool_dtypes(self, reads: list[tuple[int, PoolRead | CSRRows]]) -> tuple[np.dtype, np.dtype]:
        """The buffer's pool dtypes: those of the first source that can decode into it in place, when every other
        source's counts cast to them safely (its gene indices fit: the run's genes are that source's); else the
        batches' own, int32 and float32."""
        counts = [np.dtype(self.mix.stores[s].manifest.count_dtype) for s, _ in reads]
        for s, read in reads:
            if self._in_place(s, read, None) and all(np.can_cast(c, read.dtypes[1]) for c in counts):
                return read.dtypes
        return np.dtype(np.int32), np.dtype(np.float32)

    def _in_place(self, s: int, read: PoolRead | CSRRows, dtypes: tuple[np.dtype, np.dtype] | None) -> bool:
        """Whether source s's read decodes straight into the buffer's pool (of `dtypes`, when given)."""
        return (
            isinstance(read, PoolRead)
            and self.mix.gene_maps[s] is None
            and read.dtypes == read.cast
            and (dtypes is None or read.dtypes == dtypes)
        )


class MixedReader:
    """Reads a mix's buffers as `BufferReader` reads one store's: its cells collected through `MixBlocks` (the run's
    genes and obs categories), then shuffled and cut into batches, each cell with its "source"."""

    def __init__(
        self,
        mix: OpenMix | Mix,
        transforms: Any,
        output: str,
        obs_keys: Sequence[str],
        direct_io: bool = True,
        extra: Sequence[str] = (),  # obs keys read beside obs_keys (balance_by's)
    ):
        mix = mix.open() if isinstance(mix, Mix) else mix  # a reader actor opens the mix itself
        self.mix, self.obs_keys = mix, tuple(obs_keys)
        keys = tuple(dict.fromkeys(self.obs_keys + tuple(extra)))
        for k in keys:
            mix.categories(k)  # every source has the column
        code_maps = [{k: mix.code_map(s, k) for k in keys} for s in range(len(mix.stores))]
        self.blocks = MixBlocks(mix, code_maps, direct_io)
        pipeline = build_pipeline(transforms, mix.vocabulary_store) if transforms is not None else None
        self.cutter = BatchCutter(output, pipeline, mix.n_genes, ("index", "source", *self.obs_keys))

    def close(self) -> None:
        self.blocks.close()

    def read(self, plan: BufferPlan) -> list[dict[str, Any]]:
        """The plan's batches, in order (each with "source": the cell's position in the mix's sources)."""
        single_threaded_kernels()
        pool, cols = collect(plan, self.blocks, self.obs_keys)
        cols["source"] = np.repeat(self.mix.source_of(plan.segments[:, 0]), plan.segments[:, 4])
        return self.cutter.cut(plan, pool, cols)


@numba.njit(nogil=True, cache=True)
def _in_segment_order(start, length, first, n, out_start, out_length):
    """Cells laid out source after source (segment i's from first[i]) into the segments' order, in one call: a
    handful of numpy calls would each give up the GIL, and the other reader thread takes it."""
    o = 0
    for i in range(n.shape[0]):
        a = first[i]
        for k in range(n[i]):
            out_start[o + k] = start[a + k]
            out_length[o + k] = length[a + k]
        o += n[i]
