"""Writing a store's shards and root in the layout `engine.store.format` reads (see its docstring): X chunked,
checksummed and bound to its place, obs and var checksummed, the manifest written last."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec

from engine.errors import StoreError
from engine.store.format import (
    DEFAULT_CHUNK_ELEMENTS,
    DEFAULT_CHUNKS_PER_FILE,
    INDPTR_CHUNK,
    MANIFEST_KEY,
    Codec,
    Manifest,
    ShardInfo,
)
from engine.store.integrity import checksum_arrays, file_digests, frame_checksums

# obs and var arrays: checksummed like X, every chunk written (a missing one must not read as "" or 0)
FRAME_ARRAYS = {"compressors": [ZstdCodec(level=3), Crc32cCodec()], "config": {"write_empty_chunks": True}}


def write_shard(
    root: zarr.Group,
    shard_id: int,
    indptr: np.ndarray,
    indices: np.ndarray,
    data: np.ndarray,
    obs: pd.DataFrame,
    gene_ids: pd.Index,
    codec: Codec,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> ShardInfo:
    """Write one shard as a complete AnnData zarr group under `root/shards/NNNNN`; return its manifest entry."""
    import anndata as ad

    path = f"shards/{shard_id:05d}"
    n_cells, n_genes = len(indptr) - 1, len(gene_ids)
    if len(obs) != n_cells:
        raise StoreError(f"{path}: obs has {len(obs)} rows, expected {n_cells} (one per cell)")
    group = root.require_group(path)
    group.attrs.update({"encoding-type": "anndata", "encoding-version": "0.1.0"})
    x = group.create_group("X")
    x.attrs.update({"encoding-type": "csr_matrix", "encoding-version": "0.1.0", "shape": [n_cells, n_genes]})
    nnz = len(data)
    # one chunk size in every shard, however few its non-zeros (the last chunk is padded): the loader decodes a
    # buffer's chunks of all its shards into one pool, which takes chunks of one size
    chunk = chunk_elements
    n_chunks = -(-max(nnz, 1) // chunk)
    file_elems = chunk * min(n_chunks, DEFAULT_CHUNKS_PER_FILE)
    # every chunk written (a missing one is corruption, not fill) and checksummed (crc32c after compression)
    integrity = {"config": {"write_empty_chunks": True}}
    for name, arr in (("data", data), ("indices", indices)):
        x.create_array(
            name,
            data=np.ascontiguousarray(arr),
            chunks=(chunk,),
            shards=(file_elems,),
            compressors=[codec.zarr_compressor(), Crc32cCodec()],
            **integrity,
        )
    indptr = np.asarray(indptr, dtype=np.int64)
    # chunked too, so a reader of a few blocks of a big shard does not fetch the whole indptr
    x.create_array(
        "indptr",
        data=indptr,
        chunks=(min(len(indptr), INDPTR_CHUNK),),
        compressors=[ZstdCodec(level=3), Crc32cCodec()],
        **integrity,
    )
    with warnings.catch_warnings():  # anndata's note on zarr autosharding concerns its own chunking, not ours
        warnings.filterwarnings("ignore", message=".*autosharding.*")
        for key in ("layers", "obsm", "obsp", "varm", "varp", "uns"):
            ad.io.write_elem(group, key, {})
        ad.io.write_elem(group, "obs", obs, dataset_kwargs=FRAME_ARRAYS)
        ad.io.write_elem(group, "var", pd.DataFrame(index=gene_ids), dataset_kwargs=FRAME_ARRAYS)
    local = Path(root.store.root) / path / "X"  # shards are always written to a local directory (then uploaded)
    files = {
        name: file_digests(local / name, -(-n // per))
        for name, n, per in (("data", nnz, file_elems), ("indices", nnz, file_elems),
                             ("indptr", len(indptr), min(len(indptr), INDPTR_CHUNK)))
    }  # fmt: skip
    return ShardInfo(
        path=path,
        n_cells=int(n_cells),
        nnz=int(nnz),
        checksum=checksum_arrays(indptr, indices, data),
        files=files,
        obs=frame_checksums(obs),
    )


def write_root(root: zarr.Group, manifest: Manifest, var: pd.DataFrame) -> None:
    """Write the vocabulary and, last, the manifest: a store without a manifest is incomplete."""
    import anndata as ad

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*autosharding.*")
        ad.io.write_elem(root, "var", var, dataset_kwargs=FRAME_ARRAYS)
    manifest.var_checksums = frame_checksums(var)
    root.attrs[MANIFEST_KEY] = manifest.to_dict()
