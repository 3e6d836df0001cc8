"""Out-of-core ingest of .h5ad / AnnData .zarr inputs into a cellray store.

Two passes, both Ray tasks, peak memory bounded by the shard size rather than the input size:

1. scatter: each task reads a contiguous range of one input in blocks of `read_cells` cells, validates the
   counts, remaps genes onto the store vocabulary, gives every cell its position in the store (a seeded
   Feistel permutation of all cells, or the input order with `shuffle=False`) and appends the cells to the
   bucket file of the shard that position falls in;
2. write: each task loads one bucket (one shard's cells), orders it by position and writes the shard.

The store is built under a temporary name beside `out` and renamed into place when complete, so a failed
ingest leaves nothing at `out`. An `out` in a bucket (s3://, gs://, az://) is built in a local staging directory:
each shard is uploaded as soon as it is written (and its local copy dropped), then the rest, the root zarr.json
with the manifest last, which commits the store (`engine.objects.tree_writer`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import scipy.sparse as sp
from pydantic import Field

from engine.atomic import replace_atomically, temporary_sibling, writer_lock
from engine.config import Config
from engine.errors import InputError
from engine.objects import ObjectPath, is_uri, location, store_path, tree_writer, upload_tree
from engine.progress import Progress, silent
from engine.runtime import Executor, choose_local, map_tasks, peak_rss_sampler, ray_session
from engine.store.csr import gather_csr
from engine.store.format import (
    DEFAULT_CHUNK_ELEMENTS,
    Codec,
    Manifest,
    Store,
    is_store,
    smallest_uint,
)
from engine.store.permutation import FeistelPermutation
from engine.store.sources import Source, build_vocabulary, check_source, validate_counts
from engine.store.write import write_root, write_shard

log = logging.getLogger(__name__)


class IngestConfig(Config):
    error: ClassVar[type[Exception]] = InputError

    vocab: str = "union"  # union | intersection | path of a file of gene ids (one per line, or first CSV column)
    obs_keys: tuple[str, ...] = ()  # obs columns to keep; `dataset` and `obs_name` are always added
    layer: str | None = None  # take counts from adata.layers[layer] instead of X
    shuffle: bool = True
    seed: int = 0
    shard_cells: int | None = Field(None, gt=0)  # cells per shard; default derived from shard_bytes
    shard_bytes: int = Field(128 * 2**20, ge=2**20)  # uncompressed bytes of X per shard (data + indices)
    read_cells: int = 8192  # cells per read in the scatter pass
    allow_non_integer: bool = False
    overwrite: bool = False
    codec: Codec = Field(default_factory=Codec)
    chunk_elements: int = Field(DEFAULT_CHUNK_ELEMENTS, gt=0)  # values per compressed chunk of X/data and X/indices
    address: str | None = None  # Ray cluster; None = embedded local Ray
    # "ray": tasks on Ray; "local": the same tasks one after another in this process (no Ray start-up);
    # "auto": engine.runtime.choose_executor on the inputs' bytes of X
    executor: Executor = "auto"


# ------------------------------------------------------------------------------------------------ pass 1


@dataclass(frozen=True)
class ScatterTask:
    """Pass 1's work on rows [start, stop) of one input: what `scatter_range` needs, picklable for a Ray task."""

    path: str
    layer: str | None
    input_id: int
    start: int
    stop: int
    global_offset: int  # the input's first cell among all inputs' cells
    obs: pd.DataFrame  # the kept obs columns of these rows
    gene_map: np.ndarray  # input gene -> vocabulary position (-1: dropped)
    n_genes: int
    n_cells_total: int
    shard_cells: int
    scatter_dir: str
    config: IngestConfig


