"""The integrity checks of a store beyond one chunk's crc32c (`engine.store.chunkfile`): checksums of whole arrays and
of obs/var values against the manifest, names that must be unique and non-empty, and the digests that bind each file
of X to its place. `engine.store.format` records them at ingest and compares them on every read."""

from __future__ import annotations

import logging
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from engine.errors import StoreError
from engine.store.chunkfile import tail_crc

log = logging.getLogger(__name__)


def checksum_arrays(*arrays: np.ndarray) -> str:
    crc = 0
    for a in arrays:
        crc = zlib.crc32(np.ascontiguousarray(a).view(np.uint8), crc)
    return f"crc32:{crc:08x}"


def checksum_values(values: Any) -> str:
    """`checksum_arrays` of an obs/var array's values as anndata reads them back: strings as their utf-8 bytes and
    lengths (so where one ends counts), categorical codes as int64, numbers as float64."""
    a = np.asarray(values)
    if a.dtype.kind in "OUST":
        encoded = [str(v).encode() for v in a]
        lengths = np.array([len(e) for e in encoded], np.int64)
        return checksum_arrays(lengths, np.frombuffer(b"".join(encoded), np.uint8))
    return checksum_arrays(a.astype(np.float64 if a.dtype.kind in "bf" else np.int64))


def frame_checksums(frame: pd.DataFrame) -> dict[str, str]:
    """The checksum of every array anndata writes for `frame` (an obs or var), keyed by its path in the group."""
    out = {"_index": checksum_values(frame.index)}
    for col in frame.columns:
        v = frame[col]
        if isinstance(v.dtype, pd.CategoricalDtype):
            out[f"{col}/codes"] = checksum_values(v.cat.codes)
            out[f"{col}/categories"] = checksum_values(v.cat.categories)
        else:
            out[col] = checksum_values(v.to_numpy())
    return out


def check_names(names: pd.Index, where: str, what: str) -> None:
    """Refuse empty or duplicate names (gene ids, cell names): each one names one gene or cell."""
    as_str = names.astype(str)
    if len(empty := np.flatnonzero((as_str == "") | names.isna())):
        raise StoreError(f"{where}: {len(empty)} empty {what} (the first at position {int(empty[0])})")
    if not names.is_unique:
        dup = names[names.duplicated()]
        raise StoreError(f"{where}: {len(dup)} duplicate {what} (the first: {str(dup[0])!r})")


def file_digests(array_dir: Path, n_files: int) -> list[str]:
    """The crc32c each file of an array ends in (its chunk index's in a zarr shard, its chunk's otherwise), by file
    number: what `ArrayReader` checks each file against when it maps it."""
    return [tail_crc(array_dir / "c" / str(k)) for k in range(n_files)]


def settle_zarr() -> None:
    """After a failed zarr-python read: zarr's sync() raises at the first bad chunk while the array's other chunk reads
    are still pending on zarr's event loop; at exit they would be destroyed, each with lines of asyncio noise ("Task
    was destroyed but it is pending!"). Wait for them to end (they are reads: seconds at most)."""
    import asyncio

    from zarr.core.sync import _get_loop

    async def drain() -> None:
        others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        await asyncio.gather(*others, return_exceptions=True)

    try:
        asyncio.run_coroutine_threadsafe(drain(), _get_loop()).result(timeout=60)
    except Exception as e:  # a zarr without this loop, or reads that hang: the noise, then, is the lesser harm
        log.debug("could not wait for zarr's pending reads: %s", e)
