"""The whole store as one AnnData for the scverse/dask ecosystem, without loading its counts.

`open_anndata(STORE)` gives an AnnData whose X is a dask array of scipy CSR chunks (one or more per shard, each
read from the store when a computation needs it), whose obs is the shards' obs concatenated in store order and
whose var is the gene vocabulary. scanpy functions that accept dask arrays (normalize_total, log1p,
highly_variable_genes, ...) run on it chunk by chunk; `.compute()` or a slice materialises only what it needs.

    adata = open_anndata("atlas.store")
    sums = gene_sums(adata.X)                    # per-gene totals, chunk by chunk
    sc.pp.normalize_total(adata); sc.pp.log1p(adata)
    adata[:1000].to_memory()

obs is in memory (O(cells) small columns); X never is.
"""

from __future__ import annotations

import itertools
import os
import threading
from typing import Any

import numpy as np

from engine.store.format import Store

DEFAULT_CHUNK_CELLS = 65_536  # cells per dask chunk (a shard is split into chunks of about this size)

_STORES: dict[str, Store] = {}  # one opened store per path and process (dask workers reuse it)
_LOCK = threading.Lock()


class _ReadBlock:
    """A picklable task: cells [start, stop) of one shard as a scipy CSR matrix of `dtype`."""

    def __init__(self, path: str, dtype: str | None):
        self.path = path
        self.dtype = dtype

    def __call__(self, shard: int, start: int, stop: int):
        import scipy.sparse as sp

        with _LOCK:
            store = _STORES.get(self.path)
            if store is None:
                store = _STORES[self.path] = Store.open(self.path)
        block = store.read_csr(shard, start, stop)
        data = block.data if self.dtype is None else block.data.astype(self.dtype)
        return sp.csr_matrix((data, block.indices, block.indptr), shape=(block.n_cells, block.n_genes))


def lazy_x(store: str | os.PathLike | Store, chunk_cells: int = DEFAULT_CHUNK_CELLS, dtype: Any = np.float32):
    """The store's counts as a dask array (cells x genes) of scipy CSR chunks; `dtype=None` keeps the stored type."""
    import dask.array as da
    import scipy.sparse as sp
    from dask.base import tokenize

    store = store if isinstance(store, Store) else Store.open(store)
    dt = np.dtype(store.manifest.count_dtype) if dtype is None else np.dtype(dtype)
    read = _ReadBlock(str(store.path.resolve()), None if dtype is None else dt.str)
    blocks = []
    for shard, info in enumerate(store.manifest.shards):
        n_chunks = max(1, -(-info.n_cells // chunk_cells))
        bounds = np.linspace(0, info.n_cells, n_chunks + 1).round().astype(int)
        blocks += [(shard, int(a), int(b)) for a, b in itertools.pairwise(bounds) if b > a]
    checksums = [s.checksum for s in store.manifest.shards]
    name = "cellray-x-" + tokenize(str(store.path.resolve()), checksums, chunk_cells, dt.str)
    graph = {(name, i, 0): (read, shard, a, b) for i, (shard, a, b) in enumerate(blocks)}
    chunks = (tuple(b - a for _, a, b in blocks), (store.n_genes,))
    return da.Array(graph, name, chunks, meta=sp.csr_matrix((0, 0), dtype=dt))


def open_anndata(store: str | os.PathLike | Store, chunk_cells: int = DEFAULT_CHUNK_CELLS, dtype: Any = np.float32):
    """The store as one AnnData: X a lazy dask array of CSR chunks (float32 unless `dtype`), obs concatenated
    in store order (index: the store's cell names), var the gene vocabulary."""
    import anndata as ad
    import pandas as pd

    store = store if isinstance(store, Store) else Store.open(store)
    obs = pd.concat([store.read_obs(s) for s in range(store.n_shards)]) if store.n_shards else pd.DataFrame()
    return ad.AnnData(X=lazy_x(store, chunk_cells, dtype), obs=obs, var=store.var.copy())


def gene_sums(x) -> np.ndarray:
    """Per-gene totals of a dask array of CSR chunks, computed chunk by chunk (float64)."""
    partial = x.map_blocks(
        lambda b: np.asarray(b.sum(axis=0), dtype=np.float64).reshape(1, -1),
        chunks=((1,) * x.numblocks[0], x.chunks[1]),
        dtype=np.float64,
        meta=np.empty((0, 0)),
    )
    return partial.sum(axis=0).compute()
