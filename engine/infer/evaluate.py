"""How good an embedding is: kNN label transfer and scIB's bio-conservation and batch-correction metrics (the
scib-metrics package's Benchmarker, not a re-implementation), beside a baseline computed in the same call from the
same cells' counts: HVG-PCA-50 (normalize_total 1e4, log1p, 2,000 highly variable genes, 50 principal components).

`evaluate_embedding` is what `cellray evaluate`, an embed job's `evaluate:` section and bench/quality.py run.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from engine.errors import InferError
from engine.infer.config import EvalConfig
from engine.objects import ObjectPath, store_path

log = logging.getLogger(__name__)

MIN_CELLS = 50  # fewer labelled cells than this cannot give 5-fold kNN with k=15, nor stable scIB scores
MODEL, BASELINE = "embedding", "pca"
KNN = "kNN accuracy"
BIO, BATCH, TOTAL = "Bio conservation", "Batch correction", "Total"


def knn_accuracy(
    emb: np.ndarray, labels: np.ndarray, k: int = 15, max_cells: int = 20_000, seed: int = 0, folds: int = 0
) -> float:
    """kNN label accuracy (majority of the k nearest neighbours, Euclidean) on up to max_cells.

    folds=0: leave-one-out (every other cell is a neighbour candidate); folds=N: N-fold cross-validation (cells
    split at random into N folds; each fold's labels are predicted from the other folds' cells only)."""
    import torch

    labels = np.asarray(labels)
    keep = np.flatnonzero(np.asarray(pd.notna(labels)))
    rng = np.random.default_rng(seed)
    if len(keep) > max_cells:
        keep = np.sort(rng.choice(keep, max_cells, replace=False))
    codes, y = np.unique(labels[keep], return_inverse=True)
    x = torch.from_numpy(np.ascontiguousarray(emb[keep], dtype=np.float32))
    y = torch.from_numpy(y)
    n = len(x)
    # fold of each cell; leave-one-out is n folds of one cell
    fold = torch.from_numpy(rng.permutation(n) % folds) if folds > 0 else torch.arange(n)
    correct = 0
    for start in range(0, n, 2048):
        rows = torch.arange(start, min(n, start + 2048))
        d = torch.cdist(x[rows], x)
        d[fold[rows][:, None] == fold[None, :]] = float("inf")  # neighbours only from the other folds
        kk = min(k, n - int(torch.bincount(fold).max()))
        nn = d.topk(kk, largest=False).indices
        votes = torch.nn.functional.one_hot(y[nn], len(codes)).sum(1)
        correct += int((votes.argmax(1) == y[rows]).sum())
    return correct / max(1, n)


@dataclass
class Sample:
    """Up to max_cells cells of an embedding output that have a label (and a batch, when asked)."""

    emb: np.ndarray
    labels: np.ndarray  # str
    batches: np.ndarray | None  # str
    rows: np.ndarray  # the cells' rows in the output, which are their rows in the store (store order)
    names: np.ndarray  # their obs names
    store: str | None  # the store the output was embedded from (uns['cellray']['store'])
    n_obs: int
    dropped: int  # cells without a label or a batch, left out


def _open(out: Path | ObjectPath) -> Any:
    from engine.store.format import open_group

    if out.suffix not in (".zarr", ".h5ad") or not out.exists():
        raise InferError(f"{out}: no such embedding output (expected OUT.zarr or OUT.h5ad written by cellray embed)")
    if out.suffix == ".h5ad":
        import h5py

        return h5py.File(out, "r")
    return open_group(out)


def _column(obs: Any, key: str, flag: str, out: Path | ObjectPath) -> np.ndarray:
    import anndata as ad

    if key not in obs:
        raise InferError(f"{flag} {key!r}: not an obs column of {out}; it has {list(obs.attrs['column-order'])}")
    return np.asarray(ad.io.read_elem(obs[key]), dtype=object)


def _rows(array: Any, rows: np.ndarray) -> np.ndarray:
    """Rows of a zarr or h5py array (h5py wants increasing indices, which `rows` are; its strings as str)."""
    import h5py

    if isinstance(array, h5py.Dataset):
        return np.asarray((array.asstr() if h5py.check_string_dtype(array.dtype) else array)[rows])
    return np.asarray(array.get_orthogonal_selection((rows, *[slice(None)] * (array.ndim - 1))))


def read_sample(
    out: str | Path | ObjectPath,
    label_key: str,
    batch_key: str | None = None,
    key: str = "X_cellray",
    max_cells: int = 20_000,
    seed: int = 0,
) -> Sample:
    """Up to `max_cells` random labelled cells of an output (.zarr or .h5ad), reading only the label (and batch)
    columns and those cells' rows: an atlas-sized output is never loaded whole."""
    import anndata as ad

    out = store_path(out)
    f = _open(out)
    try:
        obs = f["obs"]
        labels = _column(obs, label_key, "--label-key", out)
        batches = _column(obs, batch_key, "--batch-key", out) if batch_key else None
        if "obsm" not in f or key not in f["obsm"]:
            raise InferError(f"{out}: has no obsm[{key!r}]: not an output of cellray embed")
        ok = np.asarray(pd.notna(labels)) & (np.asarray(pd.notna(batches)) if batches is not None else True)
        rows = np.flatnonzero(ok)
        if len(rows) > max_cells:
            rows = np.sort(np.random.default_rng(seed).choice(rows, max_cells, replace=False))
        names = _rows(obs[obs.attrs["_index"]], rows).astype(object).astype(str)  # zarr's StringDType too
        uns = f["uns"]["cellray"] if "uns" in f and "cellray" in f["uns"] else None
        store = str(ad.io.read_elem(uns["store"])) if uns is not None and "store" in uns else None
        return Sample(
            emb=_rows(f["obsm"][key], rows).astype(np.float32),
            labels=labels[rows].astype(str),
            batches=batches[rows].astype(str) if batches is not None else None,
            rows=rows,
            names=names,
            store=store,
            n_obs=len(labels),
            dropped=int((~ok).sum()),
        )
    finally:
        if out.suffix == ".h5ad":
            f.close()


