"""Direct reads of a store's X/data and X/indices: cell ranges of many shards with one decode per chunk.

zarr-python pays a fixed cost per request (async machinery, selection objects) that dominates when a loader
reads many small random blocks. The store's arrays are plain zarr v3 with a fixed, simple layout (1-D,
`sharding_indexed` with the index at the end, inner codecs `bytes` + blosc or zstd), so this module reads
them directly: each shard file is memory-mapped and its index checked (crc32c) once, then every needed chunk
is decompressed straight from the page cache into a reused per-thread buffer (blosc and zstd release the
GIL, so reader threads overlap). Any other layout, or a remote store, falls back to zarr-python, which
stays the reference (tests compare the two).
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engine.errors import StoreError
from engine.store.csr import CSRRows, gather_rows_csr
from engine.store.format import Store

log = logging.getLogger(__name__)

_MISSING = np.uint64(2**64 - 1)  # offset/nbytes of an empty (never written) inner chunk


class _LRU(OrderedDict):
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


@dataclass(frozen=True)
class _Layout:
    dtype: np.dtype
    shape: int
    file_elems: int  # elements per shard file (outer chunk)
    chunk_elems: int  # elements per inner (compressed) chunk
    codec: str  # blosc | zstd | none
    fill_value: float
    key_prefix: str  # "c/" (default encoding, "/" separator) or "c."


def _parse_layout(path: Path) -> _Layout | None:
    """The layout of a 1-D sharded zarr v3 array, or None when it is not one this reader handles."""
    try:
        meta = json.loads((path / "zarr.json").read_text())
    except (OSError, ValueError):
        return None
    try:
        if meta.get("zarr_format") != 3 or len(meta["shape"]) != 1 or meta["chunk_grid"]["name"] != "regular":
            return None
        codecs = meta["codecs"]
        if len(codecs) != 1 or codecs[0]["name"] != "sharding_indexed":
            return None
        cfg = codecs[0]["configuration"]
        if cfg.get("index_location", "end") != "end":
            return None
        index_codecs = [c["name"] for c in cfg["index_codecs"]]
        if index_codecs != ["bytes", "crc32c"]:
            return None
        inner = cfg["codecs"]
        if inner[0]["name"] != "bytes" or inner[0].get("configuration", {}).get("endian", "little") != "little":
            return None
        names = [c["name"] for c in inner[1:]]
        codec = {(): "none", ("blosc",): "blosc", ("zstd",): "zstd"}.get(tuple(names))
        if codec is None:
            return None
        enc = meta["chunk_key_encoding"]
        if enc["name"] != "default":
            return None
        sep = enc.get("configuration", {}).get("separator", "/")
        return _Layout(
            dtype=np.dtype(meta["data_type"]).newbyteorder("<"),
            shape=int(meta["shape"][0]),
            file_elems=int(meta["chunk_grid"]["configuration"]["chunk_shape"][0]),
            chunk_elems=int(cfg["chunk_shape"][0]),
            codec=codec,
            fill_value=meta.get("fill_value") or 0,
            key_prefix=f"c{sep}",
        )
    except (KeyError, IndexError, TypeError):
        return None


def decompress(codec: str, raw: bytes, dest: np.ndarray | None = None):
    """Decode one inner chunk, into `dest` when given (no intermediate copy)."""
    if codec == "blosc":
        from numcodecs import blosc

        return blosc.decompress(raw, dest)
    if codec == "zstd":
        from numcodecs import zstd

        return zstd.decompress(raw, dest)
    if dest is not None:
        dest.view(np.uint8)[:] = np.frombuffer(raw, dtype=np.uint8)
        return dest
    return raw


class ArrayReader:
    """Element ranges of one 1-D sharded zarr v3 array on a local filesystem.

    Shard files are memory-mapped (read-only), so a chunk is decompressed straight from the page cache into
    its destination: no read() copy and no intermediate buffer."""

    def __init__(self, path: Path, layout: _Layout, max_open_files: int = 64):
        self.path = path
        self.layout = layout
        self._files: _LRU = _LRU(max_open_files)  # file id -> (mmap or None, index)
        self._lock = threading.Lock()  # the LRU is shared by reader threads

    @classmethod
    def open(cls, path: Path) -> ArrayReader | None:
        layout = _parse_layout(path)
        return None if layout is None else cls(path, layout)

    def close(self) -> None:
        with self._lock:
            self._files.clear()  # maps close when the last view into them is gone

    def _file(self, file_id: int) -> tuple[Any, np.ndarray]:
        with self._lock:
            return self._files.get_or(file_id, lambda: self._open_file(file_id))

    def _open_file(self, file_id: int) -> tuple[Any, np.ndarray]:
        import mmap

        n_inner = self.layout.file_elems // self.layout.chunk_elems
        file = self.path / f"{self.layout.key_prefix}{file_id}"
        if not file.exists():  # zarr writes no file when every chunk in it equals the fill value
            return None, np.full((n_inner, 2), _MISSING, dtype=np.uint64)
        with open(file, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            nbytes = n_inner * 16 + 4
            if size < nbytes:
                raise StoreError(f"{file}: {size} bytes, shorter than its shard index ({nbytes} bytes): truncated")
            mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        raw = mm[size - nbytes :]
        import google_crc32c

        if google_crc32c.value(raw[:-4]) != int.from_bytes(raw[-4:], "little"):
            raise StoreError(f"{file}: shard index checksum mismatch (corrupted or truncated file)")
        index = np.frombuffer(raw[:-4], dtype="<u8").reshape(n_inner, 2)
        present = index[:, 0] != _MISSING
        if present.any() and int((index[present, 0] + index[present, 1]).max()) > size - nbytes:
            raise StoreError(f"{file}: shard index points past the end of the file (truncated)")
        return mm, index

    def compressed_chunks(self) -> Iterator[bytes]:
        """Every written chunk's compressed bytes, file by file (benchmarks time decoding them alone)."""
        for file_id in sorted(int(f.name) for f in (self.path / "c").iterdir()):
            mm, index = self._file(file_id)
            for off, n in index:
                if off != _MISSING:
                    yield mm[int(off) : int(off) + int(n)]

    def decode_runs(self, runs: Sequence[tuple[int, int]], pool: np.ndarray, bases: Sequence[int]) -> None:
        """Decode inner chunks [c0, c1] of each run into pool[base : base + (c1 - c0 + 1) * chunk_elems]."""
        lay = self.layout
        chunk = lay.chunk_elems
        per_file = lay.file_elems // chunk
        for (c0, c1), base in zip(runs, bases):
            for c in range(c0, c1 + 1):
                file_id, k = divmod(c, per_file)
                mm, index = self._file(file_id)
                dest = pool[base + (c - c0) * chunk : base + (c - c0 + 1) * chunk]
                off, n = int(index[k, 0]), int(index[k, 1])
                if off == int(_MISSING):  # never written: all fill value
                    dest[:] = lay.fill_value
                    continue
                try:
                    with memoryview(mm) as view:
                        decompress(lay.codec, view[off : off + n], dest)
                except Exception as e:  # numcodecs raises RuntimeError/ValueError/TypeError on corrupt input
                    raise StoreError(f"{self.path}/c/{file_id}: chunk {k} does not decode ({e})") from e


