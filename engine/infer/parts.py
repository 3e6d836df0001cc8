"""Inference output written in parts, each committed once: an AnnData zarr directory built without a gather.

The output is one AnnData zarr group (`anndata.read_zarr` opens it) whose per-cell arrays (obs columns, the
obs index, obsm) are chunked along cells with one chunk per *part*: part k is cells [k*P, (k+1)*P) of the store.
The driver creates every array's metadata up front (the skeleton); each part then goes through

    1. write: its rows are encoded as chunk 0 of arrays with the final arrays' metadata (shape cut to the part)
       under OUT/.cellray/tmp/<k>.<random>/ (a temporary name),
    2. rename: each chunk file is renamed to its place in the final arrays (chunk k: no part touches another's),
    3. commit: a small record OUT/.cellray/parts/<k>.json (rows, checksum, the run's fingerprint), written
       atomically. A part without a record is not done, whatever files it left.

A rerun reads the records, skips committed parts, removes orphans (temporaries of killed writers, chunk files of
uncommitted parts) and redoes the rest; OUT/.cellray/run.json holds the fingerprint of checkpoint + store +
transforms + layout, and a rerun with another fingerprint is refused. Nothing here is O(cells) in one process:
the driver holds the layout and records, a writer holds one part.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
import uuid
import warnings
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from engine.atomic import remove, temporaries_in, write_text_atomically
from engine.errors import CellrayError, InferError
from engine.infer.predict import OBSM_KEY
from engine.objects import ObjectPath, exists, read_bytes

log = logging.getLogger(__name__)

META_DIR = ".cellray"  # hidden: anndata and zarr ignore a directory without zarr.json
RUN_FILE = "run.json"
ARRAY_ATTRS = {"encoding-type": "array", "encoding-version": "0.2.0"}


@dataclass(frozen=True)
class Layout:
    """Parts are equal runs of cells in store order (the last may be shorter); part k is chunk k of every array."""

    n_cells: int
    part_cells: int

    @property
    def n_parts(self) -> int:
        return -(-self.n_cells // self.part_cells)

    def bounds(self, part: int) -> tuple[int, int]:
        return part * self.part_cells, min(self.n_cells, (part + 1) * self.part_cells)


def checksum(arrays: dict[str, np.ndarray]) -> str:
    """CRC32 over the arrays' bytes, in name order (what a part computed, as written)."""
    crc = 0
    for name in sorted(arrays):
        crc = zlib.crc32(np.ascontiguousarray(arrays[name]).view(np.uint8), crc)
    return f"crc32:{crc:08x}"


