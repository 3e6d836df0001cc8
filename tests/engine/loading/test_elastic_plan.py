"""The resize-invariant plan (SamplerConfig.global_batch): the epoch's global batches do not depend on the world
size, a run resized mid-epoch continues at the next unseen global batch, every cell once per epoch.

The plan tests need no data (a manifest is cells per shard; expanding a buffer's segments and its column pick gives
what a reader delivers); the Loader test reads a real store in-process and resizes between Loaders.
"""

from __future__ import annotations

import numpy as np
import pytest

from engine.errors import CellrayError, SamplerError
from engine.loading.loader import Loader
from engine.loading.sampler import Sampler, SamplerConfig
from tests.engine.loading.conftest import split_mask

SHARDS = [401, 333, 97, 652]  # odd sizes, 1,483 cells


def rank_batches(s: Sampler, epoch: int, start: int = 0) -> list[np.ndarray]:
    """The cells of each of this rank's batches of `epoch` from global batch `start` on, as a reader gives them."""
    out = []
    for plan in s.plan(epoch):
        cells = []
        for shard, a, b, skip, take, _ in plan.segments:
            first = s.cell_offsets[shard] + a
            local = np.arange(b - a)
            if plan.filtered:
                local = local[split_mask(int(first), int(b - a), plan.split, plan.val_fraction)]
            cells.append(first + local[skip : skip + take])
        cells = np.concatenate(cells)[plan.column_pick()]
        for k in range(plan.n_batches):
            if plan.first_batch + k >= start:
                out.append(cells[k * plan.batch_size : (k + 1) * plan.batch_size])
    return out


def global_batches(cfg: SamplerConfig, epoch: int, schedule: list[tuple[int, int]]) -> list[np.ndarray]:
    """Global batches of `epoch` run as `schedule` [(world size, global batches at it), ...]: each segment's
    ranks start at the position the previous one reached (as a checkpoint restored at another size would)."""
    out: list[np.ndarray] = []
    for world, n in schedule:
        ranks = [Sampler(SHARDS, cfg, r, world) for r in range(world)]
        per_rank = [rank_batches(s, epoch, start=len(out))[:n] for s in ranks]
        assert len({len(b) for b in per_rank}) == 1, "ranks in lockstep"
        out += [np.concatenate(parts) for parts in zip(*per_rank)]
    return out


@pytest.mark.parametrize("split", ["train", "all"])
@pytest.mark.parametrize("batch,block,buffer_blocks", [(48, 64, 3), (50, 17, 2), (7, 32, 1)])
def test_global_batches_do_not_depend_on_world_size_and_resizes_keep_each_cell_once(split, batch, block, buffer_blocks):
    cfg = SamplerConfig(
        batch_size=batch, block_size=block, buffer_blocks=buffer_blocks, seed=3, global_batch=True, split=split,
        val_fraction=0.1 if split == "train" else 0.0,
    )  # fmt: skip
    fixed = global_batches(cfg, 1, [(1, 10**9)])
    n_split = Sampler(SHARDS, cfg).n_split_cells
    assert len(fixed) == n_split // batch
    assert all(len(b) == batch for b in fixed)
    cells = np.concatenate(fixed)
    assert len(np.unique(cells)) == len(cells) == len(fixed) * batch, "every cell once"
    for world in (2, 3, 5):
        assert all(np.array_equal(a, b) for a, b in zip(fixed, global_batches(cfg, 1, [(world, 10**9)])))
    # shrink 3 -> 2 mid-buffer, grow back to 3, then 4: the same sequence of global batches, each cell once
    k = len(fixed)
    resized = global_batches(cfg, 1, [(3, 5), (2, 4), (3, 3), (4, k)])
    assert len(resized) == k
    assert all(np.array_equal(a, b) for a, b in zip(fixed, resized))
    # a new epoch is another order of the same cells
    other = np.concatenate(global_batches(cfg, 2, [(2, k)]))
    assert not np.array_equal(other, cells) and set(other) | set(cells) <= set(range(sum(SHARDS)))


