"""The read plan: which cells each rank reads, in which order, as a pure function of the settings.

Cells are read in *blocks* of contiguous cells within a shard (`block_size` cells; the last block of a shard
is shorter). Every epoch:

1. the blocks of the whole store are permuted (seed, epoch) — a global shuffle across shards without
   re-writing the store;
2. the permuted blocks, restricted to the split's cells, form one stream of N positions; rank r takes the
   contiguous range [r*N//W, (r+1)*N//W) of it, so ranks differ by at most one cell and a block may be split
   between two neighbouring ranks;
3. a rank's range is cut into *buffers* of `buffer_cells` (a whole number of batches, about `buffer_blocks`
   blocks); the cells of a buffer are shuffled again (seed, epoch, rank, buffer) and cut into batches.

Remainder policy, so all ranks yield the same number of batches (DDP lockstep):
- ``remainder="drop"`` (default): every rank yields floor(N//W / batch_size) full batches; the few cells past
  that (< batch_size + 1 per rank) are skipped this epoch. Because the block order changes every epoch, it
  is different cells each epoch. Every cell reaches at most one rank at most once per epoch.
- ``remainder="pad"``: every rank yields ceil(ceil(N/W) / batch_size) batches; a rank short of cells wraps
  around to the start of its own range, and those repeated rows are flagged (`pad` is True) so a metric can
  ignore them. Every cell is seen at least once per epoch; only flagged rows repeat.

Resize-invariant plan (``global_batch=True``, elastic training): `batch_size` is the *global* batch of all ranks
together, and the epoch is a sequence of global batches that does not depend on the world size:

1. as above, the blocks are permuted (seed, epoch) into one stream of N positions;
2. the stream is cut into global buffers of `buffer_batches` global batches (K of them, B cells each); a buffer's
   K*B cells form B *columns* of K consecutive stream cells, and global batch k takes from column p its cell
   sigma_p(k), sigma_p a permutation of K drawn from (seed, epoch, buffer): position p of every global batch comes
   from column p, so a batch draws evenly from every block of the buffer;
3. rank r of W takes positions [r*B//W, (r+1)*B//W) of every global batch (uneven but exact when W does not divide
   B: ranks differ by at most one cell, and the training loop weighs each rank's loss by its share): the columns
   of its positions are one contiguous range of the stream, so a rank reads only its 1/W of each buffer's blocks.

The position is "global batches consumed", equal on every rank; resumed at another world size, the run continues
at the next unseen global batch, so within an epoch every cell is still delivered once (drop: the last N mod B
cells of the stream are skipped; pad: the last global batch wraps to the stream's start, flagged `pad`).
Class balance (`balance_by`) is not offered with it.

Validation split: a cell is in "val" when splitmix64(global index ^ salt) < val_fraction * 2^64: stable for a
given store and the same on every machine, and training never reads a val cell (engine/loading/split.py). Counting
the split per block is one numba pass over cell *indices* (no data, ~1 ns per cell) done once per Sampler.

Everything here is O(blocks) (never O(cells)) in memory, and per-epoch work is one permutation and one
cumulative sum over blocks.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import Field, model_validator

from engine.config import Config
from engine.errors import LoaderError, SamplerError
from engine.loading.split import segment_cells, split_counts, split_threshold
from engine.store.format import Store


class SamplerConfig(Config):
    """What a rank reads and in which order: batches, blocks, buffers, split, remainder policy, class balance."""

    error: ClassVar[type[Exception]] = SamplerError

    batch_size: int = Field(gt=0)
    block_size: int | None = Field(None, gt=0)  # contiguous cells per read; None: `auto_block_size` for the store
    buffer_blocks: int = Field(16, gt=0)  # blocks shuffled together in memory
    seed: int = 0
    shuffle: bool = True
    split: Literal["train", "val", "all"] = "train"
    val_fraction: float = Field(0.0, ge=0.0, lt=1.0)
    remainder: Literal["drop", "pad"] = "drop"
    balance_by: str | None = None  # a categorical obs column: resample each buffer so its classes come equally
    class_weights: dict[str, float] | None = None  # with balance_by: weight per category (default 1 / frequency)
    global_batch: bool = False  # batch_size is the global batch, planned independently of the world size

    @model_validator(mode="after")
    def _consistent(self) -> SamplerConfig:
        if self.split == "val" and self.val_fraction == 0.0:
            raise ValueError("split='val' with val_fraction=0: the validation split is empty (set val_fraction)")
        if self.class_weights is not None and self.balance_by is None:
            raise ValueError("class_weights needs balance_by (the obs column they weigh)")
        if self.global_batch and self.balance_by is not None:
            raise ValueError("balance_by is not offered with global_batch (the resize-invariant plan)")
        return self

    @property
    def buffer_batches(self) -> int:
        if self.block_size is None:
            raise SamplerError("block_size is not resolved: plan with Sampler.for_store, which picks it for the store")
        return max(1, math.ceil(self.buffer_blocks * self.block_size / self.batch_size))

    @property
    def buffer_cells(self) -> int:
        return self.buffer_batches * self.batch_size


BLOCK_ELEMENTS = 1 << 16  # non-zeros per block the default block size aims at


def auto_block_size(n_cells: int, nnz: int, chunk_elements: int) -> int:
    """Cells per block so that a block holds about `BLOCK_ELEMENTS` non-zeros, and at least one compressed chunk
    (a power of two in [32, 4096]). A random block decodes about one chunk more than it uses, so chunks several times
    smaller than a block (the store default) keep that waste small."""
    per_cell = max(1.0, nnz / max(1, n_cells))
    cells = max(BLOCK_ELEMENTS, chunk_elements) / per_cell
    return int(min(4096, max(32, 2 ** round(math.log2(max(1.0, cells))))))


# ------------------------------------------------------------------------------------------------ balance


@dataclass(frozen=True)
class Balance:
    """Class-balanced buffers: each buffer is resampled with replacement, a cell drawn with p ~ weights[its code]."""

    key: str  # the categorical obs column
    weights: np.ndarray  # float64 per category code, then a trailing 0 that code -1 (missing) indexes


def class_balance(store: Store, key: str, class_weights: dict[str, float] | None) -> Balance:
    """Weights per category of `key`: the given ones, or inverse class frequency (one pass over the obs codes)."""
    schema = store.manifest.obs_schema.get(key)
    if schema is None or "categories" not in schema:
        raise SamplerError(
            f"{store.path}: balance_by={key!r} needs a categorical obs column; have {list(store.manifest.obs_schema)}"
        )
    cats = list(schema["categories"])
    if class_weights is not None:
        return given_balance(key, cats, class_weights)
    counts = category_counts(store, key)
    return Balance(key, np.concatenate([np.where(counts > 0, 1.0 / np.maximum(counts, 1), 0.0), [0.0]]))


def given_balance(key: str, categories: list[str], class_weights: dict[str, float]) -> Balance:
    """The user's class weights for the categories of `key` (0 for a category not named; the last slot: missing)."""
    unknown = sorted(set(class_weights) - set(categories))
    if unknown:
        raise SamplerError(f"class_weights names {unknown}, not categories of obs column {key!r} ({categories})")
    return Balance(key, np.array([float(class_weights.get(c, 0.0)) for c in categories] + [0.0]))