@contextlib.contextmanager
def quiet_zarr() -> Iterator[None]:
    """anndata's notes on zarr v3 (autosharding, consolidated metadata) concern layouts we do not use; zarr's note
    on OUT/.cellray (the commit records, kept beside the AnnData on purpose) is expected."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*autosharding.*")
        warnings.filterwarnings("ignore", message="Consolidated metadata is currently not part")
        warnings.filterwarnings("ignore", message=r"Object at \.cellray is not recognized")
        yield


class PartsOutput:
    """An AnnData zarr directory being written in parts (the driver's and the writers' view of it)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.meta_dir = self.root / META_DIR
        self.records = self.meta_dir / "parts"
        self.tmp = self.meta_dir / "tmp"
        self._array_meta: dict[str, dict[str, Any]] = {}
        self._categories: dict[str, list] = {}

    # -- the run record

    def read_run(self) -> dict[str, Any] | None:
        try:
            return json.loads((self.meta_dir / RUN_FILE).read_text())
        except FileNotFoundError:
            return None
        except ValueError as e:
            raise InferError(
                f"{self.meta_dir / RUN_FILE}: unreadable run record ({e}); pass --overwrite to start over"
            ) from None

    def write_run(self, run: dict[str, Any]) -> None:
        write_text_atomically(self.meta_dir / RUN_FILE, json.dumps(run, indent=1))

    # -- the skeleton (driver)

    def create(self, layout: Layout, obs_template: pd.DataFrame, obsm: dict[str, tuple[int, str]]) -> list[str]:
        """Write the AnnData group with every per-cell array sized for the whole store and chunked by part, but no
        data. `obs_template`: the obs columns with their final dtypes (rows are ignored); `obsm`: name ->
        (width, dtype). Returns the per-cell array paths a part writes."""
        import anndata as ad
        import zarr

        self.reset()
        g = zarr.open_group(str(self.root), mode="a", zarr_format=3)
        g.attrs.update({"encoding-type": "anndata", "encoding-version": "0.1.0"})
        with quiet_zarr():
            ad.io.write_elem(g, "obs", obs_template.iloc[:0])
            ad.io.write_elem(g, "var", pd.DataFrame(index=pd.Index([], dtype=str)))
            for key in ("obsm", "layers", "obsp", "varm", "varp", "uns"):
                ad.io.write_elem(g, key, {})
        rows = [f"obs/{p}" for p in _obs_row_arrays(g["obs"])]
        for path in rows:
            self._resize(path, layout)
        for name, (width, dtype) in obsm.items():
            g.create_array(
                f"obsm/{name}",
                shape=(layout.n_cells, width),
                chunks=(layout.part_cells, width),
                dtype=dtype,
                attributes=ARRAY_ATTRS,
            )
            rows.append(f"obsm/{name}")
        return rows

    def reset(self) -> None:
        """Remove everything of an earlier run: arrays, records, temporaries (the driver holds the writer lock)."""
        for child in self.root.iterdir() if self.root.is_dir() else ():
            remove(child)

    def _resize(self, path: str, layout: Layout) -> None:
        """An empty per-cell array written by anndata, given the whole store's length and one chunk per part."""
        meta_file = self.root / path / "zarr.json"
        meta = json.loads(meta_file.read_text())
        if meta.get("chunk_grid", {}).get("name") != "regular" or len(meta["shape"]) != 1:
            raise InferError(f"{self.root / path}: unexpected array layout {meta.get('chunk_grid')}")
        meta["shape"] = [layout.n_cells]
        meta["chunk_grid"]["configuration"]["chunk_shape"] = [layout.part_cells]
        meta_file.write_text(json.dumps(meta, indent=2))
        for child in (self.root / path).iterdir():  # chunk files of the 0-row template, if any
            if child.name != "zarr.json":
                shutil.rmtree(child) if child.is_dir() else child.unlink()

    def finish(self, uns: dict[str, Any]) -> None:
        """Write uns (after every part is committed) and drop the temporaries; records stay as provenance."""
        import anndata as ad
        import zarr

        g = zarr.open_group(str(self.root), mode="r+")
        with quiet_zarr():
            ad.io.write_elem(g, "uns", uns)
        shutil.rmtree(self.tmp, ignore_errors=True)
        for orphan in temporaries_in(self.records):  # a writer lost mid-commit: its part was redone by another
            orphan.unlink(missing_ok=True)

    # -- records (driver)

    def committed(self, fingerprint: str) -> dict[int, dict[str, Any]]:
        """Parts with a valid commit record of this run."""
        done: dict[int, dict[str, Any]] = {}
        for f in self.records.glob("*.json") if self.records.is_dir() else ():
            try:
                rec = json.loads(f.read_text())
            except ValueError:
                continue  # records are written atomically; an unreadable one is redone
            if rec.get("fingerprint") == fingerprint and f.stem == f"{rec.get('part', -1):05d}":
                done[int(rec["part"])] = rec
        return done

    def clean(self, todo: list[int], rows: list[str]) -> int:
        """Remove orphans before parts `todo` are (re)done: every temporary of a killed writer (its part's files
        and its half-written record), stray temporaries of zarr's own writes, and the chunk files of uncommitted
        parts. Returns how many were removed."""
        removed = 0
        if self.tmp.is_dir():
            for d in self.tmp.iterdir():
                shutil.rmtree(d, ignore_errors=True) if d.is_dir() else d.unlink(missing_ok=True)
                removed += 1
        for orphan in temporaries_in(self.records):  # half-written commit records
            orphan.unlink(missing_ok=True)
            removed += 1
        for path in rows:
            meta = self.array_meta(path)
            for part in todo:
                chunk = self.root / path / _chunk_key(meta, part)
                if chunk.exists():
                    chunk.unlink()
                    removed += 1
            for partial in (self.root / path).rglob("*.partial"):  # zarr's own temporaries
                partial.unlink(missing_ok=True)
                removed += 1
        if removed:
            log.info("%s: removed %d orphan(s) of an earlier run", self.root, removed)
        return removed

    # -- writing a part (writers)

    def array_meta(self, path: str) -> dict[str, Any]:
        if path not in self._array_meta:
            self._array_meta[path] = json.loads((self.root / path / "zarr.json").read_text())
        return self._array_meta[path]

    def obs_arrays(self, obs: pd.DataFrame) -> dict[str, np.ndarray]:
        """The obs rows of a part as the per-cell arrays of the skeleton's obs encoding (categorical codes in the
        skeleton's categories, strings, numbers, nullable values + mask)."""
        import zarr

        group = zarr.open_group(str(self.root / "obs"), mode="r")
        out = {f"obs/{group.attrs['_index']}": np.asarray(obs.index.astype(str), dtype=object)}
        for col in group.attrs["column-order"]:
            enc = group[col].attrs.get("encoding-type")
            values = obs[col]
            if enc == "categorical":
                if col not in self._categories:
                    self._categories[col] = list(group[col]["categories"][:])
                values = values.astype(object).where(values.notna(), None)
                out[f"obs/{col}/codes"] = pd.Categorical(values, categories=self._categories[col]).codes
            elif enc in ("nullable-integer", "nullable-boolean", "nullable-string-array"):
                out[f"obs/{col}/mask"] = values.isna().to_numpy()
                fill = "" if enc == "nullable-string-array" else 0
                out[f"obs/{col}/values"] = values.fillna(fill).to_numpy(dtype=object if fill == "" else None)
            elif enc == "string-array":
                out[f"obs/{col}"] = np.asarray(values.astype(str), dtype=object)
            else:
                out[f"obs/{col}"] = values.to_numpy()
        return out

    def write_part(
        self, part: int, layout: Layout, arrays: dict[str, np.ndarray], record: dict[str, Any], before_commit=None
    ) -> dict[str, Any]:
        """Write, rename and commit one part. `arrays`: every per-cell array path -> this part's rows."""
        import zarr

        start, stop = layout.bounds(part)
        tmp = self.tmp / f"{part:05d}.{uuid.uuid4().hex[:8]}"
        for path, values in arrays.items():
            meta = dict(self.array_meta(path))
            if len(values) != stop - start:
                raise InferError(f"{self.root}: part {part} has {len(values)} rows of {path}, expected {stop - start}")
            meta["shape"] = [stop - start, *meta["shape"][1:]]
            d = tmp / path
            d.mkdir(parents=True)
            (d / "zarr.json").write_text(json.dumps(meta))
            arr = zarr.open_array(str(d), mode="r+")
            arr[...] = values.astype(arr.dtype) if values.dtype != object else values
        for path in arrays:
            meta = self.array_meta(path)
            src = tmp / path / _chunk_key(meta, 0)
            dst = self.root / path / _chunk_key(meta, part)
            if src.exists():
                dst.parent.mkdir(parents=True, exist_ok=True)
                os.replace(src, dst)
            else:  # zarr writes no chunk that is all fill value: neither may the final array hold one
                dst.unlink(missing_ok=True)
        if before_commit is not None:
            before_commit()
        record = {**record, "part": part, "start": start, "stop": stop, "rows": stop - start, "committed": time.time()}
        write_text_atomically(self.records / f"{part:05d}.json", json.dumps(record))
        shutil.rmtree(tmp, ignore_errors=True)
        return record


