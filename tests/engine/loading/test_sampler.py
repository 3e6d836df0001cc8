"""The read plan: exactly once across ranks, equal batch counts, splits, determinism, resume state, scale.

These tests need no data: a manifest is just cells per shard, and expanding a plan's segments gives the
global cell indices a reader would produce (test_loader.py checks the real reads give the same).
"""

from __future__ import annotations

import time
import tracemalloc

import numpy as np
import pytest

from engine.errors import CellrayError, SamplerError
from engine.loading.sampler import Sampler, SamplerConfig, auto_block_size
from tests.engine.loading.conftest import split_mask

SHARDS = [401, 333, 97, 652]  # odd sizes, 1,483 cells


def expand(sampler: Sampler, epoch: int) -> tuple[list[np.ndarray], np.ndarray]:
    """Per batch, the global cell indices in stream order (before the in-buffer shuffle); and pad flags."""
    cells, pads = [], []
    for plan in sampler.plan(epoch):
        buf, pad = [], []
        for shard, start, stop, skip, take, is_pad in plan.segments:
            first = sampler.cell_offsets[shard] + start
            local = np.arange(stop - start)
            if plan.filtered:
                local = local[split_mask(int(first), int(stop - start), plan.split, plan.val_fraction)]
            local = local[skip : skip + take]
            assert len(local) == take
            buf.append(first + local)
            pad.append(np.full(take, bool(is_pad)))
        buf, pad = np.concatenate(buf), np.concatenate(pad)
        assert len(buf) == plan.n_batches * plan.batch_size
        cells += np.split(buf, plan.n_batches)
        pads.append(pad)
    return cells, (np.concatenate(pads) if pads else np.empty(0, bool))


@pytest.mark.parametrize("world_size", [1, 2, 3, 8])
@pytest.mark.parametrize("batch_size,block_size", [(32, 64), (50, 17)])
def test_drop_policy_reaches_each_cell_at_most_once_and_ranks_stay_in_lockstep(world_size, batch_size, block_size):
    cfg = SamplerConfig(batch_size=batch_size, block_size=block_size, buffer_blocks=3, seed=7)
    samplers = [Sampler(SHARDS, cfg, r, world_size) for r in range(world_size)]
    lengths = {len(s) for s in samplers}
    assert len(lengths) == 1  # lockstep
    per_rank = [np.concatenate(expand(s, epoch=2)[0] or [np.empty(0, np.int64)]) for s in samplers]
    assert all(len(c) == len(samplers[0]) * batch_size for c in per_rank)
    union = np.concatenate(per_rank)
    assert len(np.unique(union)) == len(union)  # no duplicates, within or across ranks
    assert union.min() >= 0 and union.max() < sum(SHARDS)
    # documented drop: fewer than batch_size + 1 cells per rank
    assert sum(SHARDS) - len(union) < world_size * (batch_size + 1)


@pytest.mark.parametrize("world_size", [1, 3, 8])
def test_pad_policy_covers_every_cell_and_only_flagged_rows_repeat(world_size):
    cfg = SamplerConfig(batch_size=64, block_size=50, buffer_blocks=2, remainder="pad", shuffle=False)
    union, flagged = [], []
    lengths = set()
    for r in range(world_size):
        s = Sampler(SHARDS, cfg, r, world_size)
        lengths.add(len(s))
        cells, pad = expand(s, epoch=0)
        cells = np.concatenate(cells)
        union.append(cells[~pad])
        flagged.append(cells[pad])
    assert len(lengths) == 1
    real = np.concatenate(union)
    assert np.array_equal(np.sort(real), np.arange(sum(SHARDS)))  # every cell exactly once unflagged
    assert np.isin(np.concatenate(flagged), real).all()