class StoreBlocks:
    """Reads cell ranges of many shards of a store as one concatenated CSR, plus obs codes.

    Shard indptrs and obs codes are cached per shard (LRU), so their memory stays bounded by the number of
    shards touched recently, not by the store size.
    """

    def __init__(self, store: Store, direct: bool = True, cache_shards: int = 64):
        self.store = store
        self.direct = direct and _local(store.path)
        self._arrays: dict[tuple[int, str], ArrayReader | None] = {}
        self._indptr: _LRU = _LRU(cache_shards)
        self._obs: _LRU = _LRU(cache_shards)
        self._lock = threading.Lock()
        self._scratch = threading.local()  # per-thread decode buffers, reused: no page faults per buffer

    def close(self) -> None:
        for r in self._arrays.values():
            if r is not None:
                r.close()

    def _array(self, shard: int, name: str) -> ArrayReader | None:
        key = (shard, name)
        with self._lock:
            if key not in self._arrays:
                path = self.store.path / self.store.manifest.shards[shard].path / "X" / name
                self._arrays[key] = ArrayReader.open(path) if self.direct else None
            return self._arrays[key]

    def indptr(self, shard: int) -> np.ndarray:
        with self._lock:
            return self._indptr.get_or(shard, lambda: self.store.shard_x(shard)["indptr"][:])

    def indptr_range(self, shard: int, start: int, stop: int) -> np.ndarray:
        """indptr[start : stop + 1] of a shard. A one-chunk indptr is read whole once and cached; a chunked one
        is read by range, so random blocks over many shards never pull whole indptrs through the cache."""
        with self._lock:
            if shard in self._indptr:
                return self._indptr.get_or(shard, None)[start : stop + 1]
        arr = self.store.shard_x(shard)["indptr"]
        if arr.chunks[0] >= arr.shape[0]:
            return self.indptr(shard)[start : stop + 1]
        return arr[start : stop + 1]

    def obs_codes(self, shard: int, key: str) -> np.ndarray:
        """Integer codes of a categorical obs column (or the values of a numeric one) for a whole shard."""
        with self._lock:
            return self._obs.get_or((shard, key), lambda: self.store.obs_codes(shard, key))

    def read_pool(self, segments: np.ndarray) -> CSRRows:
        """Cells of `segments` (rows of shard, start, stop) in order, as a `CSRRows`: each segment's chunks are
        decoded back to back, so every cell's non-zeros are contiguous in it, and nothing is copied after."""
        n_seg = segments.shape[0]
        nnz_lo, nnz_hi, starts, lens = [], [], [], []
        for shard, start, stop in segments:
            ip = self.indptr_range(int(shard), int(start), int(stop))
            nnz_lo.append(int(ip[0]))
            nnz_hi.append(int(ip[-1]))
            starts.append(ip[:-1])
            lens.append(np.diff(ip))
        dt_i = np.dtype(self.store.manifest.index_dtype)
        dt_d = np.dtype(self.store.manifest.count_dtype)
        readers = [(self._array(int(sh), "indices"), self._array(int(sh), "data")) for sh, _, _ in segments]
        if n_seg and all(ri is not None and rd is not None for ri, rd in readers):
            chunk = readers[0][0].layout.chunk_elems
            if any(ri.layout.chunk_elems != chunk or rd.layout.chunk_elems != chunk for ri, rd in readers):
                return self._read_pool_zarr(segments, nnz_lo, nnz_hi, starts, lens)
            runs = [(lo // chunk, max(lo, hi - 1) // chunk) for lo, hi in zip(nnz_lo, nnz_hi)]
            sizes = np.array([(c1 - c0 + 1) * chunk for c0, c1 in runs], dtype=np.int64)
            bases = np.zeros(n_seg + 1, dtype=np.int64)
            np.cumsum(sizes, out=bases[1:])
            pool_i = self._buffer("indices", int(bases[-1]), readers[0][0].layout.dtype)
            pool_d = self._buffer("data", int(bases[-1]), readers[0][1].layout.dtype)
            for s_i, (ri, rd) in enumerate(readers):
                ri.decode_runs([runs[s_i]], pool_i, [bases[s_i]])
                rd.decode_runs([runs[s_i]], pool_d, [bases[s_i]])
            shift = [bases[i] - runs[i][0] * chunk for i in range(n_seg)]
        else:
            return self._read_pool_zarr(segments, nnz_lo, nnz_hi, starts, lens)
        row_start = np.concatenate([st + sh for st, sh in zip(starts, shift)]).astype(np.int64)
        return CSRRows(
            pool_i.astype(dt_i, copy=False),
            pool_d.astype(dt_d, copy=False),
            row_start,
            np.concatenate(lens).astype(np.int64),
        )

    def _buffer(self, name: str, n: int, dtype: np.dtype) -> np.ndarray:
        """A reused array of at least n elements for this thread. The CSRRows built on it is only valid until
        this thread's next read_pool (BufferReader copies every batch out before that)."""
        buf = getattr(self._scratch, name, None)
        if buf is None or buf.dtype != dtype or len(buf) < n:
            buf = np.empty(max(n, int(1.25 * len(buf)) if buf is not None else n), dtype=dtype)
            setattr(self._scratch, name, buf)
        return buf[:n]

    def _read_pool_zarr(self, segments, nnz_lo, nnz_hi, starts, lens) -> CSRRows:
        """The reference path through zarr-python: one read per segment and array, concatenated."""
        parts_i, parts_d, shift, pos = [], [], [], 0
        for (shard, _, _), lo, hi in zip(segments, nnz_lo, nnz_hi):
            x = self.store.shard_x(int(shard))
            parts_i.append(x["indices"][lo:hi])
            parts_d.append(x["data"][lo:hi])
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


def _local(path: Path) -> bool:
    return Path(path).exists()
