"""Batches handed from reader actors to their consumer in shared memory: contents intact while the consumer holds
them, segments reused once it lets go, nothing left in /dev/shm."""

from __future__ import annotations

import gc

import numpy as np
import pytest

from engine.loading.loader import Loader
from engine.loading.readers import ReadOptions
from engine.loading.sampler import SamplerConfig
from engine.loading.shm import SHM_DIR, Arena, SharedArray, SharedViews, new_prefix
from engine.store.format import CSRBlock, Store

pytestmark = pytest.mark.skipif(not SHM_DIR.is_dir(), reason="no /dev/shm on this machine")


def test_arena_views_release_and_reuse():
    arena = Arena.create(new_prefix())
    views = SharedViews()
    arena.begin([])
    ids = arena.empty(1000, np.int64)
    ids[:] = np.arange(1000)
    dense, fresh = arena.get((4, 5))
    dense[:] = 7
    block = CSRBlock(np.array([0, 1]), arena.empty(1, np.int32), arena.empty(1, np.float32), 5)
    wire = arena.share({"index": ids, "X": dense, "csr": block, "small": np.arange(3)})
    assert isinstance(wire["index"], SharedArray) and isinstance(wire["X"], SharedArray)
    assert isinstance(wire["csr"].data, SharedArray) and isinstance(wire["csr"].indptr, np.ndarray)  # not in it
    assert isinstance(wire["small"], np.ndarray)
    assert arena.end(True) == []
    (segment,) = {wire["index"].segment, wire["X"].segment}
    assert (SHM_DIR / segment).exists()

    out = views.attach(wire, reader=0)
    assert not (SHM_DIR / segment).exists()  # mapped on both sides: the name is gone, nothing can leak
    assert np.array_equal(out["index"], np.arange(1000)) and (out["X"] == 7).all() and out["X"].shape == (4, 5)
    arena.begin(views.released(0))
    again = arena.empty(1000, np.int64)  # still held by the consumer: a new segment, the old bytes stay
    assert arena._call[0] != segment and np.array_equal(out["index"], np.arange(1000))
    again[:] = -1
    arena.end(True)

    keep = out["X"][1:3]  # a view of a view still holds the segment
    del out
    gc.collect()
    assert views.released(0) == []
    del keep
    gc.collect()
    assert views.released(0) == [segment]  # every view gone: handed back
    arena.begin([segment])
    arena.empty(10, np.int64)
    assert arena._call == [segment]  # and reused
    arena.end(True)
    arena.close()
    views.close()


def rows_of(store: Store, batch, n: int = 3) -> None:
    shard, local = store.locate(batch["index"].numpy())
    for i in range(0, len(local), max(1, len(local) // n)):
        want = store.read_csr(int(shard[i]), int(local[i]), int(local[i]) + 1).to_scipy().toarray()[0]
        assert np.array_equal(batch["X"][i].numpy(), want)


def test_ray_batches_kept_by_the_consumer_stay_intact(tiny_store, ray_local):
    store = Store.open(tiny_store)
    plan = SamplerConfig(batch_size=32, block_size=16, buffer_blocks=2)
    loader = Loader(store, plan, mode="ray", output="dense", reading=ReadOptions(prefetch=4))
    kept = list(loader)  # every batch of the epoch held at once: no segment may be reused under them
    assert loader._readers._views._maps  # they really came through shared memory
    for batch in (kept[0], kept[len(kept) // 2], kept[-1]):
        rows_of(store, batch)
    loader.close()


def test_ray_segments_are_reused_and_removed(tiny_store, ray_local):
    import ray

    store = Store.open(tiny_store)
    plan = SamplerConfig(batch_size=32, block_size=32, buffer_blocks=2, seed=3)
    loader = Loader(store, plan, mode="ray", output="csr")
    prefix = None
    calls = 0
    for epoch in range(3):
        for i, batch in enumerate(loader):
            prefix = loader._readers._views.prefix
            calls += 1
            if epoch == 0 and i == 0:
                rows = batch["X"].to_dense()
                shard, local = store.locate(batch["index"].numpy())
                want = store.read_csr(int(shard[5]), int(local[5]), int(local[5]) + 1).to_scipy().toarray()[0]
                assert np.array_equal(rows[5].numpy(), want)
                del rows
    assert calls > 40
    assert 0 < len(loader._readers._views._maps) <= 8  # a handful of segments, reused over 3 epochs
    ray.kill(loader._readers._actors[0], no_restart=False)  # a crash mid-stream: restarted, its segments abandoned
    for i, _ in enumerate(loader):
        if i == 10:
            break
    loader.close()
    assert prefix and not list(SHM_DIR.glob(f"{prefix}-*"))  # nothing left behind in /dev/shm