def test_each_rank_reads_only_its_share_of_a_buffer_and_slices_are_exact():
    cfg = SamplerConfig(batch_size=64, block_size=64, buffer_blocks=4, seed=1, global_batch=True)
    for world in (1, 2, 3):
        ranks = [Sampler(SHARDS, cfg, r, world) for r in range(world)]
        read = [int((p.segments[:, 2] - p.segments[:, 1]).sum()) for p in (s.buffer(0, 0) for s in ranks)]
        # a rank's read is its columns: K cells for each of its positions, the buffer's cells once over all ranks
        assert read == [(s.slice_range()[1] - s.slice_range()[0]) * cfg.buffer_batches for s in ranks]
        assert sum(read) == cfg.buffer_batches * 64
        # uneven slices (64 over 3: 21, 21, 22) weigh the loss so the ranks' average is the global batch mean
        sizes = [hi - lo for lo, hi in (s.slice_range() for s in ranks)]
        assert sum(sizes) == 64 and max(sizes) - min(sizes) <= 1
        losses = np.random.default_rng(world).random(64)  # per-cell losses of one global batch
        means = [losses[lo:hi].mean() for lo, hi in (s.slice_range() for s in ranks)]
        ddp = np.mean([s.loss_weight * m for s, m in zip(ranks, means)])  # DDP averages the ranks' gradients
        assert ddp == pytest.approx(losses.mean(), rel=1e-12)


def test_position_survives_a_resize_and_per_rank_plans_still_refuse_one():
    cfg = SamplerConfig(batch_size=30, block_size=40, global_batch=True)
    three = Sampler(SHARDS, cfg, 2, 3)
    three.epoch, three.batches_done = 4, 17
    two = Sampler(SHARDS, cfg, 1, 2)
    two.load_state_dict(three.state_dict())
    assert (two.epoch, two.batches_done) == (4, 17) and "world_size" not in two.fingerprint()
    per_rank = SamplerConfig(batch_size=30, block_size=40)
    a, b = Sampler(SHARDS, per_rank, 0, 3), Sampler(SHARDS, per_rank, 0, 2)
    a.batches_done = 5
    with pytest.raises(SamplerError, match="world_size"):
        b.load_state_dict(a.state_dict())


def test_pad_policy_wraps_the_last_global_batch_and_bad_settings_are_refused():
    cfg = SamplerConfig(batch_size=100, block_size=64, global_batch=True, remainder="pad", seed=5)
    batches = global_batches(cfg, 0, [(3, 7), (2, 10**9)])
    assert len(batches) == -(-sum(SHARDS) // 100) and all(len(b) == 100 for b in batches)
    assert set(np.concatenate(batches)) == set(range(sum(SHARDS))), "pad: every cell at least once"
    with pytest.raises(SamplerError, match="leaves some of 3 ranks no cells"):
        Sampler(SHARDS, SamplerConfig(batch_size=2, block_size=64, global_batch=True), 0, 3)
    with pytest.raises(CellrayError, match="balance_by"):
        SamplerConfig(batch_size=8, global_batch=True, balance_by="cell_type")


def test_loaders_resized_mid_epoch_deliver_the_fixed_size_sequence(tiny_store):
    """Real reads, in-process: 3 Loaders for 4 global batches, then 2 restored from rank 0's state, then 3 again."""
    cfg = SamplerConfig(batch_size=60, block_size=64, buffer_blocks=2, seed=9, global_batch=True)

    def run(world: int, state: dict | None, n: int) -> tuple[list[np.ndarray], dict]:
        loaders = [Loader(tiny_store, cfg, rank=r, world_size=world, mode="local") for r in range(world)]
        for loader in loaders:
            loader.set_epoch(0)
            if state is not None:
                loader.load_state_dict(state)
        out = []
        for parts in zip(*(iter(lo) for lo in loaders)):
            out.append(np.concatenate([p["index"].numpy() for p in parts]))
            if len(out) == n:
                break
        state = loaders[0].state_dict()
        for loader in loaders:
            loader.close()
        return out, state

    fixed, _ = run(1, None, 10**9)
    a, state = run(3, None, 4)
    b, state = run(2, state, 3)
    c, _ = run(3, state, 10**9)
    assert len(a + b + c) == len(fixed) > 7
    assert all(np.array_equal(x, y) for x, y in zip(fixed, a + b + c))
    cells = np.concatenate(fixed)
    assert len(np.unique(cells)) == len(cells) == len(fixed) * 60
