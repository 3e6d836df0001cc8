"""A store's genes and obs categories mapped onto what a checkpoint was trained on, by name.

A model's input column j means the j-th gene of its training store, and an obs code c the c-th category there.
Another store may hold the same genes in another order, fewer genes, or other categories: inference maps its
gene ids onto the checkpoint's vocabulary (`meta["vocabulary"]`, written by training) and its categories onto the
training categories, so the same cells give the same numbers whatever the store's layout.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from engine.errors import InferError
from engine.loading.mixing import remap_genes
from engine.store.format import CSRBlock
from engine.train.checkpoint import gene_fingerprint

log = logging.getLogger(__name__)

MIN_GENE_OVERLAP = 0.5  # default: refuse a store holding under half of the checkpoint's genes


@dataclass(frozen=True)
class GeneMap:
    """Store gene -> training column (-1: not a training gene). `index is None`: the same vocabulary."""

    index: np.ndarray | None
    n_genes: int  # training vocabulary size: the width of remapped blocks
    n_missing: int  # training genes the store lacks (they stay zero)
    n_dropped: int  # store genes the model never saw
    fingerprint: str  # of the training vocabulary

    def apply(self, block: CSRBlock) -> CSRBlock:
        """The block with its columns in training order; dropped genes removed; rows sorted by column."""
        return block if self.index is None else remap_genes(block, self.index, self.n_genes)


def training_genes(meta: dict[str, Any]) -> list[str] | None:
    vocab = meta.get("vocabulary") or {}
    return vocab.get("genes")


def map_genes(
    store_genes: pd.Index, meta: dict[str, Any], where: str, min_overlap: float = MIN_GENE_OVERLAP
) -> GeneMap:
    """Map a store's gene ids onto the checkpoint's training vocabulary.

    Missing training genes stay zero (a warning gives the count); a store with fewer than `min_overlap` of the
    training genes is refused, since the model would see mostly zeros. A checkpoint without a recorded vocabulary
    (written before vocabularies were kept) is assumed to match the store column for column.
    """
    store_genes = pd.Index([str(g) for g in store_genes])
    genes = training_genes(meta)
    if genes is None:
        log.warning(
            "%s: the checkpoint records no gene vocabulary; assuming the store's %d genes in its order",
            where,
            len(store_genes),
        )
        return GeneMap(None, len(store_genes), 0, 0, gene_fingerprint(store_genes))
    fingerprint = meta["vocabulary"].get("fingerprint") or gene_fingerprint(genes)
    if len(store_genes) == len(genes) and gene_fingerprint(store_genes) == fingerprint:
        return GeneMap(None, len(genes), 0, 0, fingerprint)
    if not store_genes.is_unique:
        raise InferError(f"{where}: var has duplicate gene ids; genes are mapped onto the checkpoint's by id")
    index = pd.Index(genes).get_indexer(store_genes).astype(np.int64)
    n_present = int((index >= 0).sum())
    n_missing = len(genes) - n_present
    if n_present < min_overlap * len(genes):
        raise InferError(
            f"{where}: only {n_present} of the checkpoint's {len(genes)} genes ({100 * n_present / len(genes):.0f}%) "
            f"are in the store; at least {100 * min_overlap:.0f}% are needed (min_gene_overlap)"
        )
    if n_missing:
        log.warning(
            "%s: %d of the checkpoint's %d genes are not in the store; they are zero for every cell",
            where,
            n_missing,
            len(genes),
        )
    n_dropped = len(store_genes) - n_present
    if n_dropped:
        log.info(
            "%s: %d store genes are not in the checkpoint's vocabulary; the model does not see them", where, n_dropped
        )
    return GeneMap(index, len(genes), n_missing, n_dropped, fingerprint)


def category_maps(
    meta: dict[str, Any],
    store_schema: dict[str, dict[str, Any]],
    keys: tuple[str, ...],
    where: str,
    labels: tuple[str, ...] = (),
) -> dict[str, list[str] | None]:
    """For each obs key the model reads: the training categories its codes index (None: numeric, used as is).

    A key the store lacks is read as missing (code -1) for every cell, with a warning unless it is one of
    `labels` (what a classifier head predicts: new cells have no label).
    """
    recorded = (meta.get("vocabulary") or {}).get("obs_categories") or {}
    out: dict[str, list[str] | None] = {}
    for key in keys:
        if key not in store_schema:
            if key not in labels:
                log.warning(
                    "%s: obs has no column %r (the model reads it): every cell gets the missing value", where, key
                )
            out[key] = list(recorded.get(key) or [])
            continue
        cats = recorded.get(key, store_schema[key].get("categories"))
        out[key] = list(cats) if cats is not None else None
    return out


def obs_codes(obs: pd.DataFrame, key: str, categories: list[str] | None) -> np.ndarray:
    """int64 codes of column `key` in the training categories (-1: missing or unseen in training)."""
    if categories is None:
        return np.asarray(obs[key].to_numpy())
    if key not in obs.columns:
        return np.full(len(obs), -1, dtype=np.int64)
    values = obs[key].astype(object).where(obs[key].notna(), None)
    return pd.Categorical(values, categories=categories).codes.astype(np.int64)
