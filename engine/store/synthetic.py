"""Synthetic count matrices with the shape of real single-cell data, for the demo, tests and benchmarks."""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp


def synthetic_counts(
    n_cells: int,
    n_genes: int,
    nnz_per_cell: int = 100,
    n_cell_types: int = 5,
    seed: int = 0,
    gene_prefix: str = "ENSG",
    dataset: str = "synthetic",
):
    """An AnnData of integer counts (float32 CSR) with `cell_type` and `batch` obs columns.

    Each cell type over-expresses its own block of genes, so embeddings have structure to find;
    gene popularity follows a power law as in real data; counts are negative-binomial-like.
    """
    import anndata as ad

    rng = np.random.default_rng(seed)
    nnz_per_cell = min(nnz_per_cell, n_genes)
    cell_type = rng.integers(0, n_cell_types, n_cells)
    popularity = 1.0 / np.arange(1, n_genes + 1) ** 0.8
    popularity = popularity[rng.permutation(n_genes)]
    per_type = []
    block = max(1, n_genes // (4 * n_cell_types))
    for t in range(n_cell_types):
        p = popularity.copy()
        p[t * block : (t + 1) * block] *= 20.0
        per_type.append(p / p.sum())
    # Draw genes per cell from its type's distribution (with replacement, then de-duplicated), all vectorised:
    # one sort of (cell, gene) keys yields CSR order directly.
    draws = np.clip(rng.poisson(nnz_per_cell * 1.15, n_cells), 1, n_genes)  # a few draws collide
    rows = np.repeat(np.arange(n_cells, dtype=np.int64), draws)
    genes = np.empty(len(rows), dtype=np.int64)
    cdfs = [np.cumsum(p) for p in per_type]
    row_type = cell_type[rows]
    for t in range(n_cell_types):
        sel = row_type == t
        genes[sel] = np.minimum(np.searchsorted(cdfs[t], rng.random(int(sel.sum()))), n_genes - 1)
    keys = np.sort(rows * n_genes + genes)  # np.unique hashes first, which is 7x slower here
    keys = keys[np.concatenate([[True], keys[1:] != keys[:-1]])]
    indices = (keys % n_genes).astype(np.int32)
    indptr = np.searchsorted(keys // n_genes, np.arange(n_cells + 1)).astype(np.int64)
    mean = 1.0 + rng.gamma(0.7, 2.0, size=len(indices))
    data = (1 + rng.poisson(mean)).astype(np.float32)
    X = sp.csr_matrix((data, indices, indptr), shape=(n_cells, n_genes))
    obs = pd.DataFrame(
        {
            "cell_type": pd.Categorical([f"type_{t}" for t in cell_type]),
            "batch": pd.Categorical(rng.choice(["b0", "b1"], n_cells)),
        },
        index=[f"{dataset}_cell{i}" for i in range(n_cells)],
    )
    var = pd.DataFrame(
        {"gene_symbols": [f"GENE{i}" for i in range(n_genes)]},
        index=[f"{gene_prefix}{i:011d}" for i in range(n_genes)],
    )
    return ad.AnnData(X=X, obs=obs, var=var)