def scatter_range(task: ScatterTask) -> dict[str, Any]:
    """Pass 1 for rows [start, stop) of one input: validate, remap, and append cells to their shard buckets."""
    t, config = task, task.config
    path, start, stop, gene_map, n_genes = t.path, t.start, t.stop, t.gene_map, t.n_genes
    source = Source(Path(path), t.layer, annotations=False)
    rss = peak_rss_sampler()  # after opening: measures the working set, not imports and obs/var
    permute = FeistelPermutation(t.n_cells_total, config.seed) if config.shuffle else None
    files: dict[int, Any] = {}
    max_value, nnz, integer = 0.0, 0, True
    try:
        for a in range(start, stop, config.read_cells):
            b = min(stop, a + config.read_cells)
            block = source.read_rows(a, b)
            block.sum_duplicates()
            validate_counts(block, path, source.field, a, config.allow_non_integer)
            if block.nnz and (block.indices.min() < 0 or block.indices.max() >= len(gene_map)):
                bad = np.flatnonzero((block.indices < 0) | (block.indices >= len(gene_map)))[0]
                raise InputError(
                    f"{path}: field '{source.field}' has gene index {int(block.indices[bad])} at row "
                    f"{a + int(np.searchsorted(block.indptr, bad, side='right') - 1)}, outside [0, {len(gene_map)}) "
                    "(its var has that many genes): a corrupt sparse matrix"
                )
            # remap genes onto the vocabulary; drop genes it lacks; restore sorted indices within rows
            new_idx = gene_map[block.indices]
            keep = new_idx >= 0
            rows_of = np.repeat(np.arange(b - a), np.diff(block.indptr))
            counts = np.bincount(rows_of[keep], minlength=b - a)
            remapped = sp.csr_matrix(
                (block.data[keep], new_idx[keep], np.concatenate([[0], np.cumsum(counts)])), shape=(b - a, n_genes)
            )
            remapped.has_sorted_indices = False
            remapped.sort_indices()
            remapped.eliminate_zeros()
            if remapped.nnz:
                max_value = max(max_value, float(remapped.data.max()))
                integer = integer and bool(np.all(remapped.data == np.floor(remapped.data)))
            nnz += remapped.nnz
            gid = np.arange(t.global_offset + a, t.global_offset + b, dtype=np.int64)
            pos = permute(gid) if permute is not None else gid
            bucket = pos // t.shard_cells
            obs_block = t.obs.iloc[a - start : b - start]
            order = np.argsort(bucket, kind="stable")
            cuts = np.flatnonzero(np.diff(bucket[order])) + 1
            for rows in np.split(order, cuts):
                k = int(bucket[rows[0]])
                part = remapped[rows]
                if k not in files:
                    d = Path(t.scatter_dir) / f"{k:05d}"
                    d.mkdir(parents=True, exist_ok=True)
                    files[k] = open(d / f"{t.input_id:05d}_{start:012d}.pkl", "wb")
                pickle.dump(
                    {
                        "pos": pos[rows],
                        "indptr": part.indptr.astype(np.int64),
                        "indices": part.indices.astype(np.uint32),
                        "data": part.data.astype(np.float32),
                        "obs": obs_block.iloc[rows],
                    },
                    files[k],
                    protocol=5,
                )
    finally:
        for f in files.values():
            f.close()
        source.close()
    return {"n_cells": stop - start, "nnz": nnz, "max_value": max_value, "integer": integer, "peak_rss": rss()}


# ------------------------------------------------------------------------------------------------ pass 2