def sample_counts(store: str | Path | ObjectPath, sample: Sample, out: str) -> Any:
    """The raw counts (scipy CSR, float32) of the sample's cells, read shard by shard from the store they were
    embedded from; refused in one line when the store's cells are not the output's."""
    import scipy.sparse as sp

    from engine.store.format import Store

    st = Store.open(store)
    if st.n_cells != sample.n_obs:
        raise InferError(
            f"{out}: has {sample.n_obs} cells but the store {st.path} has {st.n_cells}: "
            "pass the store it was embedded from (--store)"
        )
    shard, local = st.locate(sample.rows)
    order, blocks, names = [], [], []
    for s in np.unique(shard):
        sel = np.flatnonzero(shard == s)
        order.append(sel)
        blocks.append(st.read_csr(int(s)).to_scipy()[local[sel]])
        names.append(st.read_obs(int(s), columns=[]).index.to_numpy()[local[sel]].astype(str))
    perm = np.argsort(np.concatenate(order))
    x = sp.vstack(blocks).tocsr()[perm]
    names = np.concatenate(names)[perm]
    bad = np.flatnonzero(names != sample.names)
    if len(bad):
        i = bad[0]
        raise InferError(
            f"{out}: its cells are not those of the store {st.path} (row {sample.rows[i]}: {sample.names[i]!r} in "
            f"the embedding, {names[i]!r} in the store): pass the store it was embedded from (--store)"
        )
    return x.astype(np.float32)


def pca_baseline(counts: Any, n_hvg: int = 2000, n_pcs: int = 50, seed: int = 0) -> np.ndarray:
    """HVG-PCA of counts, as scanpy's tutorials make it: normalize_total(1e4), log1p, `n_hvg` highly variable
    genes (seurat flavor; all genes when there are no more than that), PCA with `n_pcs` components."""
    import anndata as ad
    import scanpy as sc

    a = ad.AnnData(X=counts)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sc.pp.normalize_total(a, target_sum=1e4)
        sc.pp.log1p(a)
        if a.n_vars > n_hvg:
            sc.pp.highly_variable_genes(a, n_top_genes=n_hvg, flavor="seurat")
            a = a[:, a.var["highly_variable"].to_numpy()].copy()
        sc.pp.pca(a, n_comps=min(n_pcs, a.n_obs - 1, a.n_vars - 1), random_state=seed)
    return np.asarray(a.obsm["X_pca"], dtype=np.float32)


def exact_neighbors(x: np.ndarray, k: int = 15, n_neighbors: int | None = None, **_: Any) -> Any:
    """The k nearest neighbours of every row (itself first), exact, by torch's cdist in blocks: scIB's neighbour
    graphs (the Benchmarker's neighbour computer, and kBET's diffusion step; see `_reproducible_scib`)."""
    import torch
    from scib_metrics.nearest_neighbors import NeighborsResults

    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    k = min(n_neighbors or k, len(t))
    dist, idx = [], []
    for start in range(0, len(t), 2048):
        d, i = torch.cdist(t[start : start + 2048], t).topk(k, largest=False)
        dist.append(d.numpy())
        idx.append(i.numpy())
    return NeighborsResults(indices=np.concatenate(idx), distances=np.concatenate(dist))


