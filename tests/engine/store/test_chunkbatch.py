"""A buffer's chunk runs decoded in one call (engine/store/chunkbatch.py): runs of one array and of several (a
buffer's shards) equal zarr-python's reads, nothing is written outside the places asked for, chunks of other codecs
decode beside the kernel's, and a bad chunk is named by its own array. More corruption: tests/faults/."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from engine.errors import StoreError
from engine.store import chunk_kernel
from engine.store.chunkbatch import ChunkBatch
from engine.store.chunkfile import ArrayReader
from tests.engine.store.conftest import blosc_store_array


def test_chunk_kernel_decodes_runs_across_files_like_zarr_python(tmp_path):
    """The store's layout goes through the one-call kernel (available on every platform cellray ships for), and runs
    crossing file boundaries equal zarr-python's reads."""
    values = np.random.default_rng(1).integers(0, 50, 10_000).astype(np.uint16)
    arr = blosc_store_array(tmp_path / "a", values, chunk=100, per_file=8)
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
    assert len(batch) == 0
    with pytest.raises(ValueError, match="no room for chunks 20-20 at 1950"):
        ChunkBatch().add(reader, runs[:, 0], runs[:, 1], pool, np.array([0, 1_000, 1_950]))
    for lo, hi in [(0, 10_000), (750, 1_650), (799, 801), (9_950, 10_000)]:
        assert np.array_equal(reader.read(lo, hi), arr[lo:hi])


def _shards(tmp_path, n: int = 3, size: int = 2_000):
    """n arrays laid out as the X/data of n shards (chunks of 100 values, 4 a file), their values and readers."""
    rng = np.random.default_rng(3)
    values = [rng.integers(0, 60_000, size).astype(np.uint16) for _ in range(n)]
    for i, v in enumerate(values):
        blosc_store_array(tmp_path / f"s{i}", v, chunk=100, per_file=4)
    return values, [ArrayReader.open(tmp_path / f"s{i}") for i in range(n)]


def test_runs_of_several_arrays_in_one_add_equal_each_arrays_values(tmp_path):
    """What a loader buffer adds per array name: runs of several shards, in any order, crossing files, one call."""
    values, readers = _shards(tmp_path)
    # (array, first chunk, last chunk, place in the pool)
    runs = np.array([[2, 3, 6, 0], [0, 0, 0, 400], [1, 9, 12, 500], [0, 5, 9, 1_000], [2, 19, 19, 1_600]])
    pool = np.zeros(2_000, dtype=np.uint16)
    batch = ChunkBatch()
    batch.add_runs(readers, runs[:, 0], runs[:, 1], runs[:, 2], pool, runs[:, 3])
    assert len(batch) == 4 + 1 + 4 + 5 + 1
    batch.run()
    written = np.zeros(len(pool), dtype=bool)
    for r, c0, c1, at in runs.tolist():
        n = (c1 - c0 + 1) * 100
        assert np.array_equal(pool[at : at + n], values[r][c0 * 100 : c0 * 100 + n]), (r, c0, c1)
        written[at : at + n] = True
    assert not pool[~written].any()  # nothing outside the places asked for
    with pytest.raises(ValueError, match="no room for chunks 19-19 at 1950"):
        ChunkBatch().add_runs(readers, runs[:, 0], runs[:, 1], runs[:, 2], pool, np.array([0, 400, 500, 1_000, 1_950]))
    blosc_store_array(tmp_path / "wide", np.arange(2_000, dtype=np.uint16), chunk=200, per_file=4)
    with pytest.raises(ValueError, match="chunks of 200 uint16 elements, where .* has 100 uint16"):
        ChunkBatch().add_runs([*readers, ArrayReader.open(tmp_path / "wide")], runs[:, 0], runs[:, 1], runs[:, 2],
                              pool, runs[:, 3])  # fmt: skip


def test_chunks_of_another_codec_decode_beside_the_kernels(tmp_path):
    """A zstd array among a call's arrays (same chunk size and dtype) is decoded chunk by chunk, the rest in one
    kernel call, each into its own place."""
    values, readers = _shards(tmp_path, n=2)
    other = np.arange(2_000, dtype=np.uint16)
    arr = zarr.create_array(
        str(tmp_path / "zstd"), shape=(2_000,), chunks=(100,), shards=(400,), dtype="uint16",
        compressors=[zarr.codecs.ZstdCodec(), zarr.codecs.Crc32cCodec()],
    )  # fmt: skip
    arr[:] = other
    readers.append(ArrayReader.open(tmp_path / "zstd"))
    assert readers[-1].layout.codec == "zstd"
    pool, batch = np.zeros(900, dtype=np.uint16), ChunkBatch()
    batch.add_runs(
        readers, np.array([0, 2, 1]), np.array([1, 3, 7]), np.array([2, 5, 7]), pool, np.array([0, 300, 600])
    )
    assert len(batch) == 2 + 1  # the zstd chunks are decoded already
    batch.run()
    assert np.array_equal(pool[:200], values[0][100:300]) and np.array_equal(pool[600:700], values[1][700:800])
    assert np.array_equal(pool[300:600], other[300:600]) and not pool[200:300].any() and not pool[700:].any()


def test_a_bad_chunk_is_named_by_its_own_array(tmp_path):
    """The kernel stops at a chunk of the second array whose bytes were flipped; the error names that array's file
    and chunk, not the first array's nor the chunk's position in the batch."""
    values, readers = _shards(tmp_path, n=2)
    f = readers[1].mapped_file(2)  # chunks 8-11
    file = tmp_path / "s1" / "c" / "2"
    raw = bytearray(file.read_bytes())
    raw[int(f.offsets[1]) + int(f.nbytes[1]) // 2] ^= 0xFF  # chunk 9
    file.write_bytes(bytes(raw))
    readers[1] = ArrayReader.open(tmp_path / "s1")
    batch = ChunkBatch()
    batch.add_runs(
        readers, np.array([0, 1]), np.array([0, 6]), np.array([5, 10]), np.zeros(1_100, np.uint16), np.array([0, 600])
    )
    with pytest.raises(StoreError, match=r"s1: chunk 9 \(file c/2\)"):
        batch.run()