def test_same_settings_same_plan_and_epochs_differ():
    cfg = SamplerConfig(batch_size=40, block_size=30, buffer_blocks=4, seed=3)
    a, b = Sampler(SHARDS, cfg, 1, 2), Sampler(SHARDS, cfg, 1, 2)
    e0a, e0b, e1 = expand(a, 0)[0], expand(b, 0)[0], expand(a, 1)[0]
    assert all(np.array_equal(x, y) for x, y in zip(e0a, e0b))
    assert not np.array_equal(np.concatenate(e0a), np.concatenate(e1))
    other_seed = expand(Sampler(SHARDS, SamplerConfig(batch_size=40, block_size=30, buffer_blocks=4, seed=4), 1, 2), 0)[
        0
    ]
    assert not np.array_equal(np.concatenate(e0a), np.concatenate(other_seed))
    # the block order crosses shards: consecutive blocks of a rank's stream come from several shards
    shards = [seg[0] for p in a.plan(0) for seg in p.segments]
    assert len(set(shards[:8])) > 1


def test_validation_split_is_disjoint_stable_and_never_trained_on():
    n = sum(SHARDS)
    train = Sampler(SHARDS, SamplerConfig(batch_size=1, block_size=64, val_fraction=0.2, seed=1))
    val = Sampler(SHARDS, SamplerConfig(batch_size=1, block_size=64, val_fraction=0.2, split="val", shuffle=False))
    t = np.concatenate(expand(train, 0)[0])
    v = np.concatenate(expand(val, 0)[0])
    assert len(np.intersect1d(t, v)) == 0
    assert np.array_equal(np.sort(np.concatenate([t, v])), np.arange(n))
    assert 0.15 < len(v) / n < 0.25
    # the split is a property of the cell, not of the seed, block size or epoch
    val2 = Sampler(SHARDS, SamplerConfig(batch_size=1, block_size=17, val_fraction=0.2, split="val", seed=99))
    assert np.array_equal(np.sort(np.concatenate(expand(val2, 5)[0])), np.sort(v))
    mask = split_mask(0, n, "val", 0.2)
    assert np.array_equal(np.flatnonzero(mask), np.sort(v))


def test_state_dict_roundtrip_and_mismatch_is_refused():
    cfg = SamplerConfig(batch_size=32, block_size=64)
    s = Sampler(SHARDS, cfg, 0, 2)
    s.set_epoch(3)
    s.batches_done = 5
    state = s.state_dict()
    t = Sampler(SHARDS, cfg, 0, 2)
    t.load_state_dict(state)
    assert (t.epoch, t.batches_done) == (3, 5)
    other = Sampler(SHARDS, SamplerConfig(batch_size=16, block_size=64), 0, 2)
    with pytest.raises(SamplerError, match="batch_size"):
        other.load_state_dict(state)
    other.load_state_dict({**state, "batches_done": 0})  # an epoch boundary is fine with new settings
    assert other.epoch == 3


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": 8, "split": "test"}, "split"),
        ({"batch_size": 8, "split": "val"}, "val_fraction"),
        ({"batch_size": 8, "val_fraction": 1.5}, "val_fraction"),
        ({"batch_size": 8, "remainder": "wrap"}, "remainder"),
        ({"batch_size": 8, "class_weights": {"a": 1.0}}, "class_weights needs balance_by"),
    ],
)
def test_bad_settings_get_clear_errors(kwargs, match):
    with pytest.raises(CellrayError, match=match):
        SamplerConfig(**kwargs)


def test_a_plan_needs_its_block_size_and_balance_resolved():
    with pytest.raises(SamplerError, match="Sampler.for_store"):
        Sampler([100], SamplerConfig(batch_size=8))  # block_size None: picked for a store, which a list is not
    with pytest.raises(SamplerError, match="Sampler.for_store"):
        Sampler([100], SamplerConfig(batch_size=8, block_size=16, balance_by="cell_type"))


def test_pad_with_more_ranks_than_cells_is_refused():
    with pytest.raises(SamplerError, match="no cells to pad"):
        len(Sampler([3], SamplerConfig(batch_size=2, block_size=1024, remainder="pad"), 0, 8))


