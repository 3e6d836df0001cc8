"""Helpers of the loading tests."""

from __future__ import annotations

import numpy as np

from engine.hashing import mix64_array
from engine.loading.split import SPLIT_SALT, split_threshold


def split_mask(first_global: int, n: int, split: str, val_fraction: float) -> np.ndarray:
    """Which of the cells [first_global, first_global + n) belong to `split`, from the split's definition (the
    reference the plan's kernels are checked against): a cell is in "val" when mix64(global index ^ salt) falls
    below val_fraction * 2^64."""
    if split == "all" or val_fraction == 0.0:
        return np.full(n, split != "val", dtype=bool)
    h = mix64_array(np.arange(first_global, first_global + n, dtype=np.uint64), np.uint64(SPLIT_SALT))
    return (h < split_threshold(val_fraction)) == (split == "val")
