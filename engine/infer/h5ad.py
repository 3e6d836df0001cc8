"""An .h5ad assembled from a finished AnnData zarr output, one chunk at a time (never the whole matrix).

anndata's on-disk encoding is the same in zarr and HDF5 (groups with `encoding-type` attributes, arrays as
datasets), so the copy walks the zarr group and writes each array to an HDF5 dataset chunk by chunk, with
attributes in the form anndata's own h5ad writer gives them (lists of strings as string arrays, an empty list
as an empty float array). Memory: one chunk (one part) of one array.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from engine.atomic import atomic_path
from engine.infer.parts import quiet_zarr


def _attr(value: Any) -> Any:
    import h5py

    if isinstance(value, bool):
        return np.bool_(value)
    if isinstance(value, list):
        if not value:
            return np.array([], dtype=np.float64)  # as anndata writes an empty column-order
        return np.array(value, dtype=h5py.string_dtype()) if all(isinstance(v, str) for v in value) else np.array(value)
    return value


def _is_text(dtype: np.dtype) -> bool:
    return dtype.kind in ("T", "O", "U", "S")


def _copy(src, dst) -> None:
    import h5py
    import zarr

    for key, value in src.attrs.items():
        dst.attrs[key] = _attr(value)
    for name, node in src.members():
        if isinstance(node, zarr.Group):
            _copy(node, dst.create_group(name))
            continue
        text = _is_text(node.dtype)
        dtype = h5py.string_dtype() if text else node.dtype
        if node.ndim == 0:
            value = node[()]
            ds = dst.create_dataset(name, data=str(value) if text else value, dtype=dtype)
        else:
            ds = dst.create_dataset(name, shape=node.shape, dtype=dtype)
            step = node.chunks[0]
            for a in range(0, node.shape[0], step):
                block = node[a : a + step]
                ds[a : a + len(block)] = block.astype(object) if text else block
        for key, value in node.attrs.items():
            ds.attrs[key] = _attr(value)


def write_h5ad(zarr_path: str | os.PathLike, out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Copy the AnnData zarr group at `zarr_path` into an .h5ad at `out` (atomically)."""
    import h5py
    import zarr

    src = zarr.open_group(str(zarr_path), mode="r")
    out = Path(out)
    with quiet_zarr(), atomic_path(out, overwrite=overwrite) as tmp, h5py.File(tmp, "w") as f:
        _copy(src, f)
    return out
