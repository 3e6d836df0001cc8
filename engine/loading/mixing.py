"""Weighted mixing of several stores into one epoch stream (pretraining on several atlases).

    mix = Mix([Source("atlas.store", 0.5), Source("perturb.store", 0.3), Source("small.store", 0.2)])
    loader = Loader(mix, SamplerConfig(batch_size=4096), rank=rank, world_size=world_size)
    for batch in loader:   # as from one store, plus "source": each cell's position in `mix.sources`
        ...

The plan (`MixSampler`) is `engine.loading.sampler.Sampler`'s, over a different stream of blocks:

1. an epoch holds E cells (`epoch_cells`, default: all sources' cells together); source s gets the quota
   round(E * w_s / sum w) (largest remainders, so the quotas sum to E exactly);
2. source s fills its quota with *draws*: draw k is its blocks permuted by (seed, epoch, s, k), taken in order until
   the quota is met (the last block cut short). A source smaller than its quota is repeated (draw 0, 1, ...: every
   cell once per draw), a larger one subsampled without replacement (a random subset of its blocks);
3. the pieces of every source are permuted together by (seed, epoch): one stream of E positions, block-shuffled
   across all sources, that ranks, buffers, batches, the remainder policy, the global plan and the position
   (resume mid-epoch) cut exactly as for one store. A block's shard is a *virtual* shard: the source's shards
   follow each other (`shard_base`), so the read plan's segments keep their layout.

Vocabularies may differ: the run's genes are a given list or the union of the sources' (in order of first
appearance), each source's columns mapped onto them by gene id, as inference maps a store onto a checkpoint; the
categories of an obs column are the union too, each source's codes mapped onto them. The reading is
engine/loading/mix_reader.py's.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from engine.errors import LoaderError, SamplerError
from engine.loading.sampler import (
    Balance,
    Sampler,
    SamplerConfig,
    _Epoch,
    category_counts,
    check_rank,
    given_balance,
)
from engine.store.format import CSRBlock, Store

log = logging.getLogger(__name__)

MIX_SALT = 0x6D1C_5EED  # the joint permutation of all sources' pieces: a stream of its own


@dataclass(frozen=True)
class Source:
    """One store of a mix and its weight (its share of every epoch is weight / sum of weights)."""

    store: str | Path | Store
    weight: float = 1.0


@dataclass(frozen=True)
class Mix:
    """Several stores read as one: their weights, the epoch's size and the run's gene vocabulary.
    `weighted=False` reads every source's cells once per epoch (validation)."""

    sources: Sequence[Source]
    epoch_cells: int | None = None  # None: all sources' cells together
    genes: Sequence[str] | None = None  # the run's vocabulary; None: the union of the sources'
    weighted: bool = True

    def unweighted(self) -> Mix:
        return dataclasses.replace(self, epoch_cells=None, weighted=False)

    def by_path(self) -> Mix:
        """This mix with each source named by its path: what a reader actor opens again in its own process."""
        paths = [Source(str(s.store.path if isinstance(s.store, Store) else s.store), s.weight) for s in self.sources]
        return dataclasses.replace(self, sources=paths)

    def open(self) -> OpenMix:
        if not self.sources:
            raise LoaderError("a mix needs at least one source")
        for i, s in enumerate(self.sources):
            if not s.weight > 0:
                raise LoaderError(f"sources[{i}].weight is {s.weight!r}: expected a positive number")
        if self.epoch_cells is not None and self.epoch_cells < 1:
            raise LoaderError(f"epoch_cells is {self.epoch_cells!r}: expected a positive number of cells")
        stores = [s.store if isinstance(s.store, Store) else Store.open(s.store) for s in self.sources]
        genes = run_genes(stores, self.genes)
        return OpenMix(self, stores, genes, [gene_index(st, genes) for st in stores])


def run_genes(stores: Sequence[Store], genes: Sequence[str] | None = None) -> pd.Index:
    """The run's gene vocabulary: `genes`, or the union of the stores' gene ids in order of first appearance."""
    for st in stores:
        if not st.gene_ids.is_unique:
            raise LoaderError(f"{st.path}: var has duplicate gene ids; sources are mapped onto the run's genes by id")
    if genes is not None:
        out = pd.Index([str(g) for g in genes])
        if not out.is_unique or len(out) == 0:
            raise LoaderError("genes: expected a non-empty list of distinct gene ids")
        return out
    out = pd.Index([str(g) for g in stores[0].gene_ids])
    for st in stores[1:]:
        ids = pd.Index([str(g) for g in st.gene_ids])
        out = out.append(ids[~ids.isin(out)])
    return out


def gene_index(store: Store, genes: pd.Index) -> np.ndarray | None:
    """Store gene -> run column (-1: not a run gene); None when the store's vocabulary is the run's."""
    index = genes.get_indexer(pd.Index([str(g) for g in store.gene_ids])).astype(np.int64)
    if len(index) == len(genes) and np.array_equal(index, np.arange(len(genes))):
        return None
    if not (index >= 0).any():
        raise LoaderError(f"{store.path}: none of its genes is in the run's vocabulary of {len(genes)} genes")
    return index


