"""One-pass gene statistics of a store, split over Ray tasks and merged exactly, stored inside the store.

Per gene: n, mean and variance (float64, per block then merged with Chan et al.'s parallel formula, so the
result does not depend on how the cells were split), nnz, for the counts and for normalize_total(target_sum)
and its log1p; the median of normalized non-zero values (for Geneformer rank tokens) from log-spaced
histograms with a stated relative error bound; a per-cell library size summary (exact median from integer
library histograms); highly variable genes with scanpy's flavors (seurat, cell_ranger, seurat_v3 with its
second pass over clipped counts), with or without a batch key.

Stored as ``STORE/stats`` (a zarr group: attrs["cellray_stats"] plus a `genes` AnnData dataframe), written
under a temporary name and renamed into place. `load_stats(store)` reads it back as a `GeneStats`.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import time
import warnings
import zlib
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
from pydantic import model_validator

from engine.atomic import atomic_path, remove, replace_atomically, temporary_sibling, writer_lock
from engine.config import Config
from engine.errors import StatsError
from engine.objects import ObjectPath, is_uri, tree_writer
from engine.preprocess import kernels, stats_kernels
from engine.preprocess.hvg import hvg_dispersion, seurat_v3_clip, seurat_v3_select
from engine.preprocess.moments import Moments, merge_counts
from engine.progress import Progress
from engine.runtime import Executor, choose_local, map_tasks, ray_cpus, ray_session
from engine.store.format import Store, open_group, root_metadata

log = logging.getLogger(__name__)

STATS_DIR = "stats"
STATS_KEY = "cellray_stats"
STATS_VERSION = 1
LAYERS = ("counts", "norm", "lognorm", "seurat")  # seurat: expm1(lognorm), what scanpy's seurat flavor reads
FLAVORS = ("seurat_v3", "seurat", "cell_ranger")


class StatsConfig(Config):
    error: ClassVar[type[Exception]] = StatsError

    target_sum: float = 1e4  # normalize_total target of the `norm`/`lognorm` layers and the medians
    hvg: int | None = None  # number of highly variable genes (None: no HVG selection)
    flavor: str = "seurat_v3"  # seurat_v3 (on counts) | seurat (on log-normalized) | cell_ranger (on normalized)
    batch_key: str | None = None  # obs column: HVG per batch, combined as scanpy does
    span: float = 0.3  # seurat_v3 loess span
    n_bins: int = 20  # seurat / cell_ranger mean bins
    block_cells: int = 32768  # at most this many cells per task (fewer, so that every CPU gets work)
    executor: Executor = "auto"  # ray | local (in this process) | auto: see engine.runtime.choose_executor
    address: str | None = None  # Ray cluster; None = embedded local Ray

    @model_validator(mode="after")
    def _check(self) -> StatsConfig:
        if not self.target_sum > 0:
            raise ValueError(f"target_sum must be > 0, got {self.target_sum}")
        if self.flavor not in FLAVORS:
            raise ValueError(f"unknown HVG flavor {self.flavor!r}; expected one of {', '.join(FLAVORS)}")
        if self.hvg is not None and self.hvg < 1:
            raise ValueError(f"--hvg must be a positive number of genes, got {self.hvg}")
        return self


@dataclass
class GeneStats:
    """Statistics of a store, as `load_stats` returns them. `genes` has one row per vocabulary gene."""

    where: str
    n_cells: int
    target_sum: float
    genes: pd.DataFrame  # index gene ids; mean/var/nnz (counts), norm_*/lognorm_*, median, HVG columns
    library: dict[str, Any]  # per-cell library size summary (counts), per batch under "by_batch"
    hvg: dict[str, Any] | None  # {"n_top_genes", "flavor", "batch_key"} or None
    median_rel_error: float
    fingerprint: str = ""

    @property
    def mean(self) -> np.ndarray:
        return self.genes["mean"].to_numpy()

    @property
    def var(self) -> np.ndarray:
        return self.genes["var"].to_numpy()

    @property
    def nnz(self) -> np.ndarray:
        return self.genes["nnz"].to_numpy()

    @property
    def median(self) -> np.ndarray:
        """Median of normalize_total(target_sum) non-zero values per gene (0 for genes never seen)."""
        return self.genes["median"].to_numpy()

    @property
    def highly_variable(self) -> np.ndarray | None:
        return self.genes["highly_variable"].to_numpy(dtype=bool) if "highly_variable" in self.genes else None

    @property
    def library_median(self) -> float:
        return float(self.library["median"])

    def moments(self, layer: str) -> tuple[np.ndarray, np.ndarray]:
        """(mean, variance with ddof=1) of a layer: counts | norm | lognorm."""
        prefix = "" if layer == "counts" else f"{layer}_"
        if f"{prefix}mean" not in self.genes:
            raise StatsError(f"{self.where}: no statistics of layer {layer!r}; layers: counts, norm, lognorm")
        return self.genes[f"{prefix}mean"].to_numpy(), self.genes[f"{prefix}var"].to_numpy()

    def table(self) -> pd.DataFrame:
        """The per-gene table with `gene_id` as first column, in vocabulary order (what --export writes)."""
        df = self.genes.copy()
        df.insert(0, "gene_id", df.index.astype(str))
        return df.reset_index(drop=True)


# ----------------------------------------------------------------------------------------------- Ray tasks


def _fingerprint(store: Store) -> str:
    """Identifies the store's content: stats of another content are stale."""
    s = json.dumps([(sh.path, sh.n_cells, sh.checksum) for sh in store.manifest.shards] + [store.n_genes])
    return f"crc32:{zlib.crc32(s.encode()):08x}"


