"""Direct reads of a store's X/data and X/indices: cell ranges of many shards with one decode per chunk.

zarr-python pays a fixed cost per request (async machinery, selection objects) that dominates when a loader
reads many small random blocks. The store's arrays are plain zarr v3 with a fixed, simple layout (1-D,
`sharding_indexed` with the index at the end, inner codecs `bytes` + blosc or zstd), so this module reads
them directly: `pread` of the shard file's index once, then one `pread` per run of neighbouring chunks and
one decompress per chunk (blosc and zstd release the GIL, so reader threads overlap). Any other layout, or
a remote store, falls back to zarr-python, which stays the reference (tests compare the two).

It also holds the numba kernels that gather shuffled rows of a buffer into batches (CSR or dense).
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numba
import numpy as np

from engine.errors import StoreError
from engine.store import Store

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


def _decompress(codec: str, raw: bytes) -> bytes:
    if codec == "blosc":
        from numcodecs import blosc

        return blosc.decompress(raw)
    if codec == "zstd":
        from numcodecs import zstd

        return zstd.decompress(raw)
    return raw


class ArrayReader:
    """Element ranges of one 1-D sharded zarr v3 array on a local filesystem."""

    def __init__(self, path: Path, layout: _Layout, max_open_files: int = 64):
        self.path = path
        self.layout = layout
        self._fds: _LRU = _LRU(max_open_files)
        self._index: _LRU = _LRU(1024)
        self._lock = threading.Lock()  # the LRUs are shared by reader threads

    @classmethod
    def open(cls, path: Path) -> ArrayReader | None:
        layout = _parse_layout(path)
        return None if layout is None else cls(path, layout)

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def _fd_and_index(self, file_id: int) -> tuple[int, np.ndarray]:
        with self._lock:
            file = self.path / f"{self.layout.key_prefix}{file_id}"
            if not file.exists():  # zarr writes no file when every chunk in it equals the fill value
                return -1, np.full((self.layout.file_elems // self.layout.chunk_elems, 2), _MISSING, dtype=np.uint64)
            fd = self._fds.get_or(file_id, lambda: os.open(file, os.O_RDONLY))
            return fd, self._index.get_or(file_id, lambda: self._read_index(fd, file_id))

    def _read_index(self, fd: int, file_id: int) -> np.ndarray:
        n_inner = self.layout.file_elems // self.layout.chunk_elems
        size = os.fstat(fd).st_size
        nbytes = n_inner * 16 + 4
        if size < nbytes:
            raise StoreError(f"{self.path}/c/{file_id}: {size} bytes, shorter than its shard index ({nbytes} bytes): truncated")
        raw = os.pread(fd, nbytes, size - nbytes)
        import google_crc32c

        expected = int.from_bytes(raw[-4:], "little")
        if google_crc32c.value(raw[:-4]) != expected:
            raise StoreError(f"{self.path}/c/{file_id}: shard index checksum mismatch (corrupted or truncated file)")
        index = np.frombuffer(raw[:-4], dtype="<u8").reshape(n_inner, 2)
        ok = index[:, 0] == _MISSING
        ends = index[~ok, 0] + index[~ok, 1]
        if ends.size and int(ends.max()) > size - nbytes:
            raise StoreError(f"{self.path}/c/{file_id}: shard index points past the end of the file (truncated)")
        return index

    def read_many(self, ranges: Sequence[tuple[int, int]]) -> list[np.ndarray]:
        """Elements [lo, hi) for each range; each needed chunk is read and decoded once for all ranges."""
        lay = self.layout
        chunk = lay.chunk_elems
        per_file = lay.file_elems // chunk
        needed = sorted({c for lo, hi in ranges if hi > lo for c in range(lo // chunk, (hi - 1) // chunk + 1)})
        decoded: dict[int, np.ndarray] = {}
        i = 0
        while i < len(needed):
            file_id = needed[i] // per_file
            fd, index = self._fd_and_index(file_id)
            # a run of chunks in this file that are neighbours on disk: one pread
            j = i
            while j + 1 < len(needed) and needed[j + 1] // per_file == file_id:
                a, b = index[needed[j] % per_file], index[needed[j + 1] % per_file]
                if a[0] == _MISSING or b[0] == _MISSING or b[0] != a[0] + a[1]:
                    break
                j += 1
            first = index[needed[i] % per_file]
            if first[0] == _MISSING:  # an inner chunk never written: all fill value
                decoded[needed[i]] = np.full(chunk, lay.fill_value, dtype=lay.dtype)
                i += 1
                continue
            last = index[needed[j] % per_file]
            start, stop = int(first[0]), int(last[0] + last[1])
            raw = os.pread(fd, stop - start, start)
            if len(raw) != stop - start:
                raise StoreError(f"{self.path}/c/{file_id}: short read at byte {start} (truncated file)")
            for c in needed[i : j + 1]:
                off, n = (int(v) for v in index[c % per_file])
                try:
                    buf = _decompress(lay.codec, raw[off - start : off - start + n])
                except Exception as e:  # numcodecs raises RuntimeError/ValueError on corrupt input
                    raise StoreError(f"{self.path}/c/{file_id}: chunk {c % per_file} does not decode ({e})") from e
                arr = np.frombuffer(buf, dtype=lay.dtype)
                if arr.size != chunk:
                    raise StoreError(f"{self.path}/c/{file_id}: chunk {c % per_file} has {arr.size} elements, expected {chunk}")
                decoded[c] = arr
            i = j + 1
        out = []
        for lo, hi in ranges:
            if hi <= lo:
                out.append(np.empty(0, dtype=lay.dtype))
                continue
            c0, c1 = lo // chunk, (hi - 1) // chunk
            if c0 == c1:
                out.append(decoded[c0][lo - c0 * chunk : hi - c0 * chunk])
            else:
                res = np.empty(hi - lo, dtype=lay.dtype)
                pos = 0
                for c in range(c0, c1 + 1):
                    a, b = max(lo, c * chunk) - c * chunk, min(hi, (c + 1) * chunk) - c * chunk
                    res[pos : pos + b - a] = decoded[c][a:b]
                    pos += b - a
                out.append(res)
        return out


class StoreBlocks:
    """Reads cell ranges of many shards of a store as one concatenated CSR, plus obs codes.

    Shard indptrs and obs codes are cached per shard (LRU), so their memory stays bounded by the number of
    shards touched recently, not by the store size.
    """

    def __init__(self, store: Store, direct: bool = True, cache_shards: int = 256):
        self.store = store
        self.direct = direct and _local(store.path)
        self._arrays: dict[tuple[int, str], ArrayReader | None] = {}
        self._indptr: _LRU = _LRU(cache_shards)
        self._obs: _LRU = _LRU(cache_shards)
        self._lock = threading.Lock()

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

    def obs_codes(self, shard: int, key: str) -> np.ndarray:
        """Integer codes of a categorical obs column (or the values of a numeric one) for a whole shard."""
        def load():
            import anndata as ad

            group = self.store.root[f"{self.store.manifest.shards[shard].path}/obs"]
            if key not in group:
                raise StoreError(f"{self.store.path}: obs has no column {key!r}; it has {list(self.store.manifest.obs_schema)}")
            elem = group[key]
            if elem.attrs.get("encoding-type") == "categorical":
                return np.asarray(elem["codes"][:]).astype(np.int64)
            return np.asarray(ad.io.read_elem(elem))

        with self._lock:
            return self._obs.get_or((shard, key), load)

    def read(self, segments: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Cells of `segments` (rows of shard, start, stop), concatenated: (indptr int64, indices, data)."""
        lengths, nnz_ranges = [], []
        for shard, start, stop in segments:
            ip = self.indptr(int(shard))
            lengths.append(np.diff(ip[start : stop + 1]))
            nnz_ranges.append((int(ip[start]), int(ip[stop])))
        indptr = np.zeros(sum(len(x) for x in lengths) + 1, dtype=np.int64)
        if len(lengths):
            np.cumsum(np.concatenate(lengths), out=indptr[1:])
        by_shard: dict[int, list[int]] = {}
        for i, (shard, _, _) in enumerate(segments):
            by_shard.setdefault(int(shard), []).append(i)
        parts = {"indices": [None] * len(segments), "data": [None] * len(segments)}
        for shard, rows in by_shard.items():
            ranges = [nnz_ranges[i] for i in rows]
            for name in ("indices", "data"):
                reader = self._array(shard, name)
                if reader is not None:
                    arrays = reader.read_many(ranges)
                else:  # zarr-python: the reference path
                    arr = self.store.shard_x(shard)[name]
                    arrays = [arr[lo:hi] for lo, hi in ranges]
                for i, a in zip(rows, arrays):
                    parts[name][i] = a
        dt_i = np.dtype(self.store.manifest.index_dtype)
        dt_d = np.dtype(self.store.manifest.count_dtype)
        indices = np.concatenate(parts["indices"]) if segments.shape[0] else np.empty(0, dt_i)
        data = np.concatenate(parts["data"]) if segments.shape[0] else np.empty(0, dt_d)
        return indptr, indices, data


