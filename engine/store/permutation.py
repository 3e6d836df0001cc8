"""A seeded pseudorandom permutation of [0, n) evaluated pointwise, in O(1) memory.

Ingest uses it to give every input cell its place in the shuffled store without materialising an
O(cells) permutation: a 4-round Feistel network on the smallest even-bit domain >= n, with cycle-walking
to stay inside [0, n). Being a bijection, every cell lands at exactly one position.
"""

from __future__ import annotations

import numpy as np

from engine.hashing import mix64_array

_ROUNDS = 4


class FeistelPermutation:
    def __init__(self, n: int, seed: int):
        if n < 1:
            raise ValueError(f"permutation of an empty range (n={n})")
        self.n = int(n)
        self.half_bits = max(1, (int(n - 1).bit_length() + 1) // 2)
        self.mask = np.uint64((1 << self.half_bits) - 1)
        keys = np.random.default_rng(seed).integers(0, 2**63, size=_ROUNDS, dtype=np.int64)
        self.keys = [np.uint64(k) for k in keys]

    def _encrypt(self, x: np.ndarray) -> np.ndarray:
        shift = np.uint64(self.half_bits)
        left, right = x >> shift, x & self.mask
        for k in self.keys:
            left, right = right, left ^ (mix64_array(right.ravel(), k).reshape(right.shape) & self.mask)
        return (left << shift) | right

    def __call__(self, index: np.ndarray) -> np.ndarray:
        """Position of each index in the permuted order (int64, same shape)."""
        x = np.asarray(index, dtype=np.int64)
        if x.size and (x.min() < 0 or x.max() >= self.n):
            raise IndexError(f"index outside [0, {self.n})")
        with np.errstate(over="ignore"):
            y = self._encrypt(x.astype(np.uint64))
            outside = y >= np.uint64(self.n)
            while outside.any():  # cycle-walk: at most a few rounds since the domain is < 4n
                y[outside] = self._encrypt(y[outside])
                outside = y >= np.uint64(self.n)
        return y.astype(np.int64)