def test_planning_1e9_cells_for_256_ranks_is_fast_and_small():
    shards = [100_000] * 10_000  # 10^9 cells
    cfg = SamplerConfig(batch_size=4096, block_size=1024, buffer_blocks=16, seed=0)
    t0 = time.perf_counter()
    one = Sampler(shards, cfg, 255, 256)  # what each rank's process does
    one.plan(0)
    one_rank = time.perf_counter() - t0
    tracemalloc.start()
    t0 = time.perf_counter()
    base = Sampler(shards, cfg, 0, 256)
    lengths = set()
    for rank in range(256):  # the whole epoch, every rank (one process planning for all)
        s = base.for_rank(rank)
        lengths.add(len(s))
        first, last = s.buffer(0, 0), s.buffer(0, s.n_buffers - 1)
    elapsed = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert one_rank < 2.0, f"planning one rank's epoch took {one_rank:.2f} s"
    assert lengths == {10**9 // 256 // 4096}
    assert first.n_batches == cfg.buffer_batches and last.n_batches >= 1
    assert elapsed < 2.0, f"planning took {elapsed:.2f} s"
    assert peak < 500 * 2**20, f"planning peaked at {peak / 2**20:.0f} MB"


def test_default_block_holds_about_65536_non_zeros_and_at_least_one_chunk():
    for per_cell in (20, 100, 700, 1_500):
        n_cells = 200_000
        block = auto_block_size(n_cells, n_cells * per_cell, 16_384)
        assert 2**15 / 1.5 <= block * per_cell <= 2**17 * 1.5  # about 65,536 (a power of two of cells)
        assert block == auto_block_size(n_cells, n_cells * per_cell, 65_536)  # small chunks leave the block alone
    assert auto_block_size(200_000, 200_000 * 500, 1 << 20) * 500 >= 1 << 19  # a big chunk: a block spans about one
    assert auto_block_size(1_000, 1_000, 16_384) == 4096 and auto_block_size(10, 10**9, 16_384) == 32  # the bounds


@pytest.mark.parametrize(
    "cfg",
    [
        SamplerConfig(batch_size=50, block_size=17, buffer_blocks=3, val_fraction=0.3),
        SamplerConfig(batch_size=20, block_size=64, buffer_blocks=2, val_fraction=0.3, split="val", remainder="pad"),
        SamplerConfig(batch_size=32, block_size=64, buffer_blocks=3, split="all"),
    ],
)
def test_a_plans_cells_in_one_kernel_call_are_the_segments_cells(cfg):
    """`BufferPlan.cells` (what a reader reads, in one call) is the reference expansion of each segment: its split's
    cells, `take` of them after `skip`; and a segment that lacks the cells its plan says is refused, naming it."""
    sampler = Sampler(SHARDS, cfg, rank=1, world_size=2)
    cells, pads = expand(sampler, epoch=1)
    plans = sampler.plan(1)
    got = [plan.cells(sampler.cell_offsets) for plan in plans]
    assert np.array_equal(np.concatenate([index for _, index, _ in got]), np.concatenate(cells))
    assert np.array_equal(np.concatenate([pad for _, _, pad in got]), pads)
    for plan, (row, index, _) in zip(plans, got):  # each row is the cell's place among the segments' cells
        starts = np.cumsum(plan.segments[:, 2] - plan.segments[:, 1]) - (plan.segments[:, 2] - plan.segments[:, 1])
        seg = np.repeat(np.arange(len(plan.segments)), plan.segments[:, 4])
        first = sampler.cell_offsets[plan.segments[seg, 0]] + plan.segments[seg, 1]
        assert np.array_equal(row - starts[seg], index - first)
    bad = plans[0]
    bad.segments = bad.segments.copy()
    shard, start, stop = (int(v) for v in bad.segments[0, :3])
    bad.segments[0, 3] += stop - start  # skip past every cell the segment has
    with pytest.raises(CellrayError, match=f"segment {shard}:{start}-{stop} has fewer than"):
        bad.cells(sampler.cell_offsets)
