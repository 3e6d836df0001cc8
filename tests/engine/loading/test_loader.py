"""The Loader on real stores, in both modes: exactly once, determinism, resume, reader faults, backpressure,
shuffle quality, validation split, class balance and the transform pipeline."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.errors import CellrayError
from engine.loading.loader import Loader
from engine.loading.readers import ReadOptions
from engine.loading.sampler import SamplerConfig
from engine.preprocess.transforms import Pipeline
from engine.store.format import Store

SMALL = dict(block_size=64, buffer_blocks=4)  # tiny store: several blocks per shard, several buffers per rank


def plan(batch_size: int, **kw) -> SamplerConfig:
    return SamplerConfig(batch_size=batch_size, **kw)


def epoch_indices(loader: Loader) -> list[np.ndarray]:
    return [b["index"].numpy().copy() for b in loader]


@pytest.fixture(scope="module")
def unshuffled_store(tmp_path_factory, tiny_h5ads, ray_local) -> Path:
    """The three inputs one after another (no ingest shuffle): the loader alone must mix them."""
    from engine.store.ingest import IngestConfig, ingest

    out = tmp_path_factory.mktemp("loader") / "unshuffled.store"
    ingest(tiny_h5ads, out, IngestConfig(shard_cells=300, obs_keys=("cell_type",), shuffle=False, chunk_elements=1024))
    return out


@pytest.mark.parametrize("world_size", [1, 2, 3, 8])
def test_exactly_once_over_ranks_with_equal_batch_counts(tiny_store, world_size):
    store = Store.open(tiny_store)
    assert store.n_cells % 2 == 1  # odd cell count
    per_rank = []
    for rank in range(world_size):
        loader = Loader(store, plan(32, **SMALL), rank=rank, world_size=world_size, mode="local", output="csr")
        batches = epoch_indices(loader)
        assert len(batches) == len(loader) and all(len(b) == 32 for b in batches)
        per_rank.append(np.concatenate(batches))
        loader.close()
    assert len({len(c) for c in per_rank}) == 1  # lockstep
    union = np.concatenate(per_rank)
    assert len(np.unique(union)) == len(union)
    assert store.n_cells - len(union) < world_size * 33  # documented drop: < batch_size + 1 per rank


def test_batches_hold_the_stores_counts_labels_and_types(tiny_store):
    store = Store.open(tiny_store)
    loader = Loader(store, plan(50, **SMALL), mode="local", output="csr", obs_keys=("cell_type", "dataset"))
    batch = next(iter(loader))
    assert batch["X"].layout == torch.sparse_csr and batch["X"].dtype == torch.float32
    assert batch["X"].shape == (50, store.n_genes)
    assert batch["index"].dtype == torch.int64 and batch["cell_type"].dtype == torch.int64
    shard, local = store.locate(batch["index"].numpy())
    dense = batch["X"].to_dense().numpy()
    for i in range(0, 50, 7):
        want = store.read_csr(int(shard[i]), int(local[i]), int(local[i]) + 1).to_scipy().toarray()[0]
        assert np.array_equal(dense[i], want)
        obs = store.read_obs(int(shard[i]), ["dataset"])["dataset"]
        assert batch["dataset"][i].item() == obs.cat.codes.iloc[local[i]]
    loader.close()


def test_dense_batches_kept_by_the_consumer_stay_intact(tiny_store):
    store = Store.open(tiny_store)
    small = dict(mode="local", output="dense", reading=ReadOptions(prefetch=4))
    kept = list(Loader(store, plan(32, block_size=16, buffer_blocks=2), **small))
    for batch in (kept[0], kept[len(kept) // 2], kept[-1]):  # later batches did not reuse earlier memory
        shard, local = store.locate(batch["index"].numpy())
        for i in (0, 31):
            want = store.read_csr(int(shard[i]), int(local[i]), int(local[i]) + 1).to_scipy().toarray()[0]
            assert np.array_equal(batch["X"][i].numpy(), want)
    # batches dropped by the consumer give their memory back; reused memory is fully cleared first
    loader = Loader(store, plan(32, block_size=16, buffer_blocks=2), **small)
    for batch in loader:
        shard, local = store.locate(batch["index"][:2].numpy())
        block = store.read_csr(int(shard[1]), int(local[1]), int(local[1]) + 1).to_scipy().toarray()[0]
        assert np.array_equal(batch["X"][1].numpy(), block)
    # the pool was really used (counted when taken: the next epoch's first buffers, read ahead, may hold every
    # returned base when the pass ends)
    assert loader._reader.cutter.dense_buffers.reused > 0


@pytest.mark.parametrize("buffers_per_call", [2, 3])
def test_modes_give_identical_batches_and_epochs_differ(tiny_store, ray_local, buffers_per_call):
    kw = dict(rank=1, world_size=2, obs_keys=("cell_type",), output="csr")
    local = Loader(tiny_store, plan(40, seed=5, **SMALL), mode="local", **kw)
    reading = ReadOptions(buffers_per_call=buffers_per_call)  # buffers per actor call: one epoch's end inside a call
    remote = Loader(tiny_store, plan(40, seed=5, **SMALL), mode="ray", reading=reading, **kw)
    try:
        a, b = list(local), list(remote)
        assert len(a) == len(b) == len(local)
        for x, y in zip(a, b):
            assert torch.equal(x["index"], y["index"]) and torch.equal(x["cell_type"], y["cell_type"])
            assert torch.equal(x["X"].to_dense(), y["X"].to_dense())
        # the next epoch, partly read ahead within the last calls, comes out the same too
        a2, b2 = list(local), list(remote)
        assert len(a2) == len(b2) and all(torch.equal(x["index"], y["index"]) for x, y in zip(a2, b2))
        local.set_epoch(1)
        # the next pass is the next epoch: same cells for this rank's share, another order
        c = epoch_indices(local)
        first = np.concatenate([x["index"].numpy() for x in a])
        assert not np.array_equal(first, np.concatenate(c))
        local.set_epoch(0)
        assert np.array_equal(first, np.concatenate(epoch_indices(local)))
    finally:
        local.close()
        remote.close()


@pytest.mark.parametrize("mode", ["local", "ray"])
def test_resume_mid_epoch_continues_with_the_next_unseen_batch(tiny_store, ray_local, mode):
    kw = dict(mode=mode)
    full = Loader(tiny_store, plan(32, seed=1, **SMALL), **kw)
    full.set_epoch(2)
    reference = epoch_indices(full)
    full.close()

    first = Loader(tiny_store, plan(32, seed=1, **SMALL), **kw)
    first.set_epoch(2)
    seen = []
    for i, batch in enumerate(first):
        seen.append(batch["index"].numpy().copy())
        if i == 6:  # stop after k = 7 batches, mid-buffer
            break
    state = first.state_dict()
    first.close()
    assert state["epoch"] == 2 and state["batches_done"] == 7

    resumed = Loader(tiny_store, plan(32, seed=1, **SMALL), **kw)
    resumed.load_state_dict(state)
    rest = epoch_indices(resumed)
    assert len(seen) + len(rest) == len(reference)
    for x, y in zip(seen + rest, reference):
        assert np.array_equal(x, y)
    assert resumed.state_dict()["epoch"] == 3 and resumed.state_dict()["batches_done"] == 0
    resumed.close()


def test_resume_with_other_settings_is_refused(tiny_store):
    a = Loader(tiny_store, plan(32, **SMALL), mode="local")
    next(iter(a))
    with pytest.raises(CellrayError, match="batch_size"):
        Loader(tiny_store, plan(16, **SMALL), mode="local").load_state_dict(a.state_dict())
    a.close()


def test_killed_reader_mid_epoch_still_delivers_every_batch_once(tiny_store, ray_local):
    """With a reader recipe too big for Ray to inline (a pipeline bound to a model's 12,000-gene list, most of them
    absent from this store), which goes to the actors by an object reference the loader holds: a killed actor builds
    its reader again from it."""
    import ray

    store = Store.open(tiny_store)
    model_genes = [*store.gene_ids[::2], *(f"ENSG9{g:010d}" for g in range(12_000))]
    pipeline = Pipeline.from_spec([{"select_genes": {"genes": model_genes}}], store)
    assert len(ray.cloudpickle.dumps(pipeline)) > 100 * 1024  # Ray's inline limit for task arguments
    sampler = plan(32, seed=4, block_size=32, buffer_blocks=2)
    reference = epoch_indices(Loader(tiny_store, sampler, mode="local", output="csr", transforms=pipeline))
    # 2 batches per buffer: 4 buffers in flight
    loader = Loader(
        tiny_store, sampler, mode="ray", output="csr", transforms=pipeline, reading=ReadOptions(readers=2, prefetch=8)
    )
    got = []
    for i, batch in enumerate(loader):
        assert batch["X"].shape[1] == len(model_genes)
        got.append(batch["index"].numpy().copy())
        if i == 2:  # readers are busy with read-ahead buffers now: kill one of them outright
            ray.kill(loader._readers._actors[0], no_restart=False)
        if i == 9:  # and the other, permanently: the loader replaces it and re-issues its buffers
            ray.kill(loader._readers._actors[1], no_restart=True)
    assert loader.stats()["reissued"] >= 1
    loader.close()
    assert len(got) == len(reference)
    for x, y in zip(got, reference):
        assert np.array_equal(x, y)
    union = np.concatenate(got)
    assert len(np.unique(union)) == len(union)


@pytest.mark.parametrize("mode", ["local", "ray"])
def test_slow_consumer_keeps_read_ahead_at_the_prefetch_bound(tiny_store, ray_local, mode):
    # 2 batches per buffer
    loader = Loader(tiny_store, plan(16, block_size=16, buffer_blocks=2), mode=mode, reading=ReadOptions(prefetch=6))
    assert loader.config.buffer_batches == 2
    depths = []
    for i, _ in enumerate(loader):
        time.sleep(0.02)
        depths.append(loader.stats()["queue_depth"])
        if i == 30:
            break
    assert max(depths) <= 6  # never more than `prefetch` batches read ahead of the consumer
    assert max(depths) >= 5  # and the bound is used, so a slow consumer never waits for reads
    assert loader.stats()["max_queue_depth"] <= 6
    loader.close()


def test_readers_find_work_queued_and_ray_calls_go_to_the_least_loaded(tiny_store):
    """Default read-ahead: an actor has its next call queued when it finishes one (two calls' worth per actor), a
    reader thread its next buffer (two per thread); a call goes to the actor with the fewest cells still to read,
    in turn on ties (pure bookkeeping: no actor starts)."""
    from engine.loading.actors import least_loaded

    reading = ReadOptions(readers=3, buffers_per_call=2)
    with Loader(tiny_store, plan(16, block_size=16, buffer_blocks=2), mode="ray", reading=reading) as loader:
        assert loader.prefetch == 2 * 3 * 2 * loader.config.buffer_batches
    with Loader(tiny_store, plan(16, block_size=16, buffer_blocks=2), mode="local", reading=reading) as loader:
        assert loader.prefetch == 2 * 3 * loader.config.buffer_batches  # per reader thread: one read, one queued
    assert least_loaded([4096, 100, 100], turn=0) == 1
    assert least_loaded([4096, 100, 100], turn=2) == 2  # the turn starts at actor 2 now
    assert least_loaded([0, 100, 100], turn=2) == 0
    assert [least_loaded([0, 0, 0], turn=t) for t in range(4)] == [0, 1, 2, 0]


def test_ray_mode_sizes_its_calls_by_the_read_ahead_budget(tiny_store):
    """By default an actor reads as many buffers per call as keep its read-ahead (two calls) within
    `read_ahead_bytes_per_reader` of batches, 1 to 8; a given `buffers_per_call` is kept; local mode reads two
    buffers per thread whatever the budget. Pure bookkeeping: no actor starts."""
    from engine.loading.loader import MAX_BUFFERS_PER_CALL

    store = Store.open(tiny_store)
    nnz_per_cell = store.nnz / store.n_cells
    p = plan(16, block_size=16, buffer_blocks=2)
    with Loader(store, p, mode="ray", output="csr") as loader:
        assert loader.bytes_per_cell() == pytest.approx(8 + 8 * nnz_per_cell)  # float32 values, int32 indices
        buffer_bytes = loader.config.buffer_cells * loader.bytes_per_cell()
        assert 2 * 8 * buffer_bytes < ReadOptions().read_ahead_bytes_per_reader  # a tiny store: the budget is room
        assert loader.reading.buffers_per_call == MAX_BUFFERS_PER_CALL == 8
        assert loader.prefetch == 2 * 2 * 8 * loader.config.buffer_batches
    for per_call, want in [(3, 3), (1.5, 1), (0.2, 1), (100, 8)]:  # a budget with room for `per_call` buffers a call
        reading = ReadOptions(read_ahead_bytes_per_reader=int(2 * per_call * buffer_bytes) + 1)
        with Loader(store, p, mode="ray", output="csr", reading=reading) as loader:
            assert loader.reading.buffers_per_call == want
            assert loader.prefetch == 2 * 2 * want * loader.config.buffer_batches
    with Loader(store, p, mode="ray", output="dense", reading=ReadOptions(buffers_per_call=5)) as loader:
        assert loader.bytes_per_cell() == 4 * store.n_genes  # dense float32
        assert loader.reading.buffers_per_call == 5
    with Loader(store, p, mode="local", output="csr", reading=ReadOptions(read_ahead_bytes_per_reader=1)) as loader:
        assert loader.prefetch == 2 * 2 * loader.config.buffer_batches


def test_ray_mode_sizes_an_unbound_pipelines_batches_by_the_store(tiny_store):
    """A Pipeline built without a store learns its width from its first batch; Ray mode sizes its calls before any,
    by the store's genes: the same estimate as the pipeline bound to the store (nothing refused at construction)."""
    spec = ["normalize_total", "log1p", "densify"]
    p = plan(16, block_size=16, buffer_blocks=2)
    estimates = []
    for pipeline in (Pipeline.from_spec(spec), Pipeline.from_spec(spec, Store.open(tiny_store))):
        with Loader(tiny_store, p, mode="ray", transforms=pipeline) as loader:
            estimates.append((loader.bytes_per_cell(), loader.reading.buffers_per_call))
    assert estimates[0] == estimates[1] == (4 * Store.open(tiny_store).n_genes, 8)


def test_the_loader_plans_each_buffer_once(tiny_store):
    """The consumer plans a buffer when it submits it, never one it then finds no room for (that doubled the planning
    of every buffer), and two epochs give the batches two fresh passes give."""
    with Loader(tiny_store, plan(16, block_size=16, buffer_blocks=2), mode="local", output="csr") as loader:
        planned = []
        buffer = loader.sampler.buffer
        loader.sampler.buffer = lambda e, j: planned.append((e, j)) or buffer(e, j)
        got = [b["index"].tolist() for _ in range(2) for b in loader]
        n = loader.sampler.n_buffers
        assert len(planned) == len(set(planned)) >= 2 * n  # each once: both epochs, and some of the third's read ahead
        assert sorted(planned)[: 2 * n] == [(e, j) for e in (0, 1) for j in range(n)]
    with Loader(tiny_store, plan(16, block_size=16, buffer_blocks=2), mode="local", output="csr") as fresh:
        want = []
        for epoch in (0, 1):
            fresh.set_epoch(epoch)
            want += [b["index"].tolist() for b in fresh]
    assert got == want


@pytest.mark.parametrize("mode", ["local", "ray"])
def test_stats_count_the_readers_time_reading(tiny_store, ray_local, mode):
    """`reader_busy_s`: the readers' seconds inside their reads (threads, or actors in the calls fetched), all
    together, growing with every buffer read and never more than the readers' wall time; a Loader that has read
    nothing reports none."""
    reading = ReadOptions(readers=2)
    with Loader(tiny_store, plan(16, block_size=16, buffer_blocks=2), mode=mode, reading=reading) as loader:
        assert loader.stats()["reader_busy_s"] == 0.0
        t0 = time.perf_counter()
        for _ in loader:
            pass
        first = loader.stats()["reader_busy_s"]
        for _ in loader:
            pass
        second = loader.stats()["reader_busy_s"]
        wall = time.perf_counter() - t0
    assert 0.0 < first < second <= 2 * wall


def test_a_store_smaller_than_the_read_ahead_is_read_epochs_ahead(tiny_store):
    """With an epoch of two or three buffers and four epochs' worth of read-ahead, the reading runs on into later
    epochs (it stopped at the next epoch's end, splitting calls and idling readers at each epoch's turn), and three
    passes give the batches of three fresh epochs."""
    with Loader(tiny_store, plan(16, block_size=16), mode="local") as probe:
        n_blocks = probe.sampler.n_blocks
    config = plan(16, block_size=16, buffer_blocks=n_blocks // 2, seed=3)
    with Loader(tiny_store, config, mode="local") as probe:
        epoch_batches = len(probe)
    reading = ReadOptions(prefetch=4 * epoch_batches)  # four epochs' worth of batches
    with Loader(tiny_store, config, mode="local", output="csr", reading=reading) as loader:
        got, ahead = [], []
        for _ in range(3):
            got.append([b["index"].tolist() for b in loader])
            ahead.append(sorted({job.plan.epoch for job in loader._carry}))
    assert all(len(epochs) >= 2 for epochs in ahead), ahead  # each pass left buffers of two or more later epochs
    with Loader(tiny_store, config, mode="local", output="csr") as fresh:
        want = []
        for epoch in range(3):
            fresh.set_epoch(epoch)
            want.append([b["index"].tolist() for b in fresh])
    assert got == want


def test_ray_actors_count_the_cells_they_have_still_to_read(tiny_store, ray_local):
    """Real reader actors: a call counts as its actor's work until the actor has finished it, fetched or not
    (batches are handed out in call order: an actor that ran ahead must get the next call, not idle), and an
    actor's finished calls still hand over their batches in order when fetched."""
    from functools import partial

    import ray

    from engine.loading.actors import ActorReading
    from engine.loading.readers import BufferReader

    with Loader(tiny_store, plan(16, block_size=16, buffer_blocks=2), mode="local") as loader:
        plans = [loader.sampler.buffer(0, j) for j in range(5)]
        want = [loader._reader.read(p)[0]["index"].tolist() for p in plans]
    reading = ActorReading(
        partial(BufferReader, str(tiny_store), None, "csr"), ReadOptions(readers=2, buffers_per_call=1)
    )
    try:
        jobs = reading.submit(plans[:3])
        assert [j.call.reader for j in jobs] == [0, 1, 0]  # an idle pair: in turn
        ray.wait([j.call.ref for j in jobs], num_returns=3, timeout=60)
        assert reading.unread_cells() == [0, 0]  # all three read, none fetched: no actor has work left
        assert len(reading._open) == 3
        assert reading.batch(jobs[1], 0)["index"].tolist() == want[1]  # actor 1's call fetched
        more = reading.submit(plans[3:5])
        # in turn (actor 1), then actor 0: counting fetched-or-not calls would have given both to actor 1
        assert [j.call.reader for j in more] == [1, 0]
        for job, expect in zip([jobs[0], jobs[2], *more], [want[0], want[2], want[3], want[4]]):
            assert reading.batch(job, 0)["index"].tolist() == expect
        assert reading._open == [] and reading.unread_cells() == [0, 0]
    finally:
        reading.close()


def distinct_per_batch(loader: Loader, key: str) -> float:
    return float(np.mean([len(torch.unique(b[key])) for b in loader]))


def random_expectation(store: Store, key: str, batch_size: int) -> float:
    codes = np.concatenate([store.read_obs(s, [key])[key].cat.codes.to_numpy() for s in range(store.n_shards)])
    p = np.bincount(codes) / len(codes)
    return float(np.sum(1 - (1 - p) ** batch_size))


def test_shuffle_mixes_datasets_as_well_as_a_full_random_shuffle(unshuffled_store, tiny_store):
    store = Store.open(unshuffled_store)
    first = store.read_obs(0, ["dataset"])["dataset"]
    assert first.nunique() == 1  # the store really is in input order
    ideal = random_expectation(store, "dataset", 64)
    got = distinct_per_batch(
        Loader(store, plan(64, block_size=16, buffer_blocks=8), mode="local", obs_keys=("dataset",)), "dataset"
    )
    assert got >= 0.93 * ideal, (got, ideal)
    # an ingest-shuffled store with the default block and buffer sizes
    shuffled = Store.open(tiny_store)
    got = distinct_per_batch(Loader(shuffled, plan(64), mode="local", obs_keys=("dataset",)), "dataset")
    assert got >= 0.97 * random_expectation(shuffled, "dataset", 64)


def test_validation_split_never_reaches_training(tiny_store):
    kw = dict(mode="local", output="csr")
    train = np.concatenate(epoch_indices(Loader(tiny_store, plan(16, val_fraction=0.25, **SMALL), **kw)))
    val_plan = plan(16, val_fraction=0.25, split="val", remainder="pad", shuffle=False, **SMALL)
    val_loader = Loader(tiny_store, val_plan, **kw)
    batches = list(val_loader)
    val = np.concatenate([b["index"].numpy() for b in batches])
    pad = np.concatenate([b["pad"].numpy() for b in batches])
    assert len(np.intersect1d(train, val)) == 0
    n = Store.open(tiny_store).n_cells
    assert 0.2 < len(np.unique(val)) / n < 0.3
    assert len(np.unique(val[~pad])) == len(val[~pad])  # unpadded val rows: each cell once
    # every cell is in exactly one split: train + val cover the store up to the documented drop
    assert n - len(np.union1d(train, val)) < 17


def test_balanced_sampling_equalises_datasets(tiny_store):
    store = Store.open(tiny_store)
    loader = Loader(store, plan(64, balance_by="dataset", **SMALL), mode="local", obs_keys=("dataset",))
    codes = np.concatenate([b["dataset"].numpy() for b in loader])
    share = np.bincount(codes, minlength=3) / len(codes)
    assert np.all(np.abs(share - 1 / 3) < 0.06), share  # inputs are 700 / 450 / 333 cells
    with pytest.raises(CellrayError, match="categorical"):
        Loader(store, plan(64, balance_by="no_such_column"), mode="local")


def test_transform_pipeline_runs_in_the_readers(tiny_store, ray_local):
    spec = [{"normalize_total": {"target_sum": 1.0e4}}, "log1p", "densify"]
    store = Store.open(tiny_store)
    for mode in ("local", "ray"):
        loader = Loader(store, plan(32, **SMALL), transforms=spec, mode=mode)
        batch = next(iter(loader))
        loader.close()
        assert batch["X"].dtype == torch.float32 and batch["X"].layout == torch.strided
        shard, local = store.locate(batch["index"].numpy())
        for i in range(len(shard)):  # every cell (cellray's pipeline takes the store's own uint counts)
            row = store.read_csr(int(shard[i]), int(local[i]), int(local[i]) + 1).to_scipy().toarray()[0]
            want = np.log1p(row.astype(np.float64) / row.sum() * 1e4)
            np.testing.assert_allclose(batch["X"][i].numpy(), want, rtol=1e-5, atol=1e-5)
    seen = []

    class Recording(Pipeline):  # cellray's pipeline gets the store's own dtypes (uint16 counts: half the bytes)
        def __call__(self, block, cell_index, out=None):
            seen.append((block.data.dtype, block.indices.dtype))
            return super().__call__(block, cell_index, out=out)

    loader = Loader(store, plan(32, **SMALL), transforms=Recording.from_spec(spec, store), mode="local")
    native = next(iter(loader))
    loader.close()
    assert set(seen) == {(np.dtype(store.manifest.count_dtype), np.dtype(store.manifest.index_dtype))}, seen
    assert torch.equal(native["X"], batch["X"])  # the same batch as the spec's pipeline gave above
    seen.clear()

    def callable_pipeline(block, index):  # any other callable gets float32 counts and int32 indices
        seen.append((block.data.dtype, block.indices.dtype))
        return {"X": block.to_scipy().toarray()}

    loader = Loader(store, plan(32, **SMALL), transforms=callable_pipeline, mode="local")
    batch = next(iter(loader))
    loader.close()
    assert store.manifest.count_dtype != "float32" and set(seen) == {(np.dtype(np.float32), np.dtype(np.int32))}
    shard, local = store.locate(batch["index"].numpy())
    row = store.read_csr(int(shard[0]), int(local[0]), int(local[0]) + 1).to_scipy().toarray()[0]
    np.testing.assert_array_equal(batch["X"][0].numpy(), row)


def test_bad_options_get_clear_errors(tiny_store):
    with pytest.raises(CellrayError, match="output"):
        Loader(tiny_store, plan(8), output="coo", mode="local")
    with pytest.raises(CellrayError, match="mode"):
        Loader(tiny_store, plan(8), mode="spark")
    with pytest.raises(CellrayError, match="obs_keys"):
        Loader(tiny_store, plan(8), mode="local", obs_keys=("no_such",))
    with pytest.raises(CellrayError, match="no such store"):
        Loader("/nonexistent/x.store", plan(8))
    with pytest.raises(CellrayError, match="class_weights needs balance_by"):
        plan(8, class_weights={"a": 1.0})
    with pytest.raises(CellrayError, match="readers"):
        ReadOptions(readers=0)
    with pytest.raises(CellrayError, match="device"):
        Loader(tiny_store, plan(8), mode="local", device="tpu:0")
    if not torch.cuda.is_available():
        with pytest.raises(CellrayError, match="no CUDA device"):
            Loader(tiny_store, plan(8), mode="local", device="cuda")
    else:  # an index past the node's GPUs
        with pytest.raises(CellrayError, match="torch cannot use here"):
            Loader(tiny_store, plan(8), mode="local", device=f"cuda:{torch.cuda.device_count()}")
    if not torch.backends.mps.is_available():  # a backend torch knows, absent here: refused now, not at a batch
        with pytest.raises(CellrayError, match="'mps', which torch cannot use here"):
            Loader(tiny_store, plan(8), mode="local", device="mps")