def write_bucket(
    tmp_store: str,
    scatter_dir: str,
    shard_id: int,
    gene_ids: pd.Index,
    obs_columns: dict[str, Any],
    count_dtype: str,
    index_dtype: str,
    config: IngestConfig,
    upload_to: str | None = None,
) -> dict[str, Any]:
    """Pass 2 for one shard: load its bucket, order by position, write the AnnData shard (and, for a store in a
    bucket, upload it to `upload_to` and drop the local copy)."""
    import zarr

    # load the gather kernel for these dtypes first, so the sampler measures data, not the JIT's one-time cost
    gather_csr(
        np.zeros(1, np.int64),
        np.empty(0, np.uint32),
        np.empty(0, np.float32),
        np.empty(0, np.int64),
        np.dtype(count_dtype),
        np.dtype(index_dtype),
    )
    rss = peak_rss_sampler()
    bucket = Path(scatter_dir) / f"{shard_id:05d}"
    parts = []
    for f in sorted(bucket.iterdir()):
        with open(f, "rb") as fh:
            while True:
                try:
                    parts.append(pickle.load(fh))
                except EOFError:
                    break
    # Move the fragments into one flat CSR, dropping each as it is copied (memory stays ~1x the bucket),
    # then gather the rows in store order straight into the stored dtypes.
    nnz = sum(len(p["data"]) for p in parts)
    data, indices = np.empty(nnz, dtype=np.float32), np.empty(nnz, dtype=np.uint32)
    o = 0
    for p in parts:
        k = len(p["data"])
        data[o : o + k], indices[o : o + k] = p.pop("data"), p.pop("indices")
        o += k
    lengths = np.concatenate([np.diff(p["indptr"]) for p in parts])
    order = np.argsort(np.concatenate([p["pos"] for p in parts]), kind="stable")
    indptr, indices, data = gather_csr(
        np.concatenate([[0], np.cumsum(lengths)]), indices, data, order, np.dtype(count_dtype), np.dtype(index_dtype)
    )
    obs_df = pd.concat([p["obs"] for p in parts], axis=0).iloc[order]
    del parts
    for col, schema in obs_columns.items():
        if "categories" in schema:  # categories are strings (`_obs_schema`): so are the values, whatever their input
            values = obs_df[col].astype(object)
            values = values.where(values.isna(), values.map(str))
            obs_df[col] = pd.Categorical(values, categories=schema["categories"])
    obs_df.index = obs_df.index.astype(str)
    root = zarr.open_group(tmp_store, mode="a")
    info = write_shard(root, shard_id, indptr, indices, data, obs_df, gene_ids, config.codec, config.chunk_elements)
    shutil.rmtree(bucket, ignore_errors=True)
    if upload_to is not None:
        upload_tree(Path(tmp_store) / info.path, location(upload_to) / info.path)
        shutil.rmtree(Path(tmp_store) / info.path)
    return {"info": info, "peak_rss": rss()}


# ------------------------------------------------------------------------------------------------ driver


def _obs_for(source: Source, dataset: str, obs_keys: Sequence[str]) -> pd.DataFrame:
    obs = pd.DataFrame(index=source.obs.index.astype(str))
    obs["dataset"] = dataset
    obs["obs_name"] = obs.index.values
    for key in obs_keys:
        obs[key] = source.obs[key].values if key in source.obs.columns else pd.NA
    obs.index = [f"{dataset}:{name}" for name in obs.index]
    return obs


def _obs_schema(
    obs_frames: list[pd.DataFrame], obs_keys: Sequence[str], names: Sequence[str]
) -> dict[str, dict[str, Any]]:
    """Unified dtypes and categories of the kept obs columns across inputs: a column numeric in every input that has
    it stays numeric; any other becomes categorical, its categories (and values) strings, whatever each input held."""
    schema: dict[str, dict[str, Any]] = {"dataset": {}, "obs_name": {"dtype": "string"}}
    for col in ["dataset", *obs_keys]:
        values = [f[col] for f in obs_frames]
        present = [v for v in values if not v.isna().all()]
        is_number = [pd.api.types.is_numeric_dtype(v) and not isinstance(v.dtype, pd.CategoricalDtype) for v in values]
        kinds = {  # input -> what its column holds
            n: "numbers" if number else "text" for n, v, number in zip(names, values, is_number) if not v.isna().all()
        }
        numeric = bool(kinds) and all(k == "numbers" for k in kinds.values())
        if len(set(kinds.values())) > 1:
            log.warning(
                "obs column %r holds numbers in %s and text in %s: stored as categories (strings) for all",
                col, [n for n, k in kinds.items() if k == "numbers"], [n for n, k in kinds.items() if k == "text"],
            )  # fmt: skip
        if numeric and col != "dataset":
            schema[col] = {
                "dtype": "float64"
                if any(v.isna().any() for v in values) or any(v.dtype.kind == "f" for v in present)
                else str(np.result_type(*[v.dtype for v in present]))
            }
        else:
            cats: list[str] = []
            seen: set[str] = set()
            for v in present:
                uniq = v.cat.categories if isinstance(v.dtype, pd.CategoricalDtype) else pd.unique(v.dropna())
                for c in map(str, uniq):
                    if c not in seen:
                        seen.add(c)
                        cats.append(c)
            schema[col] = {"dtype": "category", "categories": cats}
    return schema


