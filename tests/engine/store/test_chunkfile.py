"""The direct reader of one zarr array (engine/store/chunkfile.py): the layouts it reads, the ranges it returns,
and the layouts it leaves to zarr-python. Corrupted chunks: tests/engine/loading/test_integrity.py."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from engine.store.chunkfile import ArrayReader


@pytest.mark.parametrize("shards", [None, (40,)])
def test_ranges_equal_zarr_python(tmp_path, shards):
    values = np.random.default_rng(0).integers(0, 1000, 100).astype(np.int32)
    arr = zarr.create_array(str(tmp_path / "a"), shape=(100,), chunks=(10,), shards=shards, dtype="int32")
    arr[:] = values
    reader = ArrayReader.open(tmp_path / "a")
    assert reader is not None and reader.layout.sharded == (shards is not None) and reader.layout.n_chunks == 10
    out = np.empty(10, dtype=np.int32)
    reader.decode(3, out)
    assert np.array_equal(out, values[30:40])
    for lo, hi in [(0, 100), (5, 6), (9, 11), (37, 85), (90, 100), (50, 50)]:
        got = reader.read(lo, hi)
        assert got.dtype == np.int32 and np.array_equal(got, arr[lo:hi])


def test_other_layouts_are_left_to_zarr_python(tmp_path):
    two_d = zarr.create_array(str(tmp_path / "2d"), shape=(10, 10), chunks=(5, 5), dtype="int32")
    two_d[:] = 1
    gz = zarr.create_array(
        str(tmp_path / "gzip"), shape=(100,), chunks=(10,), dtype="int32", compressors=[zarr.codecs.GzipCodec()]
    )
    gz[:] = 1
    assert ArrayReader.open(tmp_path / "2d") is None and ArrayReader.open(tmp_path / "gzip") is None
    assert ArrayReader.open(tmp_path / "nothing") is None