def _group_codes(store: Store, shard: int, start: int, stop: int, batch_key: str | None) -> tuple[np.ndarray, int]:
    if batch_key is None:
        return np.zeros(stop - start, dtype=np.int64), 1
    cats = store.manifest.obs_schema[batch_key].get("categories")
    if cats is None:
        raise StatsError(f"{store.path}: obs column {batch_key!r} is not categorical; a batch key must be")
    codes = store.obs_codes(shard, batch_key)[start:stop]
    if (codes < 0).any():
        raise StatsError(
            f"{store.path}/shards/{shard:05d}: obs {batch_key!r} has missing values; every cell needs a batch"
        )
    return codes, len(cats)


def _pass1(
    store_path: str, shard: int, start: int, stop: int, batch_key: str | None, target: float, layers: np.ndarray
) -> dict[str, Any]:
    """Moments, nnz, coarse median histograms and library sizes of one block of cells."""
    store = Store.open(store_path)
    block = store.read_csr(shard, start, stop)
    groups, n_groups = _group_codes(store, shard, start, stop, batch_key)
    G = store.n_genes
    t32 = float(np.float32(target))
    sums = np.zeros((len(LAYERS), n_groups, G))
    nnz = np.zeros((n_groups, G), dtype=np.int64)
    coarse = np.zeros((G, stats_kernels.MED_COARSE), dtype=np.uint16)  # a block has < 2^16 cells
    stats_kernels.accumulate_moments(block.indptr, block.indices, block.data, groups, t32, layers, sums, nnz, coarse)
    n = np.bincount(groups, minlength=n_groups).astype(np.int64)
    mean = sums / np.maximum(n, 1)[None, :, None]
    m2 = np.zeros_like(mean)
    stats_kernels.accumulate_m2(block.indptr, block.indices, block.data, groups, t32, layers, mean, m2)
    m2 += (n[None, :, None] - nnz[None]) * mean * mean  # the zeros' share
    lib = kernels.library_sizes(block.indptr, block.data, np.empty(block.n_cells))
    libs = [np.unique(lib[groups == g], return_counts=True) for g in range(n_groups)]
    return {"moments": Moments(n, sums, mean, m2), "nnz": nnz, "coarse": coarse, "library": libs}