def _unique_names(paths: Sequence[Path]) -> list[str]:
    names, seen = [], {}
    for p in paths:
        stem = p.name.removesuffix(".h5ad").removesuffix(".zarr")
        seen[stem] = seen.get(stem, 0) + 1
        names.append(stem if seen[stem] == 1 else f"{stem}_{seen[stem]}")
    return names


@dataclass(frozen=True)
class IngestReport:
    seconds: float
    peak_task_rss_growth: int  # bytes: the largest working set of one scatter or write task
    tasks: list[dict[str, Any]]  # each task's own record (cells, nnz, peak RSS, shard info)


@dataclass(frozen=True)
class IngestResult:
    store: Store  # the new store, opened
    report: IngestReport


@dataclass(frozen=True)
class _Inputs:
    """The inputs as the two passes see them: opened once, the vocabulary and obs schema unified."""

    sources: list[Source]
    names: list[str]  # each input's dataset name
    var: pd.DataFrame  # the store's vocabulary
    gene_maps: list[np.ndarray]
    obs_frames: list[pd.DataFrame]
    schema: dict[str, dict[str, Any]]
    n_cells: int
    nnz_estimate: int


def ingest(
    inputs: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    config: IngestConfig = IngestConfig(),
    progress: Progress | None = None,
) -> IngestResult:
    """Ingest `inputs` into a new store at `out`; returns it opened, with a report. See the module docstring.

    `out` is locked while it is written (a second ingest to it fails at once); with `overwrite`, an existing
    `out` is replaced only if it is a cellray store. `out` may be a URI (see the module docstring)."""
    out = store_path(out)
    if not inputs:
        raise InputError("no inputs given")
    for p in inputs:
        if is_uri(p):
            raise InputError(f"{p}: inputs are read from local files (.h5ad, AnnData .zarr): copy it here first")
    if isinstance(out, ObjectPath):
        with tree_writer(out, "zarr.json", config.overwrite, replaceable=is_store) as local:
            report = _ingest(inputs, local, config, progress or silent, upload_to=out)
        return IngestResult(Store.open(out), report)
    if out.exists() and not config.overwrite:
        raise InputError(f"{out}: output already exists (pass --overwrite to replace it)")
    if out.exists() and not is_store(out):
        raise InputError(f"{out}: exists and is not a cellray store: --overwrite replaces only a store")
    with writer_lock(out):
        report = _ingest(inputs, out, config, progress or silent)
    return IngestResult(Store.open(out), report)


def _open_inputs(paths: Sequence[Path], config: IngestConfig) -> _Inputs:
    """Open every input, skip empty ones, build one vocabulary and one obs schema; the sources are closed again."""
    sources: list[Source] = []
    for p in paths:
        s = Source(p, config.layer)
        if s.n_obs == 0:
            log.warning("%s: has zero cells; skipped", p)
            s.close()
            continue
        sources.append(s)
    if not sources:
        raise InputError(f"inputs {[str(p) for p in paths]}: every input has zero cells")
    names = _unique_names([s.path for s in sources])
    var = build_vocabulary(sources, config.vocab)
    gene_maps = [check_source(s, var.index, config.obs_keys) for s in sources]
    for key in config.obs_keys:
        if not any(key in s.obs.columns for s in sources):
            columns = sorted({c for s in sources for c in s.obs.columns})
            raise InputError(f"--obs {key}: no input has an obs column {key!r} (their columns: {columns})")
    obs_frames = [_obs_for(s, n, config.obs_keys) for s, n in zip(sources, names)]
    inputs = _Inputs(
        sources=sources,
        names=names,
        var=var,
        gene_maps=gene_maps,
        obs_frames=obs_frames,
        schema=_obs_schema(obs_frames, config.obs_keys, names),
        n_cells=sum(s.n_obs for s in sources),
        nnz_estimate=sum(s.nnz_estimate for s in sources),
    )
    for s in sources:
        s.close()
    return inputs