def _chunk_key(meta: dict[str, Any], part: int) -> str:
    """The file of chunk `part` (along cells; other dims have one chunk) under the array's directory."""
    coords = [part] + [0] * (len(meta["shape"]) - 1)
    enc = meta.get("chunk_key_encoding", {"name": "default"})
    sep = enc.get("configuration", {}).get("separator", "/" if enc["name"] == "default" else ".")
    key = sep.join(map(str, coords))
    return f"c{sep}{key}" if enc["name"] == "default" else key


def _obs_row_arrays(obs_group) -> list[str]:
    """The per-cell arrays of an anndata dataframe group (not the categories of categoricals)."""
    paths = [obs_group.attrs["_index"]]
    for col in obs_group.attrs["column-order"]:
        enc = obs_group[col].attrs.get("encoding-type")
        if enc == "categorical":
            paths.append(f"{col}/codes")
        elif enc in ("nullable-integer", "nullable-boolean", "nullable-string-array"):
            paths += [f"{col}/values", f"{col}/mask"]
        else:
            paths.append(col)
    return paths


# ------------------------------------------------------------------------------------------------ finished outputs


def _committed_run(out: ObjectPath) -> dict[str, Any] | None:
    """The run record of a committed embed output in a bucket (its root zarr.json is written last)."""
    if not exists(out / "zarr.json"):
        return None
    return json.loads(read_bytes(out / META_DIR / RUN_FILE))


def finished_output(out: Path | ObjectPath) -> dict[str, Any] | None:
    """{fingerprint, dim, predicts} of a finished output at `out` (None: not a finished cellray output)."""
    import anndata as ad

    try:
        if isinstance(out, ObjectPath) or out.suffix != ".h5ad":
            run = _committed_run(out) if isinstance(out, ObjectPath) else PartsOutput(out).read_run()
            if not run or not run.get("complete"):
                return None
            uns = {"fingerprint": run["fingerprint"], "label_key": (run.get("head") or {}).get("label_key")}
            dim = run["widths"][OBSM_KEY]
        else:
            import h5py

            with h5py.File(out, "r") as f:
                uns = ad.io.read_elem(f["uns/cellray"])
                dim = f["obsm"][OBSM_KEY].shape[1]
        return {"fingerprint": str(uns["fingerprint"]), "dim": int(dim), "predicts": uns.get("label_key")}
    except (OSError, KeyError, ValueError, CellrayError):
        return None


def is_embed_output(out: Path | ObjectPath) -> bool:
    """Whether `out` is an output of cellray embed (what --overwrite may replace)."""
    if isinstance(out, ObjectPath):
        return exists(out / META_DIR / RUN_FILE)
    if out.suffix == ".h5ad" and out.is_file():
        import h5py

        try:
            with h5py.File(out, "r") as f:
                return "uns/cellray/fingerprint" in f
        except OSError:
            return False
    return (out / ".cellray" / "run.json").is_file()
