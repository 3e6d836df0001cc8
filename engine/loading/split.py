"""The validation split: a cell is in "val" when splitmix64(global index ^ salt) < val_fraction * 2^64, stable for
a store and the same on every machine (training never reads a val cell); and the cells of a read plan's segments in
one split, in one kernel call (`segment_cells`, behind `engine.loading.sampler.BufferPlan.cells`)."""

from __future__ import annotations

import numba
import numpy as np

from engine.hashing import mix64

SPLIT_SALT = 0x5EED_CE11_0000_0001  # fixed: the split must not move when the shuffle seed does


@numba.njit(nogil=True, cache=True, inline="always")
def _split_hash(x):
    return mix64(x ^ np.uint64(SPLIT_SALT))


@numba.njit(nogil=True, cache=True)
def split_counts(block_first, block_len, threshold, want_val, out):
    """out[b] = cells of the split among block b's `block_len[b]` cells from global index `block_first[b]` on."""
    for b in range(block_first.shape[0]):
        c = 0
        f = block_first[b]
        for i in range(block_len[b]):
            c += (_split_hash(np.uint64(f + i)) < threshold) == want_val
        out[b] = c


def split_threshold(val_fraction: float) -> np.uint64:
    """The hash below which a cell is in "val"."""
    return np.uint64(min(2**64 - 1, int(val_fraction * 2**64)))


@numba.njit(nogil=True, cache=True)
def segment_cells(segments, cell_offsets, filtered, threshold, want_val, row, index, pad):
    """`BufferPlan.cells` (engine.loading.sampler): each segment's cells of the split, `take` of them after the
    first `skip`. Returns -1, or the first segment with fewer than `take` such cells."""
    o = 0
    base = 0  # the segment's first row among all the segments' cells
    for i in range(segments.shape[0]):
        shard, start, stop, skip, take, is_pad = segments[i]
        first = cell_offsets[shard] + start
        seen = 0  # cells of the split so far in this segment
        got = 0
        for j in range(stop - start):
            if got == take:
                break
            if filtered and (_split_hash(np.uint64(first + j)) < threshold) != want_val:
                continue
            if seen >= skip:
                row[o], index[o], pad[o] = base + j, first + j, is_pad != 0
                o += 1
                got += 1
            seen += 1
        if got != take:
            return i
        base += stop - start
    return -1
