"""How good an embedding is: label transfer by k nearest neighbours."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd


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


def embedding_sample(
    out: str | Path, label_key: str, key: str = "X_cellray", max_cells: int = 20_000, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """(embeddings, labels) of up to `max_cells` random cells of an output (.zarr or .h5ad), reading only the
    label column and those cells' rows: an atlas-sized output is never loaded whole."""
    import anndata as ad

    from engine.errors import InferError
    from engine.objects import store_path
    from engine.store.format import open_group

    out = store_path(out)
    if out.suffix == ".h5ad":
        import h5py

        f = h5py.File(out, "r")
    else:
        f = open_group(out)
    try:
        obs = f["obs"]
        if label_key not in obs:
            columns = list(obs.attrs["column-order"])
            raise InferError(f"--label-key {label_key!r}: not an obs column of {out}; it has {columns}")
        labels = np.asarray(ad.io.read_elem(obs[label_key]), dtype=object)
        rows = np.arange(len(labels))
        if len(rows) > max_cells:
            rows = np.sort(np.random.default_rng(seed).choice(len(rows), max_cells, replace=False))
        emb = f["obsm"][key]
        x = emb[rows] if out.suffix == ".h5ad" else emb.get_orthogonal_selection((rows, slice(None)))
        return np.asarray(x), labels[rows]
    finally:
        if out.suffix == ".h5ad":
            f.close()
