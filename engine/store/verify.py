"""`cellray verify`: re-read a whole store and check it against its manifest."""

from __future__ import annotations

import os

import numpy as np

from engine.errors import StoreError
from engine.objects import ObjectPath
from engine.progress import Progress, silent
from engine.store.format import Store
from engine.store.integrity import checksum_arrays


def verify_store(path: str | os.PathLike | ObjectPath, progress: Progress | None = None) -> list[str]:
    """Re-read every shard and check structure, counts and checksums against the manifest.

    Returns the problems found (empty when the store is sound); the first names the first bad shard.
    """
    progress = progress or silent
    store = Store.open(path, vocabulary=False)
    m = store.manifest
    problems: list[str] = []
    if sum(s.n_cells for s in m.shards) != m.n_cells:
        problems.append(f"{path}: manifest n_cells {m.n_cells} != sum over shards {sum(s.n_cells for s in m.shards)}")
    try:
        n_var = len(store.var)
        if n_var != m.n_genes:
            problems.append(f"{path}/var: {n_var} genes, manifest says {m.n_genes}")
    except StoreError as e:
        problems.append(str(e))
    for i, info in enumerate(m.shards):
        where = f"{path}/{info.path}"
        progress("verify", i, len(m.shards))
        try:
            store.shard_x(i)  # the shard's arrays against the manifest
            indptr = store.read_array(i, "indptr", 0, info.n_cells + 1)  # every chunk checked, direct or zarr
            indices = store.read_array(i, "indices", 0, info.nnz)
            data = store.read_array(i, "data", 0, info.nnz)
            obs_len = len(store.read_obs(i))  # every column, checked against the manifest (v3)
        except Exception as e:  # a missing shard, a truncated, corrupt or misplaced chunk
            problems.append(str(e) if isinstance(e, StoreError) else f"{where}: unreadable ({type(e).__name__}: {e})")
            continue
        if len(indptr) != info.n_cells + 1 or indptr[0] != 0 or np.any(np.diff(indptr) < 0):
            problems.append(
                f"{where}/X/indptr: malformed (length {len(indptr)}, expected {info.n_cells + 1}, non-decreasing "
                "from 0)"
            )
        elif indptr[-1] != info.nnz or len(data) != info.nnz or len(indices) != info.nnz:
            problems.append(f"{where}/X: {len(data)} non-zeros, manifest says {info.nnz}")
        elif len(indices) and int(indices.max()) >= m.n_genes:
            problems.append(f"{where}/X/indices: gene index {int(indices.max())} >= n_genes {m.n_genes}")
        elif obs_len != info.n_cells:
            problems.append(f"{where}/obs: {obs_len} rows, manifest says {info.n_cells}")
        elif checksum_arrays(indptr, indices, data) != info.checksum:
            problems.append(f"{where}/X: checksum {checksum_arrays(indptr, indices, data)} != manifest {info.checksum}")
    progress("verify", len(m.shards), len(m.shards))
    return problems