@contextlib.contextmanager
def _reproducible_scib() -> Iterator[None]:
    """Two stand-ins while scib-metrics runs, so the same embedding always gets the same scores:

    - kBET finds the neighbours of each label's diffusion map with `scib_metrics.nearest_neighbors.pynndescent`
      whatever neighbour computer the Benchmarker was given; pynndescent's numba kernels compile for 60-90 s in
      every new process (and fail to compile where Ray has replaced builtins.print, as its tqdm does in a driver
      that trained in-process). Exact neighbours are what it approximates, and at the <= 20,000 cells scored here
      cost well under a second.
    - The diffusion map's eigenvectors come from ARPACK (`scipy.sparse.linalg.eigsh`), which starts from a random
      vector whose state advances with every call in the process: the baseline and the model, scored one after
      the other, got different starts, and an embedding scored 0.999x kBET against itself. A fixed start vector
      (scanpy's diffusion maps pass one too) makes the score a function of the embedding alone."""
    import scipy.sparse.linalg
    from scib_metrics import nearest_neighbors

    approximate, eigsh = nearest_neighbors.pynndescent, scipy.sparse.linalg.eigsh

    def seeded_eigsh(a: Any, *args: Any, v0: np.ndarray | None = None, **kwargs: Any) -> Any:
        if v0 is None:
            v0 = np.random.default_rng(0).uniform(-1.0, 1.0, a.shape[0])
        return eigsh(a, *args, v0=v0, **kwargs)

    nearest_neighbors.pynndescent, scipy.sparse.linalg.eigsh = exact_neighbors, seeded_eigsh
    try:
        yield
    finally:
        nearest_neighbors.pynndescent, scipy.sparse.linalg.eigsh = approximate, eigsh