def _pass2(
    store_path: str,
    shard: int,
    start: int,
    stop: int,
    batch_key: str | None,
    target: float,
    clip_val: np.ndarray | None,
    med_bins: np.ndarray,
) -> tuple:
    """Fine median histograms in each gene's selected coarse bins, and for seurat_v3 the per (group, gene) sums
    and squared sums of counts clipped at clip_val."""
    store = Store.open(store_path)
    block = store.read_csr(shard, start, stop)
    groups, n_groups = _group_codes(store, shard, start, stop, batch_key)
    do_clip = clip_val is not None
    clip = clip_val if do_clip else np.zeros((1, 1))
    sums = np.zeros_like(clip)
    sq = np.zeros_like(clip)
    fine = np.zeros((store.n_genes, 2, stats_kernels.MED_FINE), dtype=np.uint16)
    stats_kernels.second_pass(
        block.indptr,
        block.indices,
        block.data,
        groups,
        float(np.float32(target)),
        do_clip,
        clip,
        sums,
        sq,
        med_bins,
        fine,
    )
    return sums, sq, fine


def _blocks(store: Store, block_cells: int, n_workers: int) -> list[tuple[int, int, int]]:
    """(shard, start, stop) cell ranges: at most block_cells each, and at least ~2 per worker when cells allow."""
    block_cells = max(1, min(block_cells, 65535, -(-store.n_cells // (2 * n_workers))))
    out = []
    for s, info in enumerate(store.manifest.shards):
        for start in range(0, info.n_cells, block_cells):
            out.append((s, start, min(info.n_cells, start + block_cells)))
    return out


# ----------------------------------------------------------------------------------------------- driver


def _median_bins(coarse: np.ndarray, nnz: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """From the coarse histograms: per gene the coarse bins holding the lower and upper middle non-zeros
    (ranks (n-1)//2 and n//2; -1 for genes never seen) and those ranks counted from the start of their bin."""
    cum = np.cumsum(coarse, axis=1)
    ranks = np.stack([(nnz - 1) // 2, nnz // 2], axis=1)
    bins = np.stack([(cum <= ranks[:, k : k + 1]).sum(axis=1) for k in (0, 1)], axis=1)
    bins = np.minimum(bins, coarse.shape[1] - 1)
    before = np.where(bins > 0, np.take_along_axis(cum, np.maximum(bins - 1, 0), axis=1), 0)
    bins[nnz == 0] = -1
    return bins.astype(np.int64), ranks - before


def _medians(fine: np.ndarray, bins: np.ndarray, rank_in_bin: np.ndarray, target: float) -> np.ndarray:
    """Median of each gene's normalized non-zeros: the centres of the fine bins holding the two middle elements,
    averaged (numpy's median of an even count). Within stats_kernels.MEDIAN_REL_ERROR of the exact value."""
    out = np.zeros(len(bins))
    est = []
    for k in (0, 1):
        cum = np.cumsum(fine[:, k, :], axis=1)
        idx = np.minimum((cum <= rank_in_bin[:, k : k + 1]).sum(axis=1), fine.shape[2] - 1)
        u = bins[:, k] * stats_kernels.MED_W1 + (idx + 0.5) * stats_kernels.MED_W2
        est.append(target * np.exp(-u))
    seen = bins[:, 0] >= 0
    out[seen] = 0.5 * (est[0][seen] + est[1][seen])
    return out


def _library_summary(values: np.ndarray, counts: np.ndarray) -> dict[str, Any]:
    """Exact summary of per-cell library sizes from (value, count) pairs (numpy's median and quantiles)."""
    n = int(counts.sum())
    if n == 0:
        return {"n_cells": 0}
    cum = np.cumsum(counts)

    def at(rank: int) -> float:
        return float(values[np.searchsorted(cum, rank, side="right")])

    def quantile(q: float) -> float:
        vi = (n - 1) * q
        lo = int(math.floor(vi))
        a, b = at(lo), at(min(lo + 1, n - 1))
        return a + (b - a) * (vi - lo)

    mean = float((values * counts).sum() / n)
    pos = values > 0
    logv = np.log(values[pos])
    npos = int(counts[pos].sum())
    log_mean = float((logv * counts[pos]).sum() / max(npos, 1))
    log_var = float((((logv - log_mean) ** 2) * counts[pos]).sum() / max(npos, 1))
    return {
        "n_cells": n,
        "zero_cells": n - npos,
        "min": float(values[0]),
        "max": float(values[-1]),
        "mean": mean,
        "median": quantile(0.5),
        "q05": quantile(0.05),
        "q25": quantile(0.25),
        "q75": quantile(0.75),
        "q95": quantile(0.95),
        "log_mean": log_mean,  # scVI's library prior: mean and variance of log library size
        "log_var": log_var,
    }


def compute_stats(
    store: str | Path | Store, config: StatsConfig = StatsConfig(), progress: Progress | None = None, write: bool = True
) -> GeneStats:
    """Compute a store's statistics on Ray (the cluster at config.address, else an embedded one or the one
    already running), write them into the store atomically (unless `write` is False) and return them."""
    store = store if isinstance(store, Store) else Store.open(store)
    if config.batch_key is not None and config.batch_key not in store.manifest.obs_schema:
        raise StatsError(
            f"{store.path}: --batch-key {config.batch_key!r} is not an obs column; columns: "
            f"{list(store.manifest.obs_schema)}"
        )
    t0 = time.perf_counter()
    layers = np.array([True, True, True, config.hvg is not None and config.flavor == "seurat"])
    local = choose_local(config.executor, config.address, store.x_bytes)
    with contextlib.nullcontext() if local else ray_session(config.address):
        blocks = _blocks(store, config.block_cells, 1 if local else ray_cpus())
        run = functools.partial(map_tasks, local=local, progress=progress, max_retries=2)
        args = [(str(store.path), s, a, b, config.batch_key, config.target_sum, layers) for s, a, b in blocks]
        mom: Moments | None = None
        nnz = None
        coarse = np.zeros((store.n_genes, stats_kernels.MED_COARSE), dtype=np.int64)
        lib_parts: list[list] = []
        for r in run(_pass1, args, stage="stats pass 1"):
            mom = r["moments"] if mom is None else mom.merge(r["moments"])
            nnz = r["nnz"] if nnz is None else nnz + r["nnz"]
            coarse += r["coarse"]
            if not lib_parts:
                lib_parts = [[] for _ in r["library"]]
            for g, part in enumerate(r["library"]):
                lib_parts[g].append(part)
        if mom is None:
            raise StatsError(f"{store.path}: the store has no cells")
        index = store.gene_ids
        tot = mom.total()
        tvar, tmean = tot.var(), tot.means()
        genes = pd.DataFrame(index=pd.Index(index.astype(str), name=None))
        genes["n"] = np.int64(tot.n[0])
        genes["mean"], genes["var"] = tmean[0, 0], tvar[0, 0]
        genes["nnz"] = nnz.sum(axis=0)
        for li, name in ((1, "norm"), (2, "lognorm")):
            genes[f"{name}_mean"], genes[f"{name}_var"] = tmean[li, 0], tvar[li, 0]

        # pass 2: fine median histograms, and seurat_v3's clipped sums
        v3 = config.hvg is not None and config.flavor == "seurat_v3"
        reg_std, clip_val = seurat_v3_clip(mom, config, store.n_genes) if v3 else (None, None)
        med_bins, rank_in_bin = _median_bins(coarse, genes["nnz"].to_numpy())
        args = [
            (str(store.path), s, a, b, config.batch_key, config.target_sum, clip_val, med_bins) for s, a, b in blocks
        ]
        fine = np.zeros((store.n_genes, 2, stats_kernels.MED_FINE), dtype=np.int64)
        csum = csq = 0.0
        for s1, s2, f in run(_pass2, args, stage="stats pass 2"):
            fine += f
            csum, csq = csum + s1, csq + s2
        genes["median"] = _medians(fine, med_bins, rank_in_bin, float(np.float32(config.target_sum)))

        hvg_info = None
        if config.hvg is not None:
            if v3:
                hv = seurat_v3_select(mom, reg_std, csum, csq, config, index)
            else:
                hv = hvg_dispersion(mom, 3 if config.flavor == "seurat" else 1, nnz, config, index)
            hv.index = genes.index
            for c in hv.columns:
                genes[c] = hv[c].to_numpy()
            hvg_info = {"n_top_genes": config.hvg, "flavor": config.flavor, "batch_key": config.batch_key}

    lib_all = merge_counts([p for parts in lib_parts for p in parts])
    library = _library_summary(*lib_all)
    if config.batch_key is not None:
        cats = store.manifest.obs_schema[config.batch_key]["categories"]
        library["by_batch"] = {
            str(cats[g]): _library_summary(*merge_counts(parts)) for g, parts in enumerate(lib_parts) if mom.n[g] > 0
        }
    stats = GeneStats(
        where=str(store.path / STATS_DIR),
        n_cells=int(tot.n[0]),
        target_sum=float(config.target_sum),
        genes=genes,
        library=library,
        hvg=hvg_info,
        median_rel_error=stats_kernels.MEDIAN_REL_ERROR,
        fingerprint=_fingerprint(store),
    )
    log.info(
        "stats of %s: %d cells x %d genes in %.1f s", store.path, stats.n_cells, store.n_genes, time.perf_counter() - t0
    )
    if write:
        write_stats(store, stats, config)
    return stats


def write_stats(store: Store, stats: GeneStats, config: StatsConfig) -> Path | ObjectPath:
    """Write STORE/stats under a temporary name, then rename it into place (replacing older statistics); in a
    bucket, upload it with its root zarr.json (which holds the metadata) last."""
    dest = store.path / STATS_DIR
    if isinstance(dest, ObjectPath):
        with tree_writer(dest, "zarr.json", overwrite=True) as local:
            _write_stats(stats, config, local)
        return dest
    with writer_lock(dest):
        tmp = temporary_sibling(dest)
        try:
            _write_stats(stats, config, tmp)
            replace_atomically(tmp, dest, overwrite=True)
        except BaseException:
            remove(tmp)
            raise
    return dest


def _write_stats(stats: GeneStats, config: StatsConfig, dest: Path) -> None:
    import anndata as ad
    import zarr

    group = zarr.open_group(str(dest), mode="w")
    with warnings.catch_warnings():  # zarr's notice about future autosharding defaults
        warnings.simplefilter("ignore", UserWarning)
        ad.io.write_elem(group, "genes", stats.genes)
    group.attrs[STATS_KEY] = json.loads(json.dumps({
        "version": STATS_VERSION,
        "n_cells": stats.n_cells,
        "target_sum": stats.target_sum,
        "library": stats.library,
        "hvg": stats.hvg,
        "median_rel_error": stats.median_rel_error,
        "fingerprint": stats.fingerprint,
        "config": config.model_dump(mode="json", exclude={"address"}),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }))  # fmt: skip


def load_stats(store: str | Path | Store, required: bool = True) -> GeneStats | None:
    """The statistics stored in `store` (None when absent and not `required`); stale statistics are an error."""
    import anndata as ad

    store = store if isinstance(store, Store) else Store.open(store)
    path = store.path / STATS_DIR
    if root_metadata(path) is None:
        if required:
            raise StatsError(f"{store.path}: no statistics ({path} missing): run `cellray stats {store.path}` first")
        return None
    group = open_group(path)
    meta = dict(group.attrs.get(STATS_KEY) or {})
    if meta.get("version") != STATS_VERSION:
        raise StatsError(
            f"{path}: attrs[{STATS_KEY!r}].version is {meta.get('version')!r}, expected {STATS_VERSION}: rerun "
            "`cellray stats`"
        )
    if meta["fingerprint"] != _fingerprint(store):
        raise StatsError(
            f"{path}: statistics were computed for other store contents (fingerprint {meta['fingerprint']}): rerun "
            f"`cellray stats {store.path}`"
        )
    genes = ad.io.read_elem(group["genes"])
    return GeneStats(
        where=str(path),
        n_cells=int(meta["n_cells"]),
        target_sum=float(meta["target_sum"]),
        genes=genes,
        library=meta["library"],
        hvg=meta["hvg"],
        median_rel_error=float(meta["median_rel_error"]),
        fingerprint=meta["fingerprint"],
    )


def export_table(stats: GeneStats, path: str | Path) -> Path:
    """Write the per-gene table as .csv or .parquet (atomically), to a local file."""
    if is_uri(path):
        raise StatsError(f"--export {path}: the per-gene table is written to a local file, not a URI")
    path = Path(path)
    if path.suffix not in (".csv", ".parquet"):
        raise StatsError(f"--export {path}: expected a .csv or .parquet file name")
    df = stats.table()
    with atomic_path(path) as tmp:
        if path.suffix == ".csv":
            df.to_csv(tmp, index=False)
        else:
            df.to_parquet(tmp, index=False)
    return path
