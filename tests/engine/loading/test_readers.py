"""Block reads: the direct shard reader equals zarr-python; buffers follow the plan; Ray reader actors."""

from __future__ import annotations

import json
import os
from functools import partial
from pathlib import Path

import numpy as np
import pytest

from engine.errors import StoreError
from engine.loading.actors import start_reader_actor
from engine.loading.buffers import BatchBuffers
from engine.loading.chunks import StoreBlocks
from engine.loading.readers import BufferReader
from engine.loading.sampler import Sampler, SamplerConfig
from engine.store import csr
from engine.store.csr import gather_csr, gather_dense
from engine.store.format import Store


@pytest.fixture(scope="module")
def chunky_store(tmp_path_factory, tiny_h5ads, ray_local) -> Path:
    """The tiny inputs, unshuffled, with 32-element chunks: many chunks per shard and several files each."""
    from engine.store.ingest import IngestConfig, ingest

    out = tmp_path_factory.mktemp("readers") / "chunky.store"
    ingest(tiny_h5ads, out, IngestConfig(shard_cells=500, obs_keys=("cell_type",), shuffle=False, chunk_elements=32))
    return out


def test_a_shard_smaller_than_a_chunk_is_decoded_with_the_others(tiny_h5ads, tmp_path):
    """The last shard's 83 cells hold fewer non-zeros than one 4,096-value chunk: it keeps the store's chunk size
    (its one chunk padded), so a read of cells of every shard decodes them all on the direct path, in one pool, as
    zarr-python reads them; and the small shard is still plain AnnData."""
    import anndata

    from engine.store.ingest import IngestConfig, ingest

    out = tmp_path / "tail.store"
    ingest(tiny_h5ads, out, IngestConfig(shard_cells=700, chunk_elements=4096, executor="local", shuffle=False))
    store = Store.open(out)
    assert [s.n_cells for s in store.manifest.shards] == [700, 700, 83] and store.manifest.shards[2].nnz < 4096
    direct, through_zarr = StoreBlocks(store), StoreBlocks(store, direct=False)
    assert {direct.array(s, a).layout.chunk_elems for s in range(3) for a in ("data", "indices")} == {4096}
    segs = np.array([[0, 10, 90], [2, 0, 83], [1, 600, 700], [2, 40, 50]], dtype=np.int64)
    for got, want in zip(direct.read(segs), through_zarr.read(segs)):
        assert np.array_equal(got, want)
    used = sum(int(np.diff(store.read_array(int(sh), "indptr", a, b + 1)[[0, -1]])[0]) for sh, a, b in segs)
    assert direct.stats["used"] == used  # decoded on the direct path, none read through zarr-python
    small = anndata.read_zarr(out / "shards/00002").X
    block = store.read_csr(2)
    assert np.array_equal(small.indptr, block.indptr) and np.array_equal(small.data, block.data)


def test_one_pool_takes_shards_of_one_chunk_size_and_dtype_only(tiny_h5ads, tmp_path):
    """`plan_pool` plans one pool only for shards whose chunks share a size and dtype (the pool is laid out chunk by
    chunk); given shards of two chunk sizes (as a store written before every shard kept its store's chunk size, or
    two stores of a mix) it returns None, and `StoreBlocks` then reads through zarr-python (as with direct reads off,
    `test_direct_reads_equal_zarr_python`)."""
    from engine.loading.chunks import plan_pool
    from engine.store.ingest import IngestConfig, ingest

    blocks = []
    for chunk in (1024, 512):
        out = tmp_path / f"c{chunk}.store"
        ingest([tiny_h5ads[0]], out, IngestConfig(chunk_elements=chunk, executor="local", shuffle=False))
        blocks.append(StoreBlocks(Store.open(out)))
    segs = np.array([[0, 0, 50], [1, 100, 180]], dtype=np.int64)  # shard 0 of the first store, "shard 1" the second

    def array(shard: int, name: str):
        return blocks[shard].array(0, name)

    ip = np.concatenate([blocks[0].indptr_of(segs[:1] * [0, 1, 1]), blocks[1].indptr_of(segs[1:] * [0, 1, 1])])
    cast = (np.dtype(np.uint16), np.dtype(np.uint16))
    assert plan_pool(segs, ip, array, cast) is None
    one = plan_pool(segs[:1], ip[:51], array, cast)
    assert one is not None and one.used == ip[50] - ip[0]