def remap_genes(block: CSRBlock, index: np.ndarray, n_genes: int) -> CSRBlock:
    """The block's columns moved to `index[column]` of a vocabulary of `n_genes` (-1: dropped); rows stay sorted
    by column (a permuted vocabulary scrambles the order within rows, so they are sorted again)."""
    import scipy.sparse as sp

    cols = index[block.indices]
    keep = cols >= 0
    kept_before = np.zeros(len(keep) + 1, dtype=np.int64)
    np.cumsum(keep, out=kept_before[1:])
    indptr = kept_before[np.asarray(block.indptr, dtype=np.int64)]
    m = sp.csr_matrix((block.data[keep], cols[keep], indptr), shape=(block.n_cells, n_genes))
    m.sort_indices()
    return CSRBlock(indptr=m.indptr.astype(np.int64), indices=m.indices, data=m.data, n_genes=n_genes)


@dataclass
class OpenMix:
    """A mix with its stores opened and its vocabulary resolved."""

    mix: Mix
    stores: list[Store]
    genes: pd.Index
    gene_maps: list[np.ndarray | None]  # per source: store gene -> run column, None: the same vocabulary
    _categories: dict[str, list[str] | None] = field(default_factory=dict)

    @property
    def n_genes(self) -> int:
        return len(self.genes)

    @cached_property
    def shard_base(self) -> np.ndarray:
        """Virtual shard of each source's first shard: its shards follow those of the sources before it."""
        return np.concatenate([[0], np.cumsum([st.n_shards for st in self.stores])]).astype(np.int64)

    def source_of(self, shards: np.ndarray) -> np.ndarray:
        """The source each virtual shard belongs to."""
        return np.searchsorted(self.shard_base, shards, side="right") - 1

    @property
    def vocabulary_store(self) -> Store | None:
        """A source whose vocabulary is the run's (its statistics bind a transform pipeline), if any."""
        return next((st for st, m in zip(self.stores, self.gene_maps) if m is None), None)

    def categories(self, key: str) -> list[str] | None:
        """The union of the sources' categories of obs column `key` (None: a numeric column)."""
        if key not in self._categories:
            cats: list[str] | None = None
            for st in self.stores:
                schema = st.manifest.obs_schema.get(key)
                if schema is None:
                    raise LoaderError(f"{st.path}: no obs column {key!r}; it has {list(st.manifest.obs_schema)}")
                if "categories" in schema:
                    cats = (cats or []) + [c for c in schema["categories"] if c not in (cats or [])]
            self._categories[key] = cats
        return self._categories[key]

    def code_map(self, source: int, key: str) -> np.ndarray | None:
        """Source codes of `key` -> run codes, with a trailing -1 that code -1 (missing) indexes."""
        cats = self.categories(key)
        if cats is None:
            return None
        own = self.stores[source].manifest.obs_schema[key].get("categories", [])
        return np.array([cats.index(c) for c in own] + [-1], dtype=np.int64)

    def sampler(self, config: SamplerConfig, rank: int = 0, world_size: int = 1) -> MixSampler:
        """The plan of `rank`: each source's blocks (block size picked per store), then the mix's stream."""
        plain = config.model_copy(update={"balance_by": None, "class_weights": None, "global_batch": False})
        sources = [Sampler.for_store(st, plain) for st in self.stores]
        block = max(s.config.block_size for s in sources)  # sizes the buffers
        config = config.model_copy(update={"block_size": config.block_size or block})
        balance = None if config.balance_by is None else self.balance(config.balance_by, config.class_weights, sources)
        return MixSampler(self, sources, config, rank, world_size, balance)

    def balance(self, key: str, class_weights: dict[str, float] | None, sources: list[Sampler]) -> Balance:
        """Class weights over the union of categories: given, or the inverse of each class's expected share of an
        epoch (each source's counts scaled by its quota over its size)."""
        cats = self.categories(key)
        if cats is None:
            raise SamplerError(f"balance_by={key!r} needs a categorical obs column in every source")
        if class_weights is not None:
            return given_balance(key, cats, class_weights)
        quota = quotas(self, sources)
        counts = np.zeros(len(cats))
        for s, st in enumerate(self.stores):
            own = category_counts(st, key)
            np.add.at(counts, self.code_map(s, key)[:-1], own * quota[s] / sources[s].n_split_cells)
        w = np.where(counts > 0, 1.0 / np.maximum(counts, 1e-300), 0.0)
        return Balance(key, np.concatenate([w, [0.0]]))


