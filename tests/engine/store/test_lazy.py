"""`open_anndata(STORE)`: the store as one lazy AnnData (dask X of CSR chunks) for scanpy/dask users."""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp

from engine import open_anndata
from engine.preprocess.stats import StatsConfig, compute_stats
from engine.store.format import Store
from engine.store.lazy import gene_sums


def test_lazy_anndata_matches_the_store(tiny_store):
    import dask.array as da

    store = Store.open(tiny_store)
    a = open_anndata(tiny_store, chunk_cells=150)
    assert isinstance(a.X, da.Array) and a.shape == (store.n_cells, store.n_genes) and a.X.dtype == np.float32
    assert a.X.numblocks[0] == sum(-(-s.n_cells // 150) for s in store.manifest.shards)  # chunks never cross shards
    pd.testing.assert_frame_equal(a.obs, pd.concat([store.read_obs(s) for s in range(store.n_shards)]))
    assert list(a.var_names) == list(store.gene_ids) and "gene_symbols" in a.var
    # any slice reads only its chunks, and equals the store's own reads
    lo = int(store.cell_offsets[2]) - 30
    got = a.X[lo : lo + 60].compute()
    last = store.manifest.shards[1].n_cells
    want = sp.vstack([store.read_csr(1, last - 30, last).to_scipy(), store.read_csr(2, 0, 30).to_scipy()])
    assert isinstance(got, sp.csr_matrix)
    np.testing.assert_array_equal(got.toarray(), want.toarray())


def test_dask_gene_sums_equal_the_stats_and_scanpy_runs_on_it(tiny_store):
    import scanpy as sc

    stats = compute_stats(tiny_store, StatsConfig(executor="local"), write=False)
    a = open_anndata(tiny_store)
    sums = gene_sums(a.X)  # computed by dask, chunk by chunk
    np.testing.assert_allclose(sums, stats.genes["mean"].to_numpy() * stats.n_cells, rtol=1e-9)
    # scanpy's dask support: the result stays lazy and equals scanpy on the materialised matrix
    sc.pp.normalize_total(a, target_sum=1e4)
    sc.pp.log1p(a)
    sc.pp.highly_variable_genes(a, n_top_genes=50, flavor="seurat")
    import dask.array as da

    assert isinstance(a.X, da.Array) and a.var["highly_variable"].sum() == 50
    mem = open_anndata(tiny_store)
    mem.X = mem.X.compute()
    sc.pp.normalize_total(mem, target_sum=1e4)
    sc.pp.log1p(mem)
    sc.pp.highly_variable_genes(mem, n_top_genes=50, flavor="seurat")
    np.testing.assert_allclose(a.X[:300].compute().toarray(), mem.X[:300].toarray(), rtol=1e-6, atol=1e-6)
    assert (a.var["highly_variable"] == mem.var["highly_variable"]).all()
