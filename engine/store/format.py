"""The cellray store, format v2: a zarr v3 group of AnnData shards plus a manifest.

Layout (every path is plain zarr v3, readable without cellray)::

    STORE/                    zarr group; attrs["cellray"] holds the manifest (see `Manifest`)
      var/                    the gene vocabulary once, an AnnData dataframe (index: gene ids; `gene_symbols`)
      shards/00000/           a complete AnnData zarr group: `anndata.read_zarr("STORE/shards/00000")`
        X/                    csr_matrix: data (counts, smallest fitting dtype), indices (smallest uint), indptr (int64)
        obs/                  the kept obs columns, with categories unified across the store
        var/                  gene ids only (AnnData needs a var; symbols and the rest live in STORE/var)
      stats/                  written later by `cellray stats`

X/data and X/indices are chunked along the non-zeros, so a contiguous run of cells is one or a few chunk
reads, and grouped into zarr shards so a store shard is a handful of files. `Store.read_csr` reads a cell
range with two array reads and no per-row indexing.

Version 2 adds integrity: every chunk of X (data, indices, indptr) ends in zarr's `crc32c` codec, so every read
checks the bytes it decodes (zarr-python does it too), and every chunk is written, even one equal to the fill
value, so a missing chunk file is an error, never zeros.

Version 3 extends it to the rest of the store and binds chunks to their place:
- obs and var arrays end in `crc32c` too, and the manifest holds a checksum of every obs/var array's values
  (`ShardInfo.obs`, `Manifest.var_checksums`), checked whenever they are read: a chunk missing (zarr reads it as "" or
  0), replaced or corrupt is a StoreError naming the array. Empty or duplicate gene ids and cell names are refused.
- `ShardInfo.files` records, for every file of X/data, X/indices and X/indptr, the crc32c it ends in (a shard file's:
  that of its chunk index; an indptr chunk's: that of the chunk). `ArrayReader` compares it when it maps the file, so
  chunks swapped inside a file's index, or a file moved or replaced, are an error although each chunk's own crc32c
  still holds. Its cost is one comparison per file opened.
Versions 1 and 2 are still read, without the checks they lack (a warning says so).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import zarr
from zarr.codecs import BloscCodec, ZstdCodec

from engine.errors import MissingObjectError, StoreError
from engine.objects import ObjectPath, store_path, zarr_store
from engine.store.chunkfile import ArrayReader
from engine.store.integrity import (
    check_names,
    checksum_values,
    frame_checksums,
    settle_zarr,
)

log = logging.getLogger(__name__)

FORMAT_NAME = "cellray.store"
FORMAT_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)  # v1: no per-chunk checksums; v2: none of obs/var, nor of chunk placement
MANIFEST_KEY = "cellray"
# Elements per compressed chunk of X/data and X/indices, and chunks per file (zarr sharding). A random block of
# cells decodes about one chunk more than it uses: chunks of a quarter of the loader's default block (65,536
# values) keep that to ~1.2x (1.5-1.9x with 65,536-value chunks), and `engine.store.chunk_kernel` decodes a run of
# small chunks in one call. A file holds 4,194,304 values, as before.
DEFAULT_CHUNK_ELEMENTS = 1 << 14
DEFAULT_CHUNKS_PER_FILE = 256
INDPTR_CHUNK = 1 << 16  # cells per chunk of X/indptr
MAX_OPEN_READERS = 48  # direct array readers a Store keeps for reuse


@dataclass(frozen=True)
class Codec:
    """The compressor of X/data and X/indices. See bench/codecs.py for the measurement behind the default."""

    name: str = "blosc-lz4"  # blosc-lz4 | blosc-zstd | zstd
    level: int = 5
    shuffle: str = "bitshuffle"  # blosc only: noshuffle | shuffle | bitshuffle

    def zarr_compressor(self) -> Any:
        if self.name == "zstd":
            return ZstdCodec(level=self.level)
        if self.name.startswith("blosc-"):
            return BloscCodec(cname=self.name.removeprefix("blosc-"), clevel=self.level, shuffle=self.shuffle)
        raise StoreError(f"unknown codec {self.name!r}: expected blosc-lz4, blosc-zstd or zstd")


@dataclass(frozen=True)
class ShardInfo:
    path: str  # relative to the store root, e.g. "shards/00000"
    n_cells: int
    nnz: int
    checksum: str  # "crc32:<hex>" over indptr, indices and data as stored
    # v3: array (data, indices, indptr) -> the crc32c each of its files ends in, as 8 hex digits, by file number
    files: dict[str, list[str]] = field(default_factory=dict)
    obs: dict[str, str] = field(default_factory=dict)  # v3: obs array ("_index", "COL/codes", ...) -> its checksum


@dataclass
class Manifest:
    """Everything a reader needs before touching a shard. O(shards) in size, never O(cells)."""

    n_cells: int
    n_genes: int
    count_dtype: str
    index_dtype: str
    codec: Codec
    chunk_elements: int
    shards: list[ShardInfo]
    obs_schema: dict[str, dict[str, Any]]  # column -> {"dtype": ..., "categories": [...] for categoricals}
    provenance: list[dict[str, Any]]  # one entry per source file
    shuffle: dict[str, Any] = field(default_factory=dict)  # {"shuffled": bool, "seed": int}
    var_checksums: dict[str, str] = field(default_factory=dict)  # v3: var array ("_index", ...) -> its checksum
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    format: str = FORMAT_NAME
    version: int = FORMAT_VERSION

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "manifest") -> Manifest:
        if d.get("format") != FORMAT_NAME:
            raise StoreError(f"{where}: field 'format' is {d.get('format')!r}, expected {FORMAT_NAME!r}")
        if d.get("version") not in READABLE_VERSIONS:
            raise StoreError(
                f"{where}: field 'version' is {d.get('version')!r}; this cellray reads format versions "
                f"{list(READABLE_VERSIONS)}"
            )
        if d["version"] < FORMAT_VERSION:
            lacks = "per-chunk checksums" if d["version"] < 2 else "checks of obs/var and of chunk placement"
            log.warning("%s: store format v%d has no %s: re-ingest for verified reads", where, d["version"], lacks)
        d = dict(d)
        try:
            d["codec"] = Codec(**d["codec"])
            d["shards"] = [ShardInfo(**s) for s in d["shards"]]
            manifest = cls(**d)
        except (KeyError, TypeError) as e:
            raise StoreError(f"{where}: malformed ({type(e).__name__}: {e})") from None
        if manifest.version >= 3:
            arrays = ("data", "indices", "indptr")
            bad = next((s.path for s in manifest.shards if set(s.files) != set(arrays) or "_index" not in s.obs), None)
            if bad is not None or "_index" not in manifest.var_checksums:
                raise StoreError(f"{where}: format v3 without the checksums of {bad or 'var'} (malformed manifest)")
        return manifest


@dataclass
class CSRBlock:
    """A contiguous run of cells as CSR arrays; indptr starts at 0."""

    indptr: np.ndarray
    indices: np.ndarray
    data: np.ndarray
    n_genes: int

    @property
    def n_cells(self) -> int:
        return len(self.indptr) - 1

    def to_scipy(self):
        import scipy.sparse as sp

        return sp.csr_matrix((self.data, self.indices, self.indptr), shape=(self.n_cells, self.n_genes))


def smallest_uint(max_value: int) -> np.dtype:
    for dt in (np.uint8, np.uint16, np.uint32):
        if max_value <= np.iinfo(dt).max:
            return np.dtype(dt)
    return np.dtype(np.uint64)


# ----------------------------------------------------------------------------------------------- reading


def root_metadata(path: Path | ObjectPath) -> dict[str, Any] | None:
    """The root zarr.json of a store as a dict (in a bucket: the committed one), or None when there is none."""
    try:
        meta = json.loads((path / "zarr.json").read_text())
    except (OSError, ValueError):  # MissingObjectError is an OSError too
        return None
    return meta if isinstance(meta, dict) else None


def open_group(path: Path | ObjectPath) -> zarr.Group:
    """A zarr group to read, in a directory or a bucket (through `engine.objects`)."""
    if isinstance(path, ObjectPath):
        return zarr.open_group(store=zarr_store(path), mode="r")
    return zarr.open_group(str(path), mode="r")


def is_store(path: str | os.PathLike | ObjectPath) -> bool:
    """Whether `path` (a directory or a URI) is a cellray store: a zarr group whose attributes hold a manifest."""
    meta = root_metadata(store_path(path))
    return meta is not None and MANIFEST_KEY in (meta.get("attributes") or {})


class Store:
    """An opened store: the manifest, the vocabulary, and fast cell-range reads of shards."""

    def __init__(self, path: Path | ObjectPath, manifest: Manifest, root: zarr.Group):
        self.path = path
        self.remote = isinstance(path, ObjectPath)
        self.manifest = manifest
        self.root = root
        self._indptr: dict[int, np.ndarray] = {}
        self._x: dict[int, zarr.Group] = {}
        # direct readers kept for reuse (a bucket's costs a request or two to open), the least recently used dropped
        self._readers: OrderedDict[tuple[int, str], ArrayReader | None] = OrderedDict()
        self._readers_lock = threading.Lock()

    @classmethod
    def open(cls, path: str | os.PathLike | ObjectPath, vocabulary: bool = True) -> Store:
        """Open a store: a local directory or a URI (s3://, gs://, az://). In a bucket only a committed store opens:
        its root zarr.json, written last, holds the manifest, and nothing else under the prefix is trusted.
        `vocabulary`: read and check the gene ids now (`verify` reports a bad vocabulary as a finding instead)."""
        path = store_path(path)
        if isinstance(path, ObjectPath):
            try:
                (path / "zarr.json").read_bytes()
            except MissingObjectError as e:  # a missing bucket says so; a missing object is no (committed) store
                raise StoreError(
                    str(e) if "bucket" in str(e) else f"{path}: no such store (no committed {path / 'zarr.json'})"
                ) from None
        elif not path.exists():
            raise StoreError(f"{path}: no such store")
        try:
            root = open_group(path)
        except MissingObjectError as e:
            raise StoreError(str(e)) from None
        except Exception as e:  # zarr raises several types for a non-group
            raise StoreError(f"{path}: not a zarr v3 group ({e})") from e
        raw = root.attrs.get(MANIFEST_KEY)
        if raw is None:
            raise StoreError(
                f"{path}: no '{MANIFEST_KEY}' manifest in the root attributes (not a cellray store, or incomplete)"
            )
        manifest = Manifest.from_dict(dict(raw), where=f"{path}: manifest")
        total = sum(s.n_cells for s in manifest.shards)
        if total != manifest.n_cells:
            raise StoreError(f"{path}: manifest n_cells is {manifest.n_cells} but its shards hold {total} cells")
        store = cls(path, manifest, root)
        if vocabulary and len(store.var) != manifest.n_genes:
            raise StoreError(f"{path}/var: {len(store.var)} genes, the manifest says {manifest.n_genes}")
        return store

    def __repr__(self) -> str:
        m = self.manifest
        return f"Store({str(self.path)!r}, n_cells={m.n_cells}, n_genes={m.n_genes}, shards={len(m.shards)})"

    # -- shape
    @property
    def n_cells(self) -> int:
        return self.manifest.n_cells

    @property
    def n_genes(self) -> int:
        return self.manifest.n_genes

    @property
    def n_shards(self) -> int:
        return len(self.manifest.shards)

    @property
    def nnz(self) -> int:
        """Non-zeros of the count matrix, all shards together."""
        return sum(s.nnz for s in self.manifest.shards)

    @property
    def x_bytes(self) -> int:
        """Uncompressed bytes of the count matrix (data + indices): the size of the work over the whole store."""
        m = self.manifest
        return self.nnz * (np.dtype(m.count_dtype).itemsize + np.dtype(m.index_dtype).itemsize)

    @cached_property
    def cell_offsets(self) -> np.ndarray:
        """offsets[i] is the global index of shard i's first cell; offsets[-1] == n_cells."""
        return np.concatenate([[0], np.cumsum([s.n_cells for s in self.manifest.shards])]).astype(np.int64)

    def locate(self, global_index: np.ndarray | int) -> tuple[np.ndarray, np.ndarray]:
        """Global cell index (store order) -> (shard id, index within shard)."""
        g = np.asarray(global_index, dtype=np.int64)
        if g.size and (g.min() < 0 or g.max() >= self.n_cells):
            raise IndexError(f"{self.path}: cell index out of range [0, {self.n_cells})")
        shard = np.searchsorted(self.cell_offsets, g, side="right") - 1
        return shard, g - self.cell_offsets[shard]

    @cached_property
    def var(self) -> pd.DataFrame:
        """The vocabulary, checked: its arrays against the manifest's checksums (v3), its gene ids non-empty and
        unique."""
        var = self._read_frame("var", self.manifest.var_checksums)
        check_names(var.index, f"{self.path}/var/_index", "gene ids")
        return var

    def _read_frame(self, where: str, checksums: dict[str, str], columns: list[str] | None = None) -> pd.DataFrame:
        """An obs or var group (`where`, relative to the store) read by anndata, every array it read checked against
        `checksums` (empty before format v3): a chunk missing (zarr reads it as "" or 0), replaced or corrupt is a
        StoreError naming the array."""
        import anndata as ad

        try:
            group = self.root[where]
            if columns is None:
                frame = ad.io.read_elem(group)
            else:
                index = pd.Index(ad.io.read_elem(group[group.attrs["_index"]]), name=None)
                frame = pd.DataFrame({c: ad.io.read_elem(group[c]) for c in columns}, index=index)
        except Exception as e:  # zarr raises KeyError, ValueError, RuntimeError, ... for missing or corrupt chunks
            settle_zarr()
            raise StoreError(f"{self.path}/{where}: missing or unreadable ({type(e).__name__}: {e})") from None
        for key, got in frame_checksums(frame).items():
            if checksums and got != checksums.get(key):
                raise StoreError(
                    f"{self.path}/{where}/{key}: its values differ from those written (checksum {got}, the manifest "
                    f"says {checksums.get(key)}): a chunk missing, replaced or corrupt"
                )
        return frame

    @property
    def gene_ids(self) -> pd.Index:
        return self.var.index

    # -- shards
    def where(self, shard: int, array: str | None = None) -> str:
        """`STORE/shards/NNNNN[/X/array]`: how errors name a place in the store."""
        return f"{self.path}/{self.manifest.shards[shard].path}" + (f"/X/{array}" if array else "")

    def array_path(self, shard: int, array: str) -> Path | ObjectPath:
        """Where X/`array` of a shard lives: a directory, or a prefix in a bucket."""
        return self.path / self.manifest.shards[shard].path / "X" / array

    def shard_x(self, shard: int) -> zarr.Group:
        """The shard's X group, its arrays checked against the manifest on first use."""
        if shard not in self._x:
            info = self.manifest.shards[shard]
            try:
                x = self.root[f"{info.path}/X"]
                shapes = {name: x[name].shape[0] for name in ("indptr", "indices", "data")}
            except (KeyError, FileNotFoundError, ValueError) as e:
                raise StoreError(f"{self.where(shard)}/X: missing or unreadable ({type(e).__name__}: {e})") from None
            expected = {"indptr": info.n_cells + 1, "indices": info.nnz, "data": info.nnz}
            for name, n in shapes.items():
                if n != expected[name]:
                    raise StoreError(
                        f"{self.where(shard, name)}: {n} elements, the manifest says {expected[name]} "
                        "(the manifest and the shard disagree)"
                    )
            self._x[shard] = x
        return self._x[shard]

    def read_array(self, shard: int, name: str, lo: int, hi: int) -> np.ndarray:
        """Elements [lo, hi) of X/`name` of a shard, every chunk checked: a chunk that is missing (its file, or its
        entry in a shard file's index), fails its checksum or does not decode is a StoreError naming store, shard,
        array and chunk. Format v2 arrays are read by `chunkfile.ArrayReader` (zarr-python would read a chunk its
        shard index marks missing as zeros); anything else through zarr-python."""
        x = self.shard_x(shard)  # checks the shard against the manifest first
        if self.manifest.version >= 2 and (reader := self._reader(shard, name)) is not None:
            return reader.read(lo, hi)
        arr = x[name]  # zarr-python: v1 stores and layouts the direct reader does not handle
        per_file = arr.shards[0] if arr.shards else arr.chunks[0]
        if self.manifest.version >= 2 and hi > lo:
            sep = "/" if arr.metadata.chunk_key_encoding.separator == "/" else "."
            for k in range(lo // per_file, (hi - 1) // per_file + 1):
                if not (arr_dir := self.path / self.manifest.shards[shard].path / "X" / name / f"c{sep}{k}").exists():
                    raise StoreError(f"{self.where(shard, name)}: chunk file {arr_dir.name} is missing")
        try:
            return arr[lo:hi]
        except Exception as e:  # zarr/numcodecs raise ValueError/RuntimeError/... on bad bytes
            settle_zarr()
            first, last = lo // arr.chunks[0], max(lo, hi - 1) // arr.chunks[0]
            raise StoreError(
                f"{self.where(shard, name)}: chunks {first}-{last} are corrupt ({type(e).__name__}: {e})"
            ) from None

    def _reader(self, shard: int, name: str) -> ArrayReader | None:
        key = (shard, name)
        with self._readers_lock:
            if key in self._readers:
                self._readers.move_to_end(key)
                return self._readers[key]
        reader = ArrayReader.open(self.array_path(shard, name), placement=self.placement(shard, name))
        with self._readers_lock:
            self._readers[key] = reader
            while len(self._readers) > MAX_OPEN_READERS:
                self._readers.popitem(last=False)  # its files close when no read uses them
        return reader

    def placement(self, shard: int, name: str) -> list[str] | None:
        """What each file of X/`name` of a shard ends in, for `ArrayReader` to check (None before format v3)."""
        return self.manifest.shards[shard].files.get(name) if self.manifest.version >= 3 else None

    def shard_indptr(self, shard: int) -> np.ndarray:
        """The shard's whole indptr (n_cells + 1 int64), read once and cached."""
        if shard not in self._indptr:
            self._indptr[shard] = self.read_array(shard, "indptr", 0, self.manifest.shards[shard].n_cells + 1)
        return self._indptr[shard]

    def read_csr(self, shard: int, start: int = 0, stop: int | None = None) -> CSRBlock:
        """Cells [start, stop) of one shard: one read of X/data and one of X/indices."""
        indptr = self.shard_indptr(shard)
        stop = len(indptr) - 1 if stop is None else stop
        if not 0 <= start <= stop <= len(indptr) - 1:
            raise IndexError(
                f"{self.path}/shards/{shard:05d}: cell range [{start}, {stop}) outside [0, {len(indptr) - 1})"
            )
        lo, hi = int(indptr[start]), int(indptr[stop])
        return CSRBlock(
            indptr=indptr[start : stop + 1] - lo,
            indices=self.read_array(shard, "indices", lo, hi),
            data=self.read_array(shard, "data", lo, hi),
            n_genes=self.n_genes,
        )

    def read_obs(self, shard: int, columns: Iterable[str] | None = None) -> pd.DataFrame:
        """A shard's obs (all columns, or `columns`; always the cell names), checked against the manifest (v3)."""
        if columns is not None:
            columns = list(columns)
            missing = [c for c in columns if c not in self.manifest.obs_schema]
            if missing:
                raise StoreError(
                    f"{self.path}: obs has no column(s) {missing}; it has {list(self.manifest.obs_schema)}"
                )
        info = self.manifest.shards[shard]
        obs = self._read_frame(f"{info.path}/obs", info.obs, columns)
        check_names(obs.index, f"{self.where(shard)}/obs/_index", "cell names")
        return obs

    def obs_codes(self, shard: int, key: str) -> np.ndarray:
        """A whole shard's integer codes (int64, -1 = missing) of a categorical obs column, or the values of a
        numeric one, checked against the manifest (v3). Categories are unified across shards at ingest, so codes
        mean the same in every shard."""
        import anndata as ad

        info = self.manifest.shards[shard]
        where = f"{self.where(shard)}/obs/{key}"
        if key not in self.manifest.obs_schema:
            raise StoreError(f"{self.path}: obs has no column {key!r}; it has {list(self.manifest.obs_schema)}")
        try:
            elem = self.root[f"{info.path}/obs/{key}"]
            categorical = elem.attrs.get("encoding-type") == "categorical"
            values = np.asarray(elem["codes"][:]).astype(np.int64) if categorical else np.asarray(ad.io.read_elem(elem))
        except Exception as e:  # zarr raises KeyError, ValueError, RuntimeError, ... for missing or corrupt chunks
            settle_zarr()
            raise StoreError(f"{where}: missing or unreadable ({type(e).__name__}: {e})") from None
        name = f"{key}/codes" if categorical else key
        if info.obs and (got := checksum_values(values)) != info.obs.get(name):
            raise StoreError(
                f"{self.where(shard)}/obs/{name}: its values differ from those written (checksum {got}, the manifest "
                f"says {info.obs.get(name)}): a chunk missing, replaced or corrupt"
            )
        if len(values) != info.n_cells:
            raise StoreError(f"{where}: {len(values)} values, the manifest says {info.n_cells} cells")
        return values
