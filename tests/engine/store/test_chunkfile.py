"""The direct reader of one zarr array (engine/store/chunkfile.py): the layouts it reads, the ranges it returns,
and the layouts it leaves to zarr-python. Corrupted chunks: tests/engine/loading/test_integrity.py."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from engine.errors import StoreError
from engine.store import chunk_kernel
from engine.store.chunkfile import ArrayReader, ChunkBatch


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


def _blosc_store_array(path, values, chunk: int, per_file: int):
    """A 1-D array laid out as a store's X/data: sharded, blosc, crc32c after each chunk."""
    arr = zarr.create_array(
        str(path),
        shape=values.shape,
        chunks=(chunk,),
        shards=(chunk * per_file,),
        dtype=values.dtype,
        compressors=[zarr.codecs.BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle"), zarr.codecs.Crc32cCodec()],
        config={"write_empty_chunks": True},
    )
    arr[:] = values
    return arr


def test_chunk_kernel_decodes_runs_across_files_like_zarr_python(tmp_path):
    """The store's layout goes through the one-call kernel (available on every platform cellray ships for), and runs
    crossing file boundaries equal zarr-python's reads."""
    values = np.random.default_rng(1).integers(0, 50, 10_000).astype(np.uint16)
    arr = _blosc_store_array(tmp_path / "a", values, chunk=100, per_file=8)
    reader = ArrayReader.open(tmp_path / "a")
    assert chunk_kernel.available() and reader.layout.codec == "blosc" and reader.layout.checksum
    dest, whole_file = np.empty(8 * 100, dtype=np.uint16), ChunkBatch()
    whole_file.add(reader, 0, 7, dest, 0)  # one file's chunks
    whole_file.run()
    assert np.array_equal(dest, values[:800])
    batch, pool = ChunkBatch(), np.zeros(2_000, dtype=np.uint16)  # runs of a buffer, crossing files, in any order
    batch.add(reader, 14, 17, pool, 0)
    batch.add(reader, 3, 4, pool, 1_000)
    batch.run()
    assert np.array_equal(pool[:400], values[1_400:1_800]) and np.array_equal(pool[1_000:1_200], values[300:500])
    assert not pool[400:1_000].any() and not pool[1_200:].any()  # nothing written outside the places asked for
    with pytest.raises(ValueError, match="no room for chunks 3-4"):
        ChunkBatch().add(reader, 3, 4, pool, 1_900)
    # the same runs as arrays, one add for all of an array's runs (what a loader buffer does), plus one in a third file
    runs, pool = np.array([[14, 17], [3, 4], [20, 20]]), np.zeros(2_000, dtype=np.uint16)
    batch.add(reader, runs[:, 0], runs[:, 1], pool, np.array([0, 1_000, 1_500]))
    batch.run()
    assert np.array_equal(pool[:400], values[1_400:1_800]) and np.array_equal(pool[1_000:1_200], values[300:500])
    assert np.array_equal(pool[1_500:1_600], values[2_000:2_100])
    assert not pool[400:1_000].any() and not pool[1_200:1_500].any() and not pool[1_600:].any()
    none = np.empty(0, dtype=np.int64)
    batch.add(reader, none, none, pool, none)  # no runs: nothing added
    assert batch._parts == []
    with pytest.raises(ValueError, match="no room for chunks 20-20 at 1950"):
        ChunkBatch().add(reader, runs[:, 0], runs[:, 1], pool, np.array([0, 1_000, 1_950]))
    for lo, hi in [(0, 10_000), (750, 1_650), (799, 801), (9_950, 10_000)]:
        assert np.array_equal(reader.read(lo, hi), arr[lo:hi])


@pytest.mark.parametrize("damage", ["byte", "header_size"])
def test_chunk_kernel_stops_at_a_bad_chunk_and_the_reader_names_it(tmp_path, damage):
    values = np.random.default_rng(2).integers(0, 50, 1_600).astype(np.uint16)
    _blosc_store_array(tmp_path / "a", values, chunk=100, per_file=16)
    reader = ArrayReader.open(tmp_path / "a")
    f = reader.mapped_file(0)
    off, n = int(f.offsets[5]), int(f.nbytes[5])
    file = tmp_path / "a" / "c" / "0"
    raw = bytearray(file.read_bytes())
    if damage == "byte":
        raw[off + n // 2] ^= 0xFF  # inside the compressed bytes: the checksum fails
    else:
        raw[off + 4 : off + 8] = (400).to_bytes(4, "little")  # the header's decoded size: caught with checks off too
    file.write_bytes(bytes(raw))
    reader = ArrayReader.open(tmp_path / "a")
    f = reader.mapped_file(0)
    dest = np.zeros(1_600, dtype=np.uint16)
    verify = damage == "byte"
    tail, size = np.full(16, 4), np.full(16, 200)
    assert chunk_kernel.decode_blosc_at(f.src, f.size, tail, dest.ctypes.data + 200 * np.arange(16, dtype=np.uint64),
                                        size, verify) == 5  # fmt: skip
    assert np.array_equal(dest[:500], values[:500]) and not dest[500:].any()  # nothing decoded past the bad chunk
    with pytest.raises(StoreError, match=r"chunk 5 \(file c/0\)"):
        reader.read(0, 1_600)
    assert np.array_equal(reader.read(0, 500), values[:500]) and np.array_equal(reader.read(600, 1_600), values[600:])
