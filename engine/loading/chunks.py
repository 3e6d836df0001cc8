"""Direct, verified reads of a store's X arrays: cell ranges of many shards with one decode per chunk.

zarr-python pays a fixed cost per request (async machinery, selection objects) that dominates when a loader
reads many small random blocks. The store's arrays are plain zarr v3 with a fixed, simple layout, so this module
reads them directly:

- X/data and X/indices: 1-D, `sharding_indexed` (index at the end, itself crc32c-checked), inner codecs
  `bytes` + blosc or zstd (+ `crc32c` in format v2). Each shard file is memory-mapped and its index checked once.
- X/indptr: 1-D, plainly chunked (one file per chunk of 65,536 cells), `bytes` + zstd (+ `crc32c`). Its chunks
  are decoded the same way and cached per shard (bounded), so a block of a big shard costs no zarr-python call.

Every chunk is checked before it is decoded: its crc32c (format v2), its presence (a missing chunk file or an index
entry marked missing is corruption in v2, where every chunk is written; v1 stores read it as the fill value, as
zarr does), and that it decodes. A failure is a `StoreError` naming the store, shard, array and chunk. Chunks are
decompressed straight from the page cache into a reused per-thread buffer (blosc and zstd release the GIL, so
reader threads overlap). Any other layout, or a remote store, falls back to zarr-python (`Store.read_array`, also
checked), which stays the reference: tests compare the two.
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import struct
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import google_crc32c
import numpy as np

from engine.errors import StoreError
from engine.store.csr import CSRRows, gather_rows_csr
from engine.store.format import Store

log = logging.getLogger(__name__)

_MISSING = 2**64 - 1  # offset/nbytes of an inner chunk that was never written
_U32 = struct.Struct("<I")
INDPTR_CACHE_BYTES = 64 * 2**20  # decoded indptr chunks kept per reader: all of them for stores up to ~8M cells
# Check each chunk's crc32c before decoding it (format v2). Only bench/loader.py turns this off, to measure the cost.
VERIFY_CHECKSUMS = True


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
    file_elems: int  # elements per file: a zarr shard (outer chunk), or one chunk when not sharded
    chunk_elems: int  # elements per compressed chunk
    codec: str  # blosc | zstd | none
    checksum: bool  # each compressed chunk ends in a little-endian crc32c of the bytes before it
    sharded: bool
    fill_value: float
    key_prefix: str  # "c/" (default encoding, "/" separator) or "c."

    @property
    def n_chunks(self) -> int:
        return -(-self.shape // self.chunk_elems)


def _chunk_codecs(codecs: list[dict[str, Any]]) -> tuple[str, bool] | None:
    """(codec, checksum) of a chain `bytes(little) [+ blosc|zstd] [+ crc32c]`, or None for any other chain."""
    if not codecs or codecs[0]["name"] != "bytes":
        return None
    if (codecs[0].get("configuration") or {}).get("endian", "little") != "little":
        return None
    names = [c["name"] for c in codecs[1:]]
    checksum = bool(names) and names[-1] == "crc32c"
    if checksum:
        names = names[:-1]
    codec = {(): "none", ("blosc",): "blosc", ("zstd",): "zstd"}.get(tuple(names))
    return None if codec is None else (codec, checksum)


def _parse_layout(path: Path) -> _Layout | None:
    """The layout of a 1-D zarr v3 array this reader handles (sharded or plainly chunked), else None."""
    try:
        meta = json.loads((path / "zarr.json").read_text())
    except (OSError, ValueError):
        return None
    try:
        if meta.get("zarr_format") != 3 or len(meta["shape"]) != 1 or meta["chunk_grid"]["name"] != "regular":
            return None
        enc = meta["chunk_key_encoding"]
        if enc["name"] != "default":
            return None
        codecs = meta["codecs"]
        file_elems = int(meta["chunk_grid"]["configuration"]["chunk_shape"][0])
        if len(codecs) == 1 and codecs[0]["name"] == "sharding_indexed":
            cfg = codecs[0]["configuration"]
            if cfg.get("index_location", "end") != "end" or [c["name"] for c in cfg["index_codecs"]] != [
                "bytes",
                "crc32c",
            ]:
                return None
            parsed, sharded, chunk_elems = _chunk_codecs(cfg["codecs"]), True, int(cfg["chunk_shape"][0])
        else:
            parsed, sharded, chunk_elems = _chunk_codecs(codecs), False, file_elems
        if parsed is None or file_elems % chunk_elems:
            return None
        return _Layout(
            dtype=np.dtype(meta["data_type"]).newbyteorder("<"),
            shape=int(meta["shape"][0]),
            file_elems=file_elems,
            chunk_elems=chunk_elems,
            codec=parsed[0],
            checksum=parsed[1],
            sharded=sharded,
            fill_value=meta.get("fill_value") or 0,
            key_prefix=f"c{enc.get('configuration', {}).get('separator', '/')}",
        )
    except (KeyError, IndexError, TypeError, ValueError):
        return None


def decompress(codec: str, raw, dest: np.ndarray | None = None):
    """Decode one chunk (its compressed bytes, without a checksum), into `dest` when given (no extra copy)."""
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
    """Element ranges of one 1-D zarr v3 array on a local filesystem, every chunk verified.

    Shard files are memory-mapped (read-only), so a chunk is checked and decompressed straight from the page cache
    into its destination: no read() copy and no intermediate buffer. `strict` (format v2): every chunk inside the
    array must exist; otherwise (v1) a chunk zarr did not write reads as the fill value."""

    def __init__(self, path: Path, layout: _Layout, strict: bool = True, max_open_files: int = 64):
        self.path = path
        self.layout = layout
        self.strict = strict
        self._per_file = layout.file_elems // layout.chunk_elems
        self._max_open = max_open_files
        # file id -> (map, uint8 view of it, [(offset, nbytes)] per chunk); the map is None for an absent v1 file.
        # Lookups take no lock (dict reads are atomic); opening one, and evicting the oldest, does.
        self._files: dict[int, tuple[Any, np.ndarray | None, list[tuple[int, int]]]] = {}
        self._lock = threading.Lock()

    @classmethod
    def open(cls, path: Path, strict: bool = True) -> ArrayReader | None:
        layout = _parse_layout(path)
        return None if layout is None else cls(path, layout, strict)

    def close(self) -> None:
        with self._lock:
            self._files.clear()  # maps close when the last view into them is gone

    def _where(self, chunk: int) -> str:
        """`STORE/shards/NNNNN/X/NAME: chunk K (file c/F)`: how every error names the place."""
        file_id = chunk * self.layout.chunk_elems // self.layout.file_elems
        return f"{self.path}: chunk {chunk} (file {self.layout.key_prefix}{file_id})"

    def _file(self, file_id: int) -> tuple[Any, np.ndarray | None, list[tuple[int, int]]]:
        entry = self._files.get(file_id)
        if entry is None:
            with self._lock:
                entry = self._files.get(file_id)
                if entry is None:
                    entry = self._open_file(file_id)
                    while len(self._files) >= self._max_open:
                        self._files.pop(next(iter(self._files)))  # the oldest: maps close when unused
                    self._files[file_id] = entry
        return entry

    def _open_file(self, file_id: int) -> tuple[Any, np.ndarray | None, list[tuple[int, int]]]:
        """(the file's map and a read-only uint8 view of it, or None if absent; the (offset, nbytes) of each of its
        chunks). An unsharded file is one chunk spanning the whole file."""
        lay = self.layout
        per_file = lay.file_elems // lay.chunk_elems
        first = file_id * per_file
        name = f"{lay.key_prefix}{file_id}"
        file = self.path / name
        try:
            fh = open(file, "rb")
        except FileNotFoundError:
            if self.strict:
                last = min(first + per_file, lay.n_chunks) - 1
                what = f"chunk {first}" if last == first else f"chunks {first}-{last}"
                raise StoreError(f"{self.path}: chunk file {name} ({what}) is missing") from None
            # v1: zarr writes no file when every chunk in it equals the fill value
            return None, None, [(_MISSING, _MISSING)] * per_file
        with fh:
            size = os.fstat(fh.fileno()).st_size
            if size == 0:
                raise StoreError(f"{self.path}: chunk file {name} is empty (truncated)")
            mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        buf = np.frombuffer(mm, dtype=np.uint8)
        if not lay.sharded:
            return mm, buf, [(0, size)]
        nbytes = per_file * 16 + 4
        last = min(first + per_file, max(1, lay.n_chunks)) - 1
        what = f"chunks {first}-{last}"
        if size < nbytes:
            raise StoreError(
                f"{self.path}: chunk file {name} ({what}) has {size} bytes, shorter than its index ({nbytes} bytes): "
                "truncated"
            )
        raw = buf[size - nbytes :]
        if google_crc32c.value(raw[:-4]) != int.from_bytes(raw[-4:].tobytes(), "little"):
            raise StoreError(
                f"{self.path}: chunk file {name} ({what}): its chunk index fails its crc32c checksum "
                "(corrupted or truncated file)"
            )
        index = raw[:-4].view("<u8").reshape(per_file, 2)
        present = index[:, 0] != _MISSING
        if present.any() and int((index[present, 0] + index[present, 1]).max()) > size - nbytes:
            raise StoreError(f"{self.path}: chunk file {name} ({what}): its index points past the end (truncated)")
        return mm, buf, [(int(o), int(n)) for o, n in index.tolist()]

    def compressed_chunks(self) -> Iterator[np.ndarray]:
        """Every chunk's compressed bytes (checksum removed), in order (benchmarks time decoding them alone)."""
        for c in range(self.layout.n_chunks):
            raw = self._raw(c)
            if raw is not None:
                yield raw[0]

    def _raw(self, c: int) -> tuple[np.ndarray, Any, int] | None:
        """(chunk c's compressed bytes, its checksum verified and removed; the map; their offset in it), or None for
        a v1 chunk never written. Per-chunk work here is kept to plain ints: small blocks decode thousands a second."""
        file_id, k = divmod(c, self._per_file)
        mm, buf, index = self._file(file_id)
        off, n = index[k]
        if off == _MISSING:
            if self.strict and c < self.layout.n_chunks:
                raise StoreError(f"{self._where(c)} is missing from its chunk file's index")
            return None
        if self.layout.checksum:
            n -= 4
            if (
                n < 0
                or VERIFY_CHECKSUMS
                and google_crc32c.value(buf[off : off + n]) != _U32.unpack_from(mm, off + n)[0]
            ):
                raise StoreError(f"{self._where(c)} fails its crc32c checksum (corrupted)")
        return buf[off : off + n], mm, off

    def decode(self, c: int, dest: np.ndarray) -> None:
        """Chunk c into dest (chunk_elems elements), checked: present, checksum, decodes to the chunk's size."""
        got = self._raw(c)
        if got is None:  # v1: never written, all fill value
            dest[:] = self.layout.fill_value
            return
        raw, mm, off = got
        codec = self.layout.codec
        # decoders fill a larger destination silently: a blosc header states the decoded size, check it (zstd
        # refuses a smaller destination, and the checksum covers the rest)
        if codec == "blosc" and len(raw) >= 16 and (size := _U32.unpack_from(mm, off + 4)[0]) != dest.nbytes:
            raise StoreError(f"{self._where(c)} holds {size} bytes, expected {dest.nbytes} (corrupted)")
        try:
            decompress(codec, raw, dest)
        except Exception as e:  # numcodecs raises RuntimeError/ValueError/TypeError on corrupt input
            raise StoreError(f"{self._where(c)} does not decode ({type(e).__name__}: {e})") from None

    def decode_runs(self, runs: Sequence[tuple[int, int]], pool: np.ndarray, bases: Sequence[int]) -> None:
        """Decode chunks [c0, c1] of each run into pool[base : base + (c1 - c0 + 1) * chunk_elems]."""
        chunk = self.layout.chunk_elems
        for (c0, c1), base in zip(runs, bases):
            for c in range(c0, c1 + 1):
                self.decode(c, pool[base + (c - c0) * chunk : base + (c - c0 + 1) * chunk])


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
        self.direct = direct and _local(store.path)
        self.strict = store.manifest.version >= 2  # v2 writes every chunk: a missing one is corruption
        self._arrays: dict[tuple[int, str], ArrayReader | None] = {}
        self._indptr_bytes = indptr_cache_bytes
        self._indptr: _LRU | None = None  # (shard, chunk) -> decoded indptr chunk; sized on first use
        self._obs: _LRU = _LRU(cache_shards)
        self._lock = threading.Lock()
        self._scratch = threading.local()  # per-thread decode buffers, reused: no page faults per buffer
        self.stats = {"decoded": 0, "used": 0}  # elements of X/data (= X/indices) decoded and delivered

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
                    reader = ArrayReader.open(Path(self.store.where(shard, name)), self.strict)
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
                self._indptr = _LRU(max(4, self._indptr_bytes // (8 * reader.layout.chunk_elems)))
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
        n_seg = segments.shape[0]
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
        pool_i = self._buffer("indices", int(bases[-1]), readers[0][0].layout.dtype)
        pool_d = self._buffer("data", int(bases[-1]), readers[0][1].layout.dtype)
        for r, (shard, c0, c1) in enumerate(runs):
            self._array(shard, "indices").decode_runs([(c0, c1)], pool_i, [bases[r]])
            self._array(shard, "data").decode_runs([(c0, c1)], pool_d, [bases[r]])
        shift = [int(bases[run_of[i]] - runs[run_of[i]][1] * chunk) if runs else 0 for i in range(n_seg)]
        with self._lock:
            self.stats["decoded"] += int(bases[-1])
            self.stats["used"] += sum(hi - lo for lo, hi in zip(nnz_lo, nnz_hi))
        dt_i = np.dtype(self.store.manifest.index_dtype)
        dt_d = np.dtype(self.store.manifest.count_dtype)
        return CSRRows(
            pool_i.astype(dt_i, copy=False),
            pool_d.astype(dt_d, copy=False),
            np.concatenate([st + sh for st, sh in zip(starts, shift)]).astype(np.int64),
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


def _local(path: Path) -> bool:
    return Path(path).exists()
