"""Direct, verified reads of one 1-D zarr v3 array of a store (X/data, X/indices, X/indptr of a shard).

zarr-python pays a fixed cost per request (async machinery, selection objects) that dominates when a loader
reads many small random blocks, and it reads an inner chunk that a shard's index marks missing as the fill value.
The store's arrays are plain zarr v3 with a fixed, simple layout, so this module reads them directly:

- X/data and X/indices: 1-D, `sharding_indexed` (index at the end, itself crc32c-checked), inner codecs
  `bytes` + blosc or zstd (+ `crc32c` in format v2). Each shard file is memory-mapped and its index checked once.
- X/indptr: 1-D, plainly chunked (one file per chunk of 65,536 cells), `bytes` + zstd (+ `crc32c`).

An array in a bucket (`engine.objects.ObjectPath`) is read the same way from its node-local mirror
(`engine.store.remote.CachedObject`): `prefetch` fetches the byte ranges of the chunks a read needs (all files at
once), and the checks run on the mirrored bytes as on a local file; a chunk that fails them is fetched once more.

Every chunk is checked before it is decoded: its crc32c (format v2), its presence (a missing chunk file or an index
entry marked missing is corruption in v2, where every chunk is written; v1 stores read it as the fill value, as
zarr does), and that it decodes. A failure is a `StoreError` naming the store, shard, array and chunk. Chunks are
decompressed straight from the page cache into their destination (blosc and zstd release the GIL, so reader threads
overlap). A batch of blosc chunk runs (`engine.store.chunkbatch.ChunkBatch`: a loader buffer's, of any arrays and
shards) is checked and decoded in one numba call (`engine.store.chunk_kernel`): the same checks, no Python per chunk.
`Store.read_array` and the loader's `StoreBlocks` both read through `ArrayReader`; any other layout falls back to
zarr-python.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import threading
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import google_crc32c
import numpy as np

from engine.errors import MissingObjectError, StoreError
from engine.objects import ObjectPath

MISSING = 2**64 - 1  # offset/nbytes of an inner chunk that was never written
_U32 = struct.Struct("<I")
# Check each chunk's crc32c before decoding it (format v2), and each file's place (format v3: see `ArrayReader`).
# Only bench/loader.py turns these off, to measure their cost.
VERIFY_CHECKSUMS = True
VERIFY_PLACEMENT = True
# Files mapped at once by all the readers of a process. Linux allows a process 65,530 maps (vm.max_map_count), and a
# store of a billion cells (~100 non-zeros each) at the default shard size has ~65,000 chunk files, every one of which
# a reader that visits every shard would otherwise keep mapped.
MAX_OPEN_FILES = 16_384


def tail_crc(path: Path) -> str:
    """The crc32c a file of a checksummed array ends in (a zarr shard's: its index's), as 8 hex digits."""
    with open(path, "rb") as fh:
        fh.seek(-4, os.SEEK_END)
        return f"{_U32.unpack(fh.read(4))[0]:08x}"


@dataclass(frozen=True)
class ChunkLayout:
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


def parse_layout(path: Path | ObjectPath) -> ChunkLayout | None:
    """The layout of a 1-D zarr v3 array this reader handles (sharded or plainly chunked), else None."""
    try:
        meta = json.loads((path / "zarr.json").read_text())
    except (OSError, ValueError, MissingObjectError):
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
        return ChunkLayout(
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


def _crc_ok(raw: np.ndarray) -> bool:
    """Whether bytes that end in a little-endian crc32c of the rest (a shard file's index) are intact."""
    return google_crc32c.value(raw[:-4]) == int.from_bytes(raw[-4:].tobytes(), "little")


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


class MappedFile(NamedTuple):
    """One file of an array: its map and a read-only uint8 view of it (None for a v1 file never written), and each
    chunk's offset and nbytes in it (int64; -1: missing, which the zarr index writes as 2**64 - 1); `src` and `size`
    the same chunks as addresses in the map and their byte counts (-1: missing or not inside the file), for
    `ChunkBatch`."""

    map: Any
    buf: np.ndarray | None
    offsets: np.ndarray
    nbytes: np.ndarray
    cached: Any = None  # the file's `CachedObject` when it lives in a bucket
    src: np.ndarray | None = None
    size: np.ndarray | None = None

    @classmethod
    def of(cls, mm: Any, buf: np.ndarray, index: np.ndarray, cached: Any = None) -> MappedFile:
        signed = np.ascontiguousarray(index, dtype="<u8").view("<i8")  # MISSING (2**64 - 1) reads as -1
        offsets, nbytes = signed[:, 0].copy(), signed[:, 1].copy()
        inside = (offsets >= 0) & (nbytes >= 0) & (offsets + nbytes <= len(buf))
        src = np.where(inside, buf.ctypes.data + offsets, 0).astype(np.uint64)
        return cls(mm, buf, offsets, nbytes, cached, src, np.where(inside, nbytes, -1))

    @classmethod
    def absent(cls, n_chunks: int) -> MappedFile:
        missing = np.full(n_chunks, -1, dtype=np.int64)
        return cls(None, None, missing, missing)


class _OpenFiles:
    """The files every `ArrayReader` of the process has mapped, in the order they were opened: past `MAX_OPEN_FILES`
    the oldest is dropped from its reader (its map closes once no read in flight holds it; a later read maps it
    again). A closed reader's entries age out like the others."""

    def __init__(self) -> None:
        self._order: OrderedDict[tuple[int, int], weakref.ref[ArrayReader]] = OrderedDict()
        self._lock = threading.Lock()

    def opened(self, reader: ArrayReader, file_id: int) -> None:
        with self._lock:
            self._order[(id(reader), file_id)] = weakref.ref(reader)
            while len(self._order) > MAX_OPEN_FILES:
                (_, oldest), ref = self._order.popitem(last=False)
                owner = ref()
                if owner is not None:
                    owner._files.pop(oldest, None)  # lookups take no lock: a dict's pop is atomic


_OPEN_FILES = _OpenFiles()


class ArrayReader:
    """Element ranges of one 1-D zarr v3 array on a local filesystem or in a bucket, every chunk verified.

    Shard files are memory-mapped (read-only), so a chunk is checked and decompressed straight from the page cache
    into its destination: no read() copy and no intermediate buffer. `strict` (format v2): every chunk inside the
    array must exist; otherwise (v1) a chunk zarr did not write reads as the fill value. `placement` (format v3, from
    the manifest): the crc32c each file ends in, by file number; a file that ends otherwise is not the one written
    there (chunks swapped in its index, a file moved or replaced), although each chunk may pass its own checksum."""

    def __init__(
        self,
        path: Path | ObjectPath,
        layout: ChunkLayout,
        strict: bool = True,
        placement: Sequence[str] | None = None,
    ):
        self.path = path
        self.remote = isinstance(path, ObjectPath)
        self.layout = layout
        self.strict = strict
        self.placement = placement
        self.per_file = layout.file_elems // layout.chunk_elems  # chunks a file holds (1: unsharded)
        # file id -> its map and chunk index; lookups take no lock (dict reads are atomic); opening one does, and
        # `_OPEN_FILES` drops the process's oldest past its bound
        self._files: dict[int, MappedFile] = {}
        self._lock = threading.Lock()

    @classmethod
    def open(
        cls, path: Path | ObjectPath, strict: bool = True, placement: Sequence[str] | None = None
    ) -> ArrayReader | None:
        layout = parse_layout(path)
        return None if layout is None else cls(path, layout, strict, placement=placement)

    def close(self) -> None:
        with self._lock:
            self._files.clear()  # maps close when the last view into them is gone

    def _where(self, chunk: int) -> str:
        """`STORE/shards/NNNNN/X/NAME: chunk K (file c/F)`: how every error names the place."""
        file_id = chunk * self.layout.chunk_elems // self.layout.file_elems
        return f"{self.path}: chunk {chunk} (file {self.layout.key_prefix}{file_id})"

    def mapped_file(self, file_id: int) -> MappedFile:
        """File `file_id` of the array mapped, its chunk index read and checked (kept open, up to the process's
        `MAX_OPEN_FILES`: the oldest closes first)."""
        entry = self._files.get(file_id)
        if entry is None:
            with self._lock:
                entry = self._files.get(file_id)
                if entry is None:
                    entry = self._open_file(file_id)
                    self._files[file_id] = entry
                    _OPEN_FILES.opened(self, file_id)
        return entry

    def _open_file(self, file_id: int) -> MappedFile:
        """The file mapped, its chunk index read and checked. An unsharded file is one chunk spanning the file."""
        lay, per_file = self.layout, self.per_file
        first = file_id * per_file
        name = f"{lay.key_prefix}{file_id}"
        cached = None
        try:
            if self.remote:
                from engine.store.remote import CachedObject

                cached = CachedObject(self.path / name)
                fh = open(cached.local, "rb")
            else:
                fh = open(self.path / name, "rb")
        except FileNotFoundError:  # MissingObjectError is one too
            if self.strict:
                last = min(first + per_file, lay.n_chunks) - 1
                what = f"chunk {first}" if last == first else f"chunks {first}-{last}"
                raise StoreError(f"{self.path}: chunk file {name} ({what}) is missing") from None
            # v1: zarr writes no file when every chunk in it equals the fill value
            return MappedFile.absent(per_file)
        with fh:
            size = os.fstat(fh.fileno()).st_size
            if size == 0:
                raise StoreError(f"{self.path}: chunk file {name} is empty (truncated)")
            try:
                mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
            except OSError as e:  # ENOMEM: the process's maps are spent (vm.max_map_count)
                raise StoreError(f"{self.path}: chunk file {name} cannot be mapped ({e.strerror})") from None
        buf = np.frombuffer(mm, dtype=np.uint8)
        if not lay.sharded:
            if cached is not None:
                cached.ensure([(size - 4, size)])
            self._check_place(file_id, buf)
            return MappedFile.of(mm, buf, np.array([[0, size]], dtype="<u8"), cached)
        nbytes = per_file * 16 + 4
        last = min(first + per_file, max(1, lay.n_chunks)) - 1
        what = f"chunks {first}-{last}"
        if size < nbytes:
            raise StoreError(
                f"{self.path}: chunk file {name} ({what}) has {size} bytes, shorter than its index ({nbytes} bytes): "
                "truncated"
            )
        if cached is not None:
            cached.ensure([(size - nbytes, size)])
        raw = buf[size - nbytes :]
        if cached is not None and not _crc_ok(raw):  # bad bytes in the cache: fetched once more
            cached.forget(size - nbytes, size)
            cached.ensure([(size - nbytes, size)])
        if not _crc_ok(raw):
            raise StoreError(
                f"{self.path}: chunk file {name} ({what}): its chunk index fails its crc32c checksum "
                "(corrupted or truncated file)"
            )
        self._check_place(file_id, buf)
        index = raw[:-4].view("<u8").reshape(per_file, 2)
        present = index[:, 0] != MISSING
        if present.any() and int((index[present, 0] + index[present, 1]).max()) > size - nbytes:
            raise StoreError(f"{self.path}: chunk file {name} ({what}): its index points past the end (truncated)")
        return MappedFile.of(mm, buf, index, cached)

    def _check_place(self, file_id: int, buf: np.ndarray) -> None:
        """The file ends in the crc32c the manifest recorded for this place (its index's, or its one chunk's)."""
        if self.placement is None or not VERIFY_PLACEMENT or not self.layout.checksum:
            return
        got = f"{_U32.unpack_from(buf, len(buf) - 4)[0]:08x}" if len(buf) >= 4 else "none"
        want = self.placement[file_id] if file_id < len(self.placement) else "none"
        if got != want:
            raise StoreError(
                f"{self.path}: chunk file {self.layout.key_prefix}{file_id} is not the one written there (it ends in "
                f"crc32c {got}, the manifest says {want}: chunks swapped, or a file moved or replaced)"
            )

    def cached_whole(self) -> bool:
        """Whether every file of this array is mapped and wholly in the node's cache (or local): nothing to fetch."""
        if not self.remote:
            return True
        n_files = -(-self.layout.n_chunks // self.per_file)
        files = [self._files.get(f) for f in range(n_files)]
        return all(f is not None and (f.cached is None or f.cached.complete) for f in files)

    def prefetch(self, runs: Sequence[tuple[int, int]]) -> None:
        """Fetch into the node's cache the bytes of chunks [c0, c1] of each run (arrays in a bucket; local arrays
        need nothing): one range per run and file, every file's ranges requested at once."""
        if self.cached_whole():
            return
        per_file: dict[int, list[tuple[int, int]]] = {}
        for c0, c1 in runs:
            c = c0
            while c <= c1:
                file_id, k0 = divmod(c, self.per_file)
                k1 = min(self.per_file - 1, k0 + c1 - c)
                per_file.setdefault(file_id, []).append((k0, k1))
                c += k1 - k0 + 1
        for file_id, spans in per_file.items():
            f = self.mapped_file(file_id)
            if f.cached is None:
                continue
            ranges = []
            for k0, k1 in spans:
                present = f.offsets[k0 : k1 + 1] >= 0
                if present.any():
                    lo = int(f.offsets[k0 : k1 + 1][present].min())
                    hi = int((f.offsets[k0 : k1 + 1] + f.nbytes[k0 : k1 + 1])[present].max())
                    ranges.append((lo, hi))
            f.cached.ensure(ranges)

    def _raw(self, c: int) -> tuple[np.ndarray, Any, int] | None:
        """(chunk c's compressed bytes, its checksum verified and removed; the map; their offset in it), or None for
        a v1 chunk never written. blosc runs go through `chunk_kernel` instead; this is the path of other codecs
        (X/indptr), of v1 stores' missing chunks, and of the chunk the kernel stopped at (to name its fault)."""
        file_id, k = divmod(c, self.per_file)
        f = self.mapped_file(file_id)
        mm, buf, offsets, nbytes = f.map, f.buf, f.offsets, f.nbytes
        off, n = int(offsets[k]), int(nbytes[k])
        if off < 0:
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
        """Chunk c into dest (chunk_elems elements), checked: present, checksum, decodes to the chunk's size. A chunk
        of a bucket's object that fails is fetched once more before its error is raised (the cache may be at fault)."""
        if not self.remote:
            return self._decode(c, dest)
        try:
            self.prefetch([(c, c)])
            return self._decode(c, dest)
        except StoreError:
            file_id, k = divmod(c, self.per_file)
            f = self.mapped_file(file_id)
            if f.cached is None or f.offsets[k] < 0:
                raise
            lo, hi = int(f.offsets[k]), int(f.offsets[k] + f.nbytes[k])
            f.cached.forget(lo, hi)
            f.cached.ensure([(lo, hi)])
            return self._decode(c, dest)

    def _decode(self, c: int, dest: np.ndarray) -> None:
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

    def read(self, lo: int, hi: int) -> np.ndarray:
        """Elements [lo, hi) as a new array, every chunk they touch checked and decoded once."""
        chunk = self.layout.chunk_elems
        if hi <= lo:
            return np.empty(0, dtype=self.layout.dtype)
        c0, c1 = lo // chunk, (hi - 1) // chunk
        pool = np.empty((c1 - c0 + 1) * chunk, dtype=self.layout.dtype)
        self.prefetch([(c0, c1)])
        from engine.store.chunkbatch import ChunkBatch  # which imports this module

        batch = ChunkBatch()
        batch.add(self, c0, c1, pool, 0)
        batch.run()
        return pool[lo - c0 * chunk : hi - c0 * chunk].copy()