def _local(path: Path) -> bool:
    return Path(path).exists()


# ------------------------------------------------------------------------------------------------ kernels


@numba.njit(nogil=True, cache=True)
def _gather_counts(indptr, rows, out_indptr):
    out_indptr[0] = 0
    for i in range(rows.shape[0]):
        r = rows[i]
        out_indptr[i + 1] = out_indptr[i] + indptr[r + 1] - indptr[r]


@numba.njit(nogil=True, cache=True)
def _gather_fill(indptr, indices, data, rows, out_indptr, out_indices, out_data):
    for i in range(rows.shape[0]):
        r = rows[i]
        a = indptr[r]
        o = out_indptr[i]
        for k in range(indptr[r + 1] - a):
            out_indices[o + k] = indices[a + k]
            out_data[o + k] = data[a + k]


@numba.njit(nogil=True, cache=True)
def _gather_dense(indptr, indices, data, rows, out):
    for i in range(rows.shape[0]):
        r = rows[i]
        for k in range(indptr[r], indptr[r + 1]):
            out[i, indices[k]] = data[k]


def gather_csr(
    indptr: np.ndarray, indices: np.ndarray, data: np.ndarray, rows: np.ndarray, data_dtype=np.float32, index_dtype=np.int32
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows `rows` of a CSR matrix as a new CSR (indptr int64), casting data and indices on the way."""
    rows = np.ascontiguousarray(rows, dtype=np.int64)
    out_indptr = np.empty(len(rows) + 1, dtype=np.int64)
    _gather_counts(indptr, rows, out_indptr)
    nnz = int(out_indptr[-1])
    out_indices = np.empty(nnz, dtype=index_dtype)
    out_data = np.empty(nnz, dtype=data_dtype)
    _gather_fill(indptr, indices, data, rows, out_indptr, out_indices, out_data)
    return out_indptr, out_indices, out_data


def gather_dense(indptr: np.ndarray, indices: np.ndarray, data: np.ndarray, rows: np.ndarray, n_genes: int) -> np.ndarray:
    """Rows `rows` of a CSR matrix as a dense float32 (len(rows), n_genes) array."""
    out = np.zeros((len(rows), n_genes), dtype=np.float32)
    _gather_dense(indptr, indices, data, np.ascontiguousarray(rows, dtype=np.int64), out)
    return out
