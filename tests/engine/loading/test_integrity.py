"""Verified reads: a corrupted, missing or truncated chunk is a one-line StoreError naming store, shard, array and
chunk, in both Loader modes and in `Store.read_array`, and it is never retried; v1 stores (no checksums) still read."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from engine.errors import StoreError
from engine.loading.chunks import StoreBlocks
from engine.loading.loader import Loader
from engine.loading.readers import ReadOptions
from engine.loading.sampler import SamplerConfig
from engine.store.chunkfile import MISSING, decompress
from engine.store.format import Store


@pytest.fixture(scope="module")
def good_store(tmp_path_factory, tiny_h5ads, ray_local) -> Path:
    """Small chunks (1,024 values): each shard has several chunks, so one bad chunk is a few dozen cells."""
    from engine.store.ingest import IngestConfig, ingest

    out = tmp_path_factory.mktemp("integrity") / "good.store"
    ingest(tiny_h5ads, out, IngestConfig(shard_cells=500, obs_keys=("cell_type",), chunk_elements=1024))
    return out


def shard_index(f: Path, n_inner: int) -> tuple[bytearray, np.ndarray]:
    raw = bytearray(f.read_bytes())
    index = np.frombuffer(bytes(raw[-(n_inner * 16 + 4) : -4]), dtype="<u8").reshape(n_inner, 2).copy()
    return raw, index


def n_inner(array_dir: Path) -> int:
    import json

    meta = json.loads((array_dir / "zarr.json").read_text())
    cfg = meta["codecs"][0]["configuration"]
    return meta["chunk_grid"]["configuration"]["chunk_shape"][0] // cfg["chunk_shape"][0]


def corrupt(store: Path, kind: str) -> str:
    """Damage shard 1 of `store` in place; return the regex its error must match."""
    import google_crc32c

    x = store / "shards/00001/X"
    f = x / "data/c/0"
    if kind == "missing_file":
        f.unlink()
        return r"shards/00001/X/data: chunk file c/0 \(chunks 0-\d+\) is missing"
    if kind == "truncated":
        with open(f, "r+b") as fh:
            fh.truncate(f.stat().st_size - 100)
        return r"shards/00001/X/data: chunk file c/0 \(chunks 0-\d+\): .*(truncated|checksum)"
    n = n_inner(x / "data")
    raw, index = shard_index(f, n)
    if kind == "missing_chunk":  # the index says chunk 1 was never written; its own checksum stays valid
        index[1] = MISSING
        body = index.tobytes()
        raw[-(n * 16 + 4) :] = body + google_crc32c.value(body).to_bytes(4, "little")
        f.write_bytes(bytes(raw))
        # the rewritten index no longer ends in the crc32c the manifest recorded (format v3): caught on mapping
        return r"shards/00001/X/data: (chunk 1 \(file c/0\) is missing|chunk file c/0 is not the one written there)"
    if kind == "flip":  # one flipped bit that still decodes, to other counts: only the checksum can catch it
        off, nbytes = int(index[1, 0]), int(index[1, 1])
        chunk = bytes(raw[off : off + nbytes - 4])
        good = decompress("blosc", chunk)
        for p in range(len(chunk) - 1, 16, -1):
            flipped = bytearray(chunk)
            flipped[p] ^= 0x01
            try:
                bad = decompress("blosc", bytes(flipped))
            except Exception:
                continue
            if bytes(bad) != bytes(good):
                break
        else:
            raise AssertionError("no decodable bit flip found")
        raw[off + p] ^= 0x01
        f.write_bytes(bytes(raw))
        return r"shards/00001/X/data: chunk 1 \(file c/0\) fails its crc32c checksum"
    if kind == "indptr":
        g = x / "indptr/c/0"
        raw = bytearray(g.read_bytes())
        raw[len(raw) // 2] ^= 0x40
        g.write_bytes(bytes(raw))
        return r"shards/00001/X/indptr: chunk 0 \(file c/0\) (fails its crc32c checksum|does not decode)"
    raise ValueError(kind)


KINDS = ["missing_file", "missing_chunk", "flip", "truncated", "indptr"]


@pytest.mark.parametrize("kind", KINDS)
def test_direct_reader_names_the_bad_chunk(good_store, tmp_path, kind):
    bad = Path(shutil.copytree(good_store, tmp_path / "bad.store"))
    pattern = corrupt(bad, kind)
    store = Store.open(bad)
    blocks = StoreBlocks(store)
    with pytest.raises(StoreError, match=pattern) as e:
        blocks.read(np.array([[1, 0, store.manifest.shards[1].n_cells]]))
    assert str(bad) in str(e.value) and "\n" not in str(e.value)
    assert np.array_equal(blocks.read(np.array([[0, 0, 50]]))[0], StoreBlocks(Store.open(good_store)).read(
        np.array([[0, 0, 50]]))[0])  # fmt: skip  # the other shards still read
    # Store.read_array (stats, verify, open_anndata) reads through the same checks: a chunk its shard index marks
    # missing is an error there too, where zarr-python alone would read it as zeros
    with pytest.raises(StoreError, match=pattern):
        Store.open(bad).read_csr(1)


@pytest.mark.parametrize("mode", ["local", "ray"])
def test_loader_stops_with_one_line_store_error_and_no_retry(good_store, tmp_path, ray_local, mode):
    for kind in ("missing_file", "flip", "truncated"):
        bad = Path(shutil.copytree(good_store, tmp_path / f"{kind}.store"))
        pattern = corrupt(bad, kind)
        plan = SamplerConfig(batch_size=32, remainder="pad", block_size=64, buffer_blocks=2)
        loader = Loader(bad, plan, mode=mode, reading=ReadOptions(readers=1))
        actors = loader.reader_processes()
        try:
            with pytest.raises(StoreError, match=pattern) as e:
                for _ in loader:
                    actors = actors or loader.reader_processes()
            assert type(e.value) is StoreError  # cellray's own error, not Ray's wrapper of it
            msg = str(e.value)
            assert "\n" not in msg and "Traceback" not in msg and "ray" not in msg.lower().replace(str(bad).lower(), "")
            assert loader.stats()["reissued"] == 0  # a data error is deterministic: never re-read on a new reader
            if mode == "ray":  # the same reader process throughout (the error may come with the first call)
                assert len(loader.reader_processes()) == 1 and actors in ([], loader.reader_processes())
        finally:
            loader.close()


def test_v1_store_without_checksums_still_reads(good_store, tmp_path):
    """A format v1 store (no crc32c codec, chunks equal to the fill value not written) reads through the direct
    path and equals zarr-python; there a missing chunk file is the fill value, as zarr reads it."""
    import zarr

    old = Path(shutil.copytree(good_store, tmp_path / "v1.store"))
    store = Store.open(old)
    codec = store.manifest.codec.zarr_compressor()
    for info in store.manifest.shards:
        x = zarr.open_group(str(old / info.path / "X"), mode="a")
        for name in ("data", "indices"):
            a = x[name]
            values, chunks, shards = a[:], a.chunks, a.shards
            del x[name]
            x.create_array(name, data=values, chunks=chunks, shards=shards, compressors=[codec])
        values = x["indptr"][:]
        del x["indptr"]
        x.create_array("indptr", data=values, chunks=(len(values),))
    root = zarr.open_group(str(old), mode="a")
    manifest = dict(root.attrs["cellray"])
    manifest["version"] = 1
    root.attrs["cellray"] = manifest

    v1 = Store.open(old)
    blocks = StoreBlocks(v1)
    reader = blocks.array(0, "data")
    assert reader is not None and not reader.layout.checksum and not reader.strict
    segs = np.array([[s, 0, i.n_cells] for s, i in enumerate(v1.manifest.shards)])
    for got, want in zip(blocks.read(segs), StoreBlocks(Store.open(good_store), direct=False).read(segs)):
        assert np.array_equal(got, want)
    loader = Loader(v1, SamplerConfig(batch_size=32), mode="local", output="csr")
    assert sum(len(b["index"]) for b in loader) == len(loader) * 32
    loader.close()
