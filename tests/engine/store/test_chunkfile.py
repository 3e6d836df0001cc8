"""The direct reader of one zarr array (engine/store/chunkfile.py): the layouts it reads, the ranges it returns,
and the layouts it leaves to zarr-python. Corrupted chunks: tests/engine/loading/test_integrity.py."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import zarr

from engine.errors import StoreError
from engine.store import chunk_kernel, chunkfile
from engine.store.chunkfile import ArrayReader
from tests.conftest import ROOT
from tests.engine.store.conftest import blosc_store_array


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


@pytest.mark.parametrize("damage", ["byte", "header_size"])
def test_chunk_kernel_stops_at_a_bad_chunk_and_the_reader_names_it(tmp_path, damage):
    values = np.random.default_rng(2).integers(0, 50, 1_600).astype(np.uint16)
    blosc_store_array(tmp_path / "a", values, chunk=100, per_file=16)
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


def _maps_under(path) -> int:
    """Memory maps of this process of files under `path`."""
    return sum(str(path) in line for line in open("/proc/self/maps"))


def test_the_process_keeps_at_most_max_open_files_mapped(tmp_path, monkeypatch):
    """Every reader's files count against one bound per process (Linux allows 65,530 maps; a billion-cell store has
    ~65,000 files): reading arrays of more files than the bound maps no more than it, the oldest file dropped first,
    and a file dropped is mapped again when read again."""
    monkeypatch.setattr(chunkfile, "MAX_OPEN_FILES", 4)
    rng = np.random.default_rng(4)
    values = [rng.integers(0, 50, 1_000).astype(np.uint16) for _ in range(3)]
    for i, v in enumerate(values):
        blosc_store_array(tmp_path / f"s{i}", v, chunk=100, per_file=2)  # 5 files each
    readers = [ArrayReader.open(tmp_path / f"s{i}") for i in range(3)]
    for lo in range(0, 1_000, 200):  # a file of each array in turn, as a buffer across shards reads them
        for reader, v in zip(readers, values):
            assert np.array_equal(reader.read(lo, lo + 200), v[lo : lo + 200])
            assert _maps_under(tmp_path) <= 4
    assert _maps_under(tmp_path) == 4
    assert np.array_equal(readers[0].read(0, 1_000), values[0])  # its first files dropped long ago: mapped again
    assert _maps_under(tmp_path) == 4


def test_a_file_that_cannot_be_mapped_is_a_store_error_naming_it(tmp_path):
    """A map the kernel refuses (ENOMEM: the address space, or the process's vm.max_map_count, spent) is one line
    naming the file, not a raw OSError. The refusal is real: a child process whose address space is capped 16 GB
    above what it uses maps a chunk file grown (sparse) to 64 GB."""
    blosc_store_array(tmp_path / "a", np.arange(800, dtype=np.uint16), chunk=100, per_file=8)
    with open(tmp_path / "a" / "c" / "0", "r+b") as f:
        f.truncate(64 * 2**30)
    code = f"""
import os, resource
from pathlib import Path
from engine.errors import StoreError
from engine.store.chunkfile import ArrayReader
reader = ArrayReader.open(Path({str(tmp_path / "a")!r}))
used = int(open("/proc/self/statm").read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
resource.setrlimit(resource.RLIMIT_AS, (used + 16 * 2**30, resource.getrlimit(resource.RLIMIT_AS)[1]))
try:
    reader.mapped_file(0)
except StoreError as e:
    print(e)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"{tmp_path / 'a'}: chunk file c/0 cannot be mapped (Cannot allocate memory)"