def _scatter_tasks(inputs: _Inputs, shard_cells: int, scatter_dir: Path, config: IngestConfig) -> list[ScatterTask]:
    """One scatter task per ~shard of input rows: enough parallelism, few bucket files."""
    tasks, offset = [], 0
    for i, s in enumerate(inputs.sources):
        for a in range(0, s.n_obs, shard_cells):
            b = min(s.n_obs, a + shard_cells)
            tasks.append(
                ScatterTask(
                    path=str(s.path),
                    layer=config.layer,
                    input_id=i,
                    start=a,
                    stop=b,
                    global_offset=offset,
                    obs=inputs.obs_frames[i].iloc[a:b],
                    gene_map=inputs.gene_maps[i],
                    n_genes=len(inputs.var),
                    n_cells_total=inputs.n_cells,
                    shard_cells=shard_cells,
                    scatter_dir=str(scatter_dir),
                    config=config,
                )
            )
        offset += s.n_obs
    return tasks


def _ingest(
    paths: Sequence[str | os.PathLike],
    out: Path,
    config: IngestConfig,
    progress: Progress,
    upload_to: ObjectPath | None = None,
) -> IngestReport:
    import zarr

    t0 = time.perf_counter()
    inputs = _open_inputs([Path(p) for p in paths], config)
    gene_ids = inputs.var.index
    n_total = inputs.n_cells
    index_dtype = smallest_uint(max(len(gene_ids) - 1, 0))
    if index_dtype.itemsize < 2:
        index_dtype = np.dtype(np.uint16)
    bytes_per_cell = max(1.0, inputs.nnz_estimate / n_total * (4 + index_dtype.itemsize))
    shard_cells = min(config.shard_cells or max(1024, int(config.shard_bytes / bytes_per_cell)), n_total)
    n_shards = -(-n_total // shard_cells)
    cfg = config.model_copy(update={"read_cells": max(64, min(config.read_cells, shard_cells))})
    log.info(
        "ingest %d cells x %d genes from %d input(s) into %d shard(s)",
        n_total, len(gene_ids), len(inputs.sources), n_shards,
    )  # fmt: skip
    local = choose_local(config.executor, config.address, inputs.nnz_estimate * (4 + index_dtype.itemsize))
    log.info("executor: %s", "local" if local else "ray")

    tmp = temporary_sibling(out.resolve())
    scatter_dir = tmp / "_scatter"
    scatter_dir.mkdir(parents=True)
    try:
        with contextlib.nullcontext() if local else ray_session(config.address):
            tasks = _scatter_tasks(inputs, shard_cells, scatter_dir, cfg)
            results = list(
                map_tasks(scatter_range, [(t,) for t in tasks], local=local, stage="scatter", progress=progress)
            )
            integer = all(r["integer"] for r in results)
            count_dtype = smallest_uint(int(max(r["max_value"] for r in results))) if integer else np.dtype(np.float32)
            if count_dtype.itemsize < 2:
                count_dtype = np.dtype(np.uint16)
            root = zarr.open_group(str(tmp), mode="a", zarr_format=3)
            calls = [
                (
                    str(tmp),
                    str(scatter_dir),
                    k,
                    gene_ids,
                    inputs.schema,
                    count_dtype.str,
                    index_dtype.str,
                    cfg,
                    None if upload_to is None else str(upload_to),
                )
                for k in range(n_shards)
            ]
            written = list(map_tasks(write_bucket, calls, local=local, stage="write", progress=progress))
        shutil.rmtree(scatter_dir, ignore_errors=True)
        manifest = Manifest(
            n_cells=n_total,
            n_genes=len(gene_ids),
            count_dtype=count_dtype.name,
            index_dtype=index_dtype.name,
            codec=config.codec,
            chunk_elements=config.chunk_elements,
            shards=[w["info"] for w in written],
            obs_schema=inputs.schema,
            provenance=[
                {"path": str(s.path.resolve()), "dataset": n, "n_cells": s.n_obs, "field": s.field}
                for s, n in zip(inputs.sources, inputs.names)
            ],
            shuffle={"shuffled": config.shuffle, "seed": config.seed},
        )
        write_root(root, manifest, inputs.var)
        replace_atomically(tmp, out, overwrite=config.overwrite, replaceable=is_store)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    elapsed = time.perf_counter() - t0
    peak = max(r["peak_rss"] for r in results + written)
    log.info(
        "ingested %d cells in %.1f s (%.0f cells/s); peak task RSS growth %.0f MB",
        n_total, elapsed, n_total / elapsed, peak / 2**20,
    )  # fmt: skip
    return IngestReport(elapsed, peak, results + written)