def quotas(mix: OpenMix, sources: Sequence[Sampler]) -> np.ndarray:
    """Cells of each source in an epoch: round(E * w / sum w) by largest remainders (they sum to E), or each
    source's own cells when the mix is unweighted."""
    sizes = np.array([s.n_split_cells for s in sources], dtype=np.int64)
    if not mix.mix.weighted:
        return sizes
    total = int(mix.mix.epoch_cells or sizes.sum())
    w = np.array([s.weight for s in mix.mix.sources], dtype=np.float64)
    exact = total * w / w.sum()
    out = np.floor(exact).astype(np.int64)
    out[np.argsort(-(exact - out), kind="stable")[: total - int(out.sum())]] += 1
    return out


class MixSampler(Sampler):
    """The plan over a mix's stream (see the module docstring). Block ids are global: source s's blocks follow
    those of the sources before it (`block_base`), and so do its shards (`shard_base`)."""

    def __init__(
        self,
        mix: OpenMix,
        sources: list[Sampler],
        config: SamplerConfig,
        rank: int = 0,
        world_size: int = 1,
        balance: Balance | None = None,
    ):
        check_rank(config, rank, world_size)
        self.config, self.rank, self.world_size, self.balance = config, rank, world_size, balance
        self.mix, self.sources = mix, sources
        self.block_base = np.concatenate([[0], np.cumsum([s.n_blocks for s in sources])]).astype(np.int64)
        # the sources' block tables laid end to end: per virtual shard, its first global block, block size and cells
        self._block_offsets = np.concatenate(
            [s.block_offsets[:-1] + b for s, b in zip(sources, self.block_base)] + [self.block_base[-1:]]
        )
        self._block_size = np.concatenate([np.full(len(s.shard_cells), s.config.block_size) for s in sources])
        self._shard_cells = np.concatenate([s.shard_cells for s in sources])
        self.quota = quotas(mix, sources)
        self.n_split_cells = int(self.quota.sum())
        self.epoch, self.batches_done = 0, 0
        self._cache: dict[int, _Epoch] = {}

    def blocks(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Global block ids -> (virtual shard, start, stop)."""
        ids = np.asarray(ids, dtype=np.int64)
        shard = np.searchsorted(self._block_offsets, ids, side="right") - 1  # as each source's Sampler.blocks
        start = (ids - self._block_offsets[shard]) * self._block_size[shard]
        stop = np.minimum(start + self._block_size[shard], self._shard_cells[shard])
        return shard, start, stop

    def _draws(self, s: int, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """Source s's pieces of an epoch: (global block id, cells taken from the block's start)."""
        src, c = self.sources[s], self.config
        ids, counts, need, k = [], [], int(self.quota[s]), 0
        while need > 0:
            if c.shuffle:
                order = np.random.Generator(np.random.PCG64([c.seed, epoch, s, k])).permutation(src.n_blocks)
            else:
                order = np.arange(src.n_blocks, dtype=np.int64)
            order = order[src.block_counts[order] > 0]
            n = src.block_counts[order]
            cum = np.cumsum(n)
            m = min(len(order), int(np.searchsorted(cum, need, side="left")) + 1)
            n = n[:m].copy()
            n[-1] -= max(0, int(cum[m - 1]) - need)  # the last block cut short
            ids.append(order[:m] + self.block_base[s])
            counts.append(n)
            need -= int(n.sum())
            k += 1
        empty = np.empty(0, dtype=np.int64)
        return np.concatenate(ids) if ids else empty, np.concatenate(counts) if counts else empty

    def _epoch(self, epoch: int) -> _Epoch:
        if epoch not in self._cache:
            drawn = [self._draws(s, epoch) for s in range(len(self.sources))]
            order = np.concatenate([d[0] for d in drawn])
            counts = np.concatenate([d[1] for d in drawn])
            if self.config.shuffle:
                perm = np.random.Generator(np.random.PCG64([self.config.seed, epoch, MIX_SALT])).permutation(len(order))
                order, counts = order[perm], counts[perm]
            cum = np.zeros(len(order) + 1, dtype=np.int64)
            np.cumsum(counts, out=cum[1:])
            while len(self._cache) >= 2:  # the Loader plans epochs in order, reading ahead
                self._cache.pop(next(iter(self._cache)))
            self._cache[epoch] = _Epoch(order, cum)
        return self._cache[epoch]

    def source_counts(self, epoch: int) -> np.ndarray:
        """Cells of each source in the epoch's stream (all ranks together, before the remainder policy)."""
        ep = self._epoch(epoch)
        src = np.searchsorted(self.block_base, ep.order, side="right") - 1
        return np.bincount(src, weights=np.diff(ep.cum), minlength=len(self.sources)).astype(np.int64)

    def fingerprint(self) -> dict[str, Any]:
        world = {} if self.config.global_batch else {"world_size": self.world_size}
        return {
            **self.config.model_dump(),
            **world,
            "sources": [
                {"n_cells": int(s.cell_offsets[-1]), "n_shards": len(s.shard_cells), "weight": float(w.weight)}
                for s, w in zip(self.sources, self.mix.mix.sources)
            ],
            "epoch_cells": self.n_split_cells,
            "weighted": self.mix.mix.weighted,
        }