def category_counts(store: Store, key: str) -> np.ndarray:
    """Cells of each category of the categorical obs column `key` (one pass over its codes)."""
    from engine.loading.chunks import StoreBlocks

    n_cats = len(store.manifest.obs_schema[key]["categories"])
    blocks = StoreBlocks(store)
    counts = np.zeros(n_cats, dtype=np.int64)
    for shard in range(store.n_shards):
        codes = blocks.obs_codes(shard, key)
        counts += np.bincount(codes[codes >= 0], minlength=n_cats)[:n_cats]
    blocks.close()
    return counts


# ------------------------------------------------------------------------------------------------ plan


@dataclass
class BufferPlan:
    """One buffer of one rank: what to read, then how to shuffle and cut it. Small and picklable."""

    epoch: int
    rank: int
    index: int  # buffer number within the rank's epoch
    first_batch: int  # batch number (within the rank's epoch) of this buffer's first batch
    n_batches: int
    batch_size: int
    # One row per piece of a block: shard, start, stop (the cells to read), skip, take (which of the split's
    # cells among them, in order), pad (1 when these rows repeat cells to pad the rank).
    segments: np.ndarray
    shuffle_seed: tuple[int, ...]
    shuffle: bool
    split: str
    val_fraction: float
    balance: Balance | None = None
    remainder: str = "drop"
    # global plan: (lo, hi, global batch): this rank's positions [lo, hi) of each global batch (batch_size = hi - lo)
    columns: tuple[int, int, int] | None = None

    @property
    def n_cells(self) -> int:
        return self.n_batches * self.batch_size

    def column_pick(self) -> np.ndarray:
        """Global plan: the rows of this rank's read (its columns, K = n_batches cells each, in stream order) that
        make its slice of each global batch, batch after batch. The permutations are drawn for all B columns, so
        a column's order is the same whichever rank reads it, at any world size."""
        lo, hi, width = self.columns
        k = self.n_batches
        sigma = np.tile(np.arange(k, dtype=np.int64), (width, 1))
        if self.shuffle:
            sigma = np.random.Generator(np.random.PCG64(list(self.shuffle_seed))).permuted(sigma, axis=1)
        return (np.arange(hi - lo, dtype=np.int64)[:, None] * k + sigma[lo:hi]).T.ravel()

    @property
    def filtered(self) -> bool:
        return self.split != "all" and self.val_fraction > 0.0

    def cells(self, cell_offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per cell of the plan in stream order: its row in the segments' cells read one after another, its global
        index (`cell_offsets[shard] + row in shard`), and its pad flag; one kernel call for every segment (no Python
        per segment). A segment that does not hold the cells it says is a `LoaderError` (the plan and the store
        disagree)."""
        segs = np.ascontiguousarray(self.segments, dtype=np.int64)
        n = int(segs[:, 4].sum()) if len(segs) else 0
        if n != self.n_cells:
            raise LoaderError(f"plan/store mismatch: buffer {self.index} has {n} cells, plan says {self.n_cells}")
        row, index, pad = np.empty(n, np.int64), np.empty(n, np.int64), np.empty(n, np.bool_)
        cut = split_threshold(self.val_fraction) if self.filtered else np.uint64(0)
        bad = segment_cells(
            segs, np.asarray(cell_offsets, dtype=np.int64), self.filtered, cut, self.split == "val", row, index, pad
        )
        if bad >= 0:
            shard, start, stop, _, take, _ = (int(v) for v in segs[bad])
            raise LoaderError(
                f"plan/store mismatch: segment {shard}:{start}-{stop} has fewer than the {take} cells the plan says"
            )
        return row, index, pad


@dataclass
class _Epoch:
    order: np.ndarray  # block ids in stream order (blocks with no split cells removed)
    cum: np.ndarray  # cum[k] = stream position of the first cell of order[k]; cum[-1] = N


def check_rank(config: SamplerConfig, rank: int, world_size: int) -> None:
    """A rank of the world, and a global batch that gives every rank cells."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise SamplerError(f"rank {rank} is outside world_size {world_size}")
    if config.global_batch and config.batch_size < world_size:
        raise SamplerError(f"a global batch of {config.batch_size} cells leaves some of {world_size} ranks no cells")


class Sampler:
    """Plans epochs for one rank. `shard_cells` is the manifest's cell count per shard; `Sampler.for_store` also
    resolves the config's block size and class balance for a store."""

    def __init__(
        self,
        shard_cells: Sequence[int],
        config: SamplerConfig,
        rank: int = 0,
        world_size: int = 1,
        balance: Balance | None = None,
    ):
        check_rank(config, rank, world_size)
        if config.block_size is None:
            raise SamplerError("block_size is not resolved: plan with Sampler.for_store, which picks it for the store")
        if config.balance_by is not None and balance is None:
            raise SamplerError(f"balance_by={config.balance_by!r} needs the store: plan with Sampler.for_store")
        self.config = config
        self.rank, self.world_size = rank, world_size
        self.balance = balance
        bs = config.block_size
        self.shard_cells = np.asarray(shard_cells, dtype=np.int64)
        self.cell_offsets = np.concatenate([[0], np.cumsum(self.shard_cells)]).astype(np.int64)
        per_shard = -(-self.shard_cells // bs)
        self.block_offsets = np.concatenate([[0], np.cumsum(per_shard)]).astype(np.int64)
        self.n_blocks = int(self.block_offsets[-1])
        self.block_counts = self._count_split()
        self.n_split_cells = int(self.block_counts.sum())
        if self.n_split_cells == 0:
            raise SamplerError(f"the {config.split!r} split has no cells (store of {int(self.cell_offsets[-1])} cells)")
        self.epoch = 0
        self.batches_done = 0
        self._cache: dict[int, _Epoch] = {}

    @classmethod
    def for_store(cls, store: Store, config: SamplerConfig, rank: int = 0, world_size: int = 1) -> Sampler:
        """The plan of `rank` over `store`: the default block size picked for the store (`auto_block_size`), and
        the class weights of `balance_by` read from it."""
        m = store.manifest
        if config.block_size is None:
            block = auto_block_size(m.n_cells, store.nnz, m.chunk_elements)
            config = config.model_copy(update={"block_size": block})
        balance = None if config.balance_by is None else class_balance(store, config.balance_by, config.class_weights)
        return cls([s.n_cells for s in m.shards], config, rank, world_size, balance)

    def for_rank(self, rank: int) -> Sampler:
        """The same plan seen by another rank, sharing the O(blocks) tables and the epoch cache."""
        if not 0 <= rank < self.world_size:
            raise SamplerError(f"rank {rank} is outside world_size {self.world_size}")
        other = copy.copy(self)
        other.rank, other.epoch, other.batches_done = rank, 0, 0
        return other

    # -- blocks
    def blocks(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Block ids -> (shard, start, stop) cell ranges within the shard."""
        ids = np.asarray(ids, dtype=np.int64)
        shard = np.searchsorted(self.block_offsets, ids, side="right") - 1
        start = (ids - self.block_offsets[shard]) * self.config.block_size
        stop = np.minimum(start + self.config.block_size, self.shard_cells[shard])
        return shard, start, stop

    def _count_split(self) -> np.ndarray:
        shard, start, stop = self.blocks(np.arange(self.n_blocks))
        sizes = stop - start
        c = self.config
        if c.split == "all" or c.val_fraction == 0.0:
            return sizes
        out = np.empty(self.n_blocks, dtype=np.int64)
        split_counts(self.cell_offsets[shard] + start, sizes, split_threshold(c.val_fraction), c.split == "val", out)
        return out

    # -- epochs
    def _epoch(self, epoch: int) -> _Epoch:
        if epoch not in self._cache:
            if self.config.shuffle:
                order = np.random.Generator(np.random.PCG64([self.config.seed, epoch])).permutation(self.n_blocks)
            else:
                order = np.arange(self.n_blocks, dtype=np.int64)
            order = order[self.block_counts[order] > 0]
            cum = np.zeros(len(order) + 1, dtype=np.int64)
            np.cumsum(self.block_counts[order], out=cum[1:])
            while len(self._cache) >= 2:  # the Loader plans epochs in order, reading ahead: O(blocks)
                self._cache.pop(next(iter(self._cache)))
            self._cache[epoch] = _Epoch(order, cum)
        return self._cache[epoch]

    def rank_range(self, rank: int | None = None) -> tuple[int, int]:
        """The rank's [lo, hi) positions in the epoch stream (the same for every epoch)."""
        r = self.rank if rank is None else rank
        n, w = self.n_split_cells, self.world_size
        return r * n // w, (r + 1) * n // w

    def slice_range(self) -> tuple[int, int]:
        """Global plan: this rank's positions [lo, hi) of every global batch."""
        b, w, r = self.config.batch_size, self.world_size, self.rank
        return r * b // w, (r + 1) * b // w

    @property
    def loss_weight(self) -> float:
        """What this rank's mean loss is weighed by so that DDP's average over ranks is the mean over the global
        batch: (its cells x world size) / global batch; 1 for per-rank plans and where the world size divides."""
        if not self.config.global_batch:
            return 1.0
        lo, hi = self.slice_range()
        return (hi - lo) * self.world_size / self.config.batch_size

    def __len__(self) -> int:
        """Batches per rank per epoch: the same on every rank (global plan: global batches per epoch)."""
        n, w, b = self.n_split_cells, self.world_size, self.config.batch_size
        if self.config.global_batch:
            return n // b if self.config.remainder == "drop" else -(-n // b)
        if self.config.remainder == "drop":
            return (n // w) // b
        if n // w == 0:
            raise SamplerError(f"remainder='pad' with {n} cells over {w} ranks leaves a rank with no cells to pad from")
        per_rank = -(-n // w)  # ceil: padded ranks all reach the largest rank's count
        return -(-per_rank // b)

    @property
    def n_buffers(self) -> int:
        return -(-len(self) // self.config.buffer_batches)

    def buffer_n_batches(self, j: int) -> int:
        """Batches in buffer `j` of any epoch (the last may be short), known without planning it."""
        if not 0 <= j < self.n_buffers:
            raise IndexError(f"buffer {j} outside [0, {self.n_buffers})")
        return min(self.config.buffer_batches, len(self) - j * self.config.buffer_batches)

    def buffer(self, epoch: int, j: int) -> BufferPlan:
        """The plan of this rank's buffer `j` in `epoch`."""
        c = self.config
        n_batches = self.buffer_n_batches(j)
        ep = self._epoch(epoch)
        k0 = j * c.buffer_batches
        columns = None
        if c.global_batch:  # this rank's columns of the global buffer: one contiguous range of the stream
            lo, hi = self.slice_range()
            base = k0 * c.batch_size
            segments = self._segments(ep, 0, self.n_split_cells, base + lo * n_batches, base + hi * n_batches)
            batch_size, seed, columns = hi - lo, (c.seed, epoch, j), (lo, hi, c.batch_size)
        else:
            lo, hi = self.rank_range()
            p0, p1 = k0 * c.batch_size, (k0 + n_batches) * c.batch_size
            segments = self._segments(ep, lo, hi - lo, p0, p1)
            batch_size, seed = c.batch_size, (c.seed, epoch, self.rank, j)
        return BufferPlan(
            epoch=epoch,
            rank=self.rank,
            index=j,
            first_batch=k0,
            n_batches=n_batches,
            batch_size=batch_size,
            segments=segments,
            shuffle_seed=seed,
            shuffle=c.shuffle,
            split=c.split,
            val_fraction=c.val_fraction,
            balance=self.balance,
            remainder=c.remainder,
            columns=columns,
        )

    def _segments(self, ep: _Epoch, lo: int, count: int, p0: int, p1: int) -> np.ndarray:
        """Segment rows of positions [p0, p1) of the range of `count` stream positions from `lo`; positions past
        `count` wrap around to its start, flagged pad (pad policy only)."""
        parts = []
        while p0 < p1:
            wrap, a = divmod(p0, count)
            b = min(count, a + p1 - p0)
            parts.append(self._pieces(ep, lo + a, lo + b, pad=wrap > 0))
            p0 += b - a
        return np.concatenate(parts) if parts else np.empty((0, 6), dtype=np.int64)

    def _pieces(self, ep: _Epoch, x0: int, x1: int, pad: bool) -> np.ndarray:
        """Segment rows (shard, start, stop, skip, take, pad) of stream positions [x0, x1), a row per block, in
        whole arrays: the consumer plans every buffer, and a Python loop over a buffer's 16-64 blocks cost it
        ~100 µs a buffer."""
        k0 = int(np.searchsorted(ep.cum, x0, side="right")) - 1
        k1 = int(np.searchsorted(ep.cum, x1, side="left"))
        ks = np.arange(k0, k1)
        shard, start, stop = self.blocks(ep.order[ks])
        first = ep.cum[ks]
        skip = np.maximum(x0, first) - first
        take = np.minimum(x1, ep.cum[ks + 1]) - first - skip
        if self.config.split == "all" or self.config.val_fraction == 0.0:
            # every cell of the block is in the split: read only the part needed
            start, stop, skip = start + skip, start + skip + take, np.zeros_like(skip)
        return np.stack([shard, start, stop, skip, take, np.full(len(ks), int(pad))], axis=1).astype(np.int64)

    def plan(self, epoch: int) -> list[BufferPlan]:
        return [self.buffer(epoch, j) for j in range(self.n_buffers)]

    # -- position
    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.batches_done = int(epoch), 0

    def fingerprint(self) -> dict[str, Any]:
        """The settings a mid-epoch position is valid for; the global plan's does not depend on the world size."""
        world = {} if self.config.global_batch else {"world_size": self.world_size}
        return {
            **self.config.model_dump(),
            **world,
            "n_cells": int(self.cell_offsets[-1]),
            "n_shards": len(self.shard_cells),
        }

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "batches_done": self.batches_done, "rank": self.rank, "plan": self.fingerprint()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue at the next unseen batch. Mid-epoch this needs the same plan settings and (per-rank plans only)
        the same world size; a global plan continues at the next unseen global batch at any world size."""
        batches_done = int(state["batches_done"])
        if batches_done and state.get("plan") != self.fingerprint():
            diff = {
                k: (v, self.fingerprint().get(k))
                for k, v in state.get("plan", {}).items()
                if self.fingerprint().get(k) != v
            }
            raise SamplerError(
                f"loader state is mid-epoch ({batches_done} batches done) but the plan settings differ "
                f"(saved, now): {diff}; resume with the same settings, or from an epoch boundary"
            )
        if not 0 <= batches_done <= len(self):
            raise SamplerError(f"loader state: batches_done={batches_done} outside [0, {len(self)}]")
        self.epoch, self.batches_done = int(state["epoch"]), batches_done