def scib_scores(
    embeddings: dict[str, np.ndarray], labels: np.ndarray, batches: np.ndarray | None, pre: np.ndarray | None
) -> tuple[dict[str, dict[str, float]], dict[str, str]]:
    """scib-metrics' Benchmarker over the embeddings: ({embedding: {metric: value}}, {metric: its type}).

    Without batches, batch-correction metrics (and scIB's total, 0.6 bio + 0.4 batch) are absent, not faked.
    `pre` is the unintegrated embedding pcr_comparison compares with (the PCA baseline); without it that metric
    is left out."""
    import anndata as ad
    import jax

    from engine.objects import cache_dir

    if not jax.config.jax_compilation_cache_dir:  # scIB's jax kernels compile in ~10 s; later processes reuse them
        jax.config.update("jax_compilation_cache_dir", str(cache_dir() / "jax"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    import scib_metrics
    from scib_metrics.benchmark import BatchCorrection, Benchmarker, BioConservation

    scib_metrics.settings.verbosity = logging.WARNING  # not a line per label kBET skips (one batch, too few cells)
    n = len(labels)
    obs = pd.DataFrame(
        {"label": pd.Categorical(labels), "batch": pd.Categorical(batches if batches is not None else ["-"] * n)},
        index=[str(i) for i in range(n)],
    )
    a = ad.AnnData(obs=obs, obsm={name: np.asarray(e, dtype=np.float32) for name, e in embeddings.items()})
    # the Benchmarker computes a PCA of X when given no unintegrated embedding; only pcr_comparison reads it, so
    # without `pre` the first embedding stands in and pcr_comparison is off
    a.obsm["_unintegrated"] = pre if pre is not None else a.obsm[next(iter(embeddings))]
    bench = Benchmarker(
        a,
        batch_key="batch",
        label_key="label",
        embedding_obsm_keys=list(embeddings),
        bio_conservation_metrics=BioConservation(),
        batch_correction_metrics=None if batches is None else BatchCorrection(pcr_comparison=pre is not None),
        pre_integrated_embedding_obsm_key="_unintegrated",
        progress_bar=False,
    )
    with warnings.catch_warnings(), _reproducible_scib():
        warnings.simplefilter("ignore")
        # the Benchmarker runs gc.collect() before every metric: 0.4 s each in a process holding torch, jax and
        # Ray (80% of a 1,000-cell run); objects that exist now are frozen out of those collections
        gc.freeze()
        try:
            bench.prepare(neighbor_computer=exact_neighbors)
            bench.benchmark()
        finally:
            gc.unfreeze()
        df = bench.get_results(min_max_scale=False)
    types = {str(c): str(t) for c, t in df.loc["Metric Type"].items()}
    # a metric that could not be computed (kBET where every label was skipped) is NaN: None in the report (JSON)
    scores = {name: {str(c): _finite(v) for c, v in df.loc[name].items()} for name in embeddings}
    return scores, types


def _finite(v: Any) -> float | None:
    return float(v) if v is not None and np.isfinite(float(v)) else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def evaluate_embedding(out: str | Path | ObjectPath, config: EvalConfig, store: str | None = None) -> dict[str, Any]:
    """Score an embed output (and, with `baseline: pca`, HVG-PCA-50 of the same cells' counts from `store`, or the
    store recorded in the output): scIB metrics and `folds`-fold kNN label accuracy of each, and their ratios.
    Returns the report `cellray evaluate` prints and writes as JSON."""
    t0 = time.perf_counter()
    s = read_sample(out, config.label_key, config.batch_key, max_cells=config.max_cells, seed=config.seed)
    seconds = {"read": time.perf_counter() - t0, "baseline": 0.0}
    n_labels = len(np.unique(s.labels))
    if len(s.labels) < MIN_CELLS or n_labels < 2:
        raise InferError(
            f"{out}: {len(s.labels)} cells with a {config.label_key!r} label in {n_labels} classes: "
            f"evaluating needs at least {MIN_CELLS} cells and 2 classes"
        )
    n_batches = len(np.unique(s.batches)) if s.batches is not None else None
    embeddings = {MODEL: s.emb}
    pre = None
    if config.baseline == "pca":
        source = store or s.store
        if source is None:
            raise InferError(f"{out}: records no store it was embedded from: pass it as --store")
        t0 = time.perf_counter()
        pre = pca_baseline(sample_counts(source, s, str(out)), config.n_hvg, config.n_pcs, config.seed)
        seconds["baseline"] = time.perf_counter() - t0  # counts read + HVG-PCA: the baseline's own cost
        embeddings[BASELINE] = pre
    batches = s.batches if n_batches and n_batches > 1 else None  # one batch: nothing to correct
    t0 = time.perf_counter()
    scores, types = scib_scores(embeddings, s.labels, batches, pre)
    seconds["scib"] = time.perf_counter() - t0
    for name, emb in embeddings.items():
        scores[name][KNN] = knn_accuracy(emb, s.labels, k=config.k, max_cells=len(emb), seed=config.seed,
                                         folds=config.folds)  # fmt: skip
        types[KNN] = f"label transfer ({config.folds}-fold, k={config.k})"
    report: dict[str, Any] = {
        "embedding": str(out),
        "store": str(store or s.store) if pre is not None else None,
        "label_key": config.label_key,
        "batch_key": config.batch_key,
        "cells": len(s.labels),
        "cells_in_output": s.n_obs,
        "cells_left_out": s.dropped,
        "labels": n_labels,
        "batches": n_batches,
        "batch_correction": "scored" if batches is not None else (
            "absent: no --batch-key" if config.batch_key is None else "absent: one batch"),
        "baseline": "HVG-PCA-50" if pre is not None else None,
        "metric_types": types,
        "scores": scores,
        "seconds": {k: round(v, 2) for k, v in seconds.items()},
    }  # fmt: skip
    report["ratios"] = (
        {m: _ratio(v, scores[BASELINE].get(m)) for m, v in scores[MODEL].items()} if pre is not None else None
    )
    report["headline"] = headline(report)
    return report


def headline(report: dict[str, Any]) -> dict[str, Any]:
    """scIB's total (its bio conservation without batches) and kNN accuracy, and their ratios to the baseline."""
    m, base = report["scores"][MODEL], report["scores"].get(BASELINE, {})
    agg = TOTAL if TOTAL in m else BIO
    return {
        "scib": m[agg],
        "scib_is": agg,
        "knn": m[KNN],
        "scib_vs_baseline": _ratio(m[agg], base.get(agg)),
        "knn_vs_baseline": _ratio(m[KNN], base.get(KNN)),
    }


def report_path(out: str | Path | ObjectPath) -> Path | ObjectPath:
    """Where an embed job writes the evaluation of OUT.zarr / OUT.h5ad: OUT.eval.json beside it."""
    out = store_path(out)
    return out.parent / (out.name.removesuffix(out.suffix) + ".eval.json")