def random_segments(store: Store, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        shard = int(rng.integers(store.n_shards))
        size = store.manifest.shards[shard].n_cells
        a = int(rng.integers(0, size))
        rows.append((shard, a, int(rng.integers(a, min(size, a + 90) + 1))))
    return np.array(rows, dtype=np.int64)


def test_direct_reads_equal_zarr_python(chunky_store):
    store = Store.open(chunky_store)
    x = store.shard_x(0)
    assert len(list((chunky_store / "shards/00000/X/data/c").iterdir())) > 1  # several zarr shard files
    direct, through_store = StoreBlocks(store), StoreBlocks(store, direct=False)
    assert direct.array(0, "data") is not None  # the fast path is really taken
    whole = {s: {k: v[:] for k, v in store.shard_x(s).arrays()} for s in range(store.n_shards)}  # zarr-python
    for seed in range(3):
        segs = random_segments(store, 25, seed)
        indices, data, lens = [], [], []
        for shard, start, stop in segs:
            ip = whole[int(shard)]["indptr"][start : stop + 1]
            indices.append(whole[int(shard)]["indices"][ip[0] : ip[-1]])
            data.append(whole[int(shard)]["data"][ip[0] : ip[-1]])
            lens.append(np.diff(ip))
        want = (np.concatenate([[0], np.cumsum(np.concatenate(lens))]), np.concatenate(indices), np.concatenate(data))
        for reader in (direct, through_store):
            for got, expected in zip(reader.read(segs), want):
                assert got.dtype == expected.dtype and np.array_equal(got, expected)
    # a whole shard equals Store.read_csr
    block = store.read_csr(1)
    indptr, indices, data = direct.read(np.array([[1, 0, store.manifest.shards[1].n_cells]]))
    assert (
        np.array_equal(indptr, block.indptr)
        and np.array_equal(indices, block.indices)
        and np.array_equal(data, block.data)
    )
    assert x["data"].shape[0] == store.manifest.shards[0].nnz


def test_corrupted_shard_file_names_the_file(chunky_store, tmp_path):
    import shutil

    bad = Path(shutil.copytree(chunky_store, tmp_path / "bad.store"))
    f = bad / "shards/00000/X/data/c/0"
    raw = bytearray(f.read_bytes())
    raw[-10] ^= 0xFF  # inside the shard index
    f.write_bytes(bytes(raw))
    blocks = StoreBlocks(Store.open(bad))
    with pytest.raises(StoreError, match=r"shards/00000/X/data: chunk file c/0 \(chunks 0-\d+\): .*checksum"):
        blocks.read(np.array([[0, 0, 10]]))
    g = bad / "shards/00001/X/indices/c/0"
    raw = bytearray(g.read_bytes())
    raw[20:60] = b"\0" * 40  # inside the first compressed chunk
    g.write_bytes(bytes(raw))
    with pytest.raises(StoreError, match=r"shards/00001/X/indices: chunk 0 \(file c/0\)"):
        StoreBlocks(Store.open(bad)).read(np.array([[1, 0, 5]]))


@pytest.mark.parametrize("ahead", [csr.PREFETCH_ROWS, 0, 1, 64])
@pytest.mark.parametrize("n_rows", [5, 300])
def test_gather_kernels_match_scipy(monkeypatch, ahead, n_rows):
    """Fewer rows than are asked for ahead, and many more: every row once, in order, whatever the prefetch distance
    (the last rows, at the pool's end, are asked for with nothing after them)."""
    import scipy.sparse as sp

    monkeypatch.setattr(csr, "PREFETCH_ROWS", ahead)
    m = sp.random(400, 30, density=0.2, format="csr", random_state=0, dtype=np.float64)
    m.data = np.ceil(m.data * 10).astype(np.uint16)
    rows = np.array([4, 0, 399, 4, 17]) if n_rows == 5 else np.random.default_rng(0).integers(0, 400, n_rows)
    rows[-1] = 399
    ip, ix, dx = gather_csr(m.indptr.astype(np.int64), m.indices.astype(np.uint16), m.data, rows)
    want = m[rows]
    assert dx.dtype == np.float32 and ix.dtype == np.int32
    assert np.array_equal(sp.csr_matrix((dx, ix, ip), shape=(n_rows, 30)).toarray(), want.toarray())
    dense = gather_dense(m.indptr.astype(np.int64), m.indices, m.data, rows, 30)
    assert dense.dtype == np.float32 and np.array_equal(dense, want.toarray())
    # into a reused buffer holding an older batch: each row built in scratch and streamed out whole
    buffers = BatchBuffers()
    old, fresh = buffers.get((n_rows, 30))
    assert fresh
    old[:] = 7.0
    del old
    src = csr.csr_rows(m.indptr.astype(np.int64), m.indices, m.data)
    for _ in range(2):  # the second time, the first's rows are the old batch
        again = csr.gather_rows_dense(src, rows, 30, buffers)
        assert np.array_equal(again, want.toarray())
        del again
    assert buffers.reused == 2


def test_buffer_batches_follow_the_plan(chunky_store):
    store = Store.open(chunky_store)
    cfg = SamplerConfig(batch_size=64, block_size=40, buffer_blocks=5, seed=2)
    plan = Sampler([s.n_cells for s in store.manifest.shards], cfg, 1, 2).buffer(0, 1)
    reader = BufferReader(store, output="csr", obs_keys=("cell_type",))
    batches = reader.read(plan)
    assert len(batches) == plan.n_batches
    idx = np.concatenate([b["index"] for b in batches])
    expected = np.concatenate([store.cell_offsets[s] + np.arange(a, b) for s, a, b, *_ in plan.segments])
    assert np.array_equal(np.sort(idx), np.sort(expected))  # the buffer's cells, shuffled
    assert not np.array_equal(idx, expected)
    # rows carry their own counts and labels
    b = batches[0]
    shard, local = store.locate(b["index"])
    for i in (0, 7, 63):
        want = store.read_csr(int(shard[i]), int(local[i]), int(local[i]) + 1).to_scipy().toarray()[0]
        got = b["X"].to_scipy().toarray()[i]
        assert np.array_equal(got, want.astype(np.float32))
        codes = store.read_obs(int(shard[i]), ["cell_type"])["cell_type"].cat.codes.to_numpy()
        assert b["cell_type"][i] == codes[local[i]]
    dense = BufferReader(store, output="dense").read(plan)[0]["X"]
    assert np.array_equal(dense, b["X"].to_scipy().toarray())


def test_reader_actor_runs_on_the_callers_node_and_survives_a_kill(chunky_store, ray_local, capfd):
    """A restarted actor builds its reader again from the recipe its retried call carries; and creating one has Ray's
    driver log nothing to the terminal (an actor restartable with a constructor argument in the object store gets an
    ERROR line there from Ray's C++ core, ray-project/ray#53727)."""
    import ray

    store = Store.open(chunky_store)
    cfg = SamplerConfig(batch_size=32, block_size=40, buffer_blocks=2)
    plan = Sampler([s.n_cells for s in store.manifest.shards], cfg).buffer(0, 0)
    recipe = [ray.put(partial(BufferReader, str(chunky_store), None, "csr"))]
    actor = start_reader_actor(num_cpus=0.25)
    try:
        assert ray.get(actor.node_id.remote()) == ray.get_runtime_context().get_node_id()
        pid = ray.get(actor.pid.remote())
        first = [b["index"] for b in ray.get(actor.read_many.remote(recipe, [plan], []))["buffers"][0]]
        assert "constructor arguments" not in capfd.readouterr().err
        os.kill(pid, 9)  # a crash, not a polite exit: Ray restarts it and retries the call
        again = ray.get(actor.read_many.remote(recipe, [plan], []))["buffers"][0]
        assert len(first) == len(again) == plan.n_batches
        assert all(np.array_equal(a, b["index"]) for a, b in zip(first, again))
        assert ray.get(actor.pid.remote()) != pid
    finally:
        ray.kill(actor)


def test_dense_buffers_are_reused_only_once_released():
    import gc

    bufs = BatchBuffers()
    a, fresh = bufs.get((4, 5))
    assert fresh and not a.any()
    a[:] = 7
    b, fresh_b = bufs.get((4, 5))
    assert fresh_b  # `a` is still referenced: its memory is not handed out again
    base = a.base
    del a
    gc.collect()
    c, fresh_c = bufs.get((3, 5))
    assert not fresh_c and c.base is base


def test_chunked_indptr_is_decoded_directly_and_cached_within_its_bound(chunky_store, tmp_path):
    import shutil

    import zarr
    from zarr.codecs import Crc32cCodec, ZstdCodec

    from engine.store.integrity import file_digests

    copy = Path(shutil.copytree(chunky_store, tmp_path / "chunked-indptr.store"))
    x = zarr.open_group(str(copy / "shards/00001/X"), mode="a")
    indptr = x["indptr"][:]
    del x["indptr"]
    # the v2 layout of a big shard's indptr, with chunks of 64 cells instead of 65,536: many chunks here
    x.create_array(
        "indptr", data=indptr, chunks=(64,), compressors=[ZstdCodec(level=3), Crc32cCodec()],
        config={"write_empty_chunks": True},
    )  # fmt: skip
    # a v3 manifest binds each file to its place: record the new files (what an ingest of this layout would)
    meta = json.loads((copy / "zarr.json").read_text())
    n_files = -(-len(indptr) // 64)
    meta["attributes"]["cellray"]["shards"][1]["files"]["indptr"] = file_digests(
        copy / "shards/00001/X/indptr", n_files
    )
    (copy / "zarr.json").write_text(json.dumps(meta))
    store = Store.open(copy)
    blocks = StoreBlocks(store, indptr_cache_bytes=4 * 64 * 8)  # room for 4 chunks
    reader = blocks.array(1, "indptr")
    assert reader is not None and reader.layout.n_chunks > 4 and reader.layout.checksum
    reference = StoreBlocks(Store.open(chunky_store), direct=False)
    segs = np.array([[1, 100, 190], [0, 5, 9], [1, 0, 3], [1, 60, 70], [1, 250, 500]])
    for got, want in zip(blocks.read(segs), reference.read(segs)):
        assert np.array_equal(got, want)
    assert np.array_equal(blocks.indptr(1), indptr)
    assert len(blocks._indptr) <= 4  # bounded: chunks come and go, the cache never holds more
    assert all(shard in (0, 1) for shard, _ in blocks._indptr)


def test_each_chunk_is_decoded_once_per_read(chunky_store):
    store = Store.open(chunky_store)
    blocks = StoreBlocks(store)
    chunk = blocks.array(0, "data").layout.chunk_elems
    ip = blocks.indptr(0)
    # three pieces of one shard that share chunks (as pieces of neighbouring blocks in one buffer can)
    segs = np.array([[0, 10, 40], [0, 40, 41], [0, 30, 60]])
    want = StoreBlocks(store, direct=False).read(segs)
    for got, w in zip(blocks.read(segs), want):
        assert np.array_equal(got, w)
    chunks = set()
    for _, a, b in segs:
        chunks |= set(range(int(ip[a]) // chunk, (int(ip[b]) - 1) // chunk + 1))
    assert blocks.stats["decoded"] == len(chunks) * chunk  # not once per segment
    assert blocks.stats["used"] == sum(int(ip[b] - ip[a]) for _, a, b in segs)
