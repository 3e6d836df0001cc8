"""Per-gene moments merged across blocks with Chan's parallel formula: the result does not depend on how the
store is split into blocks (or shards, or tasks)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Moments:
    """Per (layer, group, gene) count, sum, mean and M2. M2 merges with Chan's formula; the reported mean is
    sum / n, which for integer counts is exact and so bitwise equal to scanpy's (genes with equal totals tie
    exactly, which seurat_v3's loess fit is sensitive to)."""

    n: np.ndarray  # (groups,) int64 cells
    sum: np.ndarray  # (layers, groups, genes) float64
    mean: np.ndarray  # (layers, groups, genes) float64, Chan's running mean (for merging M2)
    m2: np.ndarray  # (layers, groups, genes) float64

    def merge(self, other: Moments) -> Moments:
        na = self.n[None, :, None].astype(np.float64)
        nb = other.n[None, :, None].astype(np.float64)
        n = na + nb
        safe = np.where(n > 0, n, 1)
        delta = other.mean - self.mean
        mean = self.mean + delta * np.where(n > 0, nb / safe, 0.0)
        m2 = self.m2 + other.m2 + delta * delta * np.where(n > 0, na * nb / safe, 0.0)
        return Moments(self.n + other.n, self.sum + other.sum, mean, m2)

    def total(self) -> Moments:
        """All groups merged into one (in group order)."""
        out = self.group(0)
        for g in range(1, len(self.n)):
            out = out.merge(self.group(g))
        return out

    def group(self, g: int) -> Moments:
        sl = slice(g, g + 1)
        return Moments(self.n[sl], self.sum[:, sl], self.mean[:, sl], self.m2[:, sl])

    def means(self) -> np.ndarray:
        return self.sum / np.maximum(self.n, 1)[None, :, None]

    def var(self) -> np.ndarray:
        d = (self.n - 1).astype(np.float64)[None, :, None]
        return np.where(d > 0, self.m2 / np.where(d > 0, d, 1), 0.0)


def merge_counts(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Merge (sorted unique keys, counts) pairs into one."""
    keys = np.concatenate([k for k, _ in parts])
    counts = np.concatenate([c for _, c in parts])
    u, inv = np.unique(keys, return_inverse=True)
    return u, np.bincount(inv, weights=counts, minlength=len(u)).astype(np.int64)
