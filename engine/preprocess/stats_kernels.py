"""Numba kernels of the statistics stage: per-gene moments of counts, normalized and log-normalized values,
non-zero counts and median histograms, accumulated block by block (see engine/preprocess/stats.py).

Values are normalized and log-transformed exactly as the per-cell kernels do (engine/preprocess/kernels.py), so
the statistics describe what the loader's transforms produce.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from engine.preprocess.kernels import TABLE, log1p32, row_factor

# Medians of normalized non-zeros come from two dense histograms per gene over u = log(target / v): a coarse one
# in the first pass locates the bin of each middle element, a fine one inside that bin in the second pass.
MED_SPAN = 32.0  # u in [0, 32): values down to target * e^-32 (libraries up to ~8e13)
MED_COARSE = 256
MED_FINE = 256
MED_W1 = MED_SPAN / MED_COARSE
MED_W2 = MED_W1 / MED_FINE
MEDIAN_REL_ERROR = float(np.expm1(MED_W2 / 2))  # bound on |estimate / exact median - 1|


@njit(cache=True, inline="always")
def _med_u(v, log_target):
    u = log_target - np.log(np.float64(v))
    if u < 0:
        u = 0.0
    if u >= MED_SPAN:
        u = MED_SPAN * (1 - 1e-12)
    return u


@njit(cache=True, inline="always")
def _norm_log_u(x, f, log_target, table_v, table_l, table_u):
    """(normalized, its log1p, its median-histogram coordinate u) of a value in a cell with size factor f,
    memoised per cell for small integral counts (most of a cell's non-zeros share a few dozen count values)."""
    xf = np.float32(x)
    if xf >= 0 and xf < TABLE:
        c = np.int64(xf)
        if np.float32(c) == xf:
            if table_v[c] != table_v[c]:  # NaN: first time in this cell
                v = np.float32(np.float64(xf) / f)
                table_v[c] = v
                table_l[c] = log1p32(v)
                table_u[c] = _med_u(v, log_target) if v > 0 else -1.0
            return table_v[c], table_l[c], table_u[c]
    v = np.float32(np.float64(xf) / f)
    return v, log1p32(v), (_med_u(v, log_target) if v > 0 else -1.0)


@njit(cache=True)
def accumulate_moments(indptr, indices, data, groups, target, layers, sums, nnz, med_coarse):
    """First pass of one block's statistics: per (layer, group, gene) sums of values, per (group, gene) nnz, and
    the coarse histogram (gene, bin) of normalized non-zeros for the medians.

    layers (selected by the flags in `layers`, a bool[4]): 0 counts, 1 normalized (normalize_total `target`),
    2 log1p of normalized, 3 expm1 of that log (what scanpy's seurat flavor computes from log data).
    Serial on purpose: statistics parallelise over blocks (Ray tasks), and a serial sum is reproducible.
    """
    n = len(indptr) - 1
    log_target = np.log(target)
    table_v = np.empty(TABLE, dtype=np.float32)
    table_l = np.empty(TABLE, dtype=np.float32)
    table_u = np.empty(TABLE, dtype=np.float64)
    for i in range(n):
        gr = groups[i]
        f = row_factor(indptr, indices, data, indices, False, False, i, target)
        table_v[:] = np.nan
        for j in range(indptr[i], indptr[i + 1]):
            g = indices[j]
            x = np.float32(data[j])
            nnz[gr, g] += 1
            if layers[0]:
                sums[0, gr, g] += np.float64(x)
            v, lv, u = _norm_log_u(x, f, log_target, table_v, table_l, table_u)
            if layers[1]:
                sums[1, gr, g] += np.float64(v)
            if layers[2]:
                sums[2, gr, g] += np.float64(lv)
            if layers[3]:
                sums[3, gr, g] += np.float64(np.float32(np.expm1(np.float64(lv))))
            if u >= 0:
                med_coarse[g, np.int64(u / MED_W1)] += 1


@njit(cache=True)
def accumulate_m2(indptr, indices, data, groups, target, layers, means, m2):
    """Second sweep over the same block: per (layer, group, gene) sum of squared deviations from the block
    means over the non-zeros. The zeros' share, (n - nnz) * mean^2, is added by the caller."""
    n = len(indptr) - 1
    log_target = np.log(target)
    table_v = np.empty(TABLE, dtype=np.float32)
    table_l = np.empty(TABLE, dtype=np.float32)
    table_u = np.empty(TABLE, dtype=np.float64)
    for i in range(n):
        gr = groups[i]
        f = row_factor(indptr, indices, data, indices, False, False, i, target)
        table_v[:] = np.nan
        for j in range(indptr[i], indptr[i + 1]):
            g = indices[j]
            x = np.float32(data[j])
            if layers[0]:
                d = np.float64(x) - means[0, gr, g]
                m2[0, gr, g] += d * d
            v, lv, _ = _norm_log_u(x, f, log_target, table_v, table_l, table_u)
            if layers[1]:
                d = np.float64(v) - means[1, gr, g]
                m2[1, gr, g] += d * d
            if layers[2]:
                d = np.float64(lv) - means[2, gr, g]
                m2[2, gr, g] += d * d
            if layers[3]:
                d = np.float64(np.float32(np.expm1(np.float64(lv)))) - means[3, gr, g]
                m2[3, gr, g] += d * d


@njit(cache=True)
def second_pass(indptr, indices, data, groups, target, do_clip, clip_val, sums, sq_sums, med_bins, med_fine):
    """The second pass over a block: seurat_v3's per (group, gene) sum and sum of squares of min(x, clip_val)
    (when `do_clip`), and the fine median histograms inside each gene's two selected coarse bins
    (med_bins[g] = coarse bins of the lower and upper middle elements)."""
    n = len(indptr) - 1
    log_target = np.log(target)
    table_v = np.empty(TABLE, dtype=np.float32)
    table_l = np.empty(TABLE, dtype=np.float32)
    table_u = np.empty(TABLE, dtype=np.float64)
    for i in range(n):
        gr = groups[i]
        f = row_factor(indptr, indices, data, indices, False, False, i, target)
        table_v[:] = np.nan
        for j in range(indptr[i], indptr[i + 1]):
            g = indices[j]
            if do_clip:
                e = min(np.float64(data[j]), clip_val[gr, g])
                sums[gr, g] += e
                sq_sums[gr, g] += e * e
            b0 = med_bins[g, 0]
            if b0 < 0:
                continue
            _, _, u = _norm_log_u(data[j], f, log_target, table_v, table_l, table_u)
            if u < 0:
                continue
            b = np.int64(u / MED_W1)
            if b == b0 or b == med_bins[g, 1]:
                k = min(np.int64((u - b * MED_W1) / MED_W2), MED_FINE - 1)
                if b == b0:
                    med_fine[g, 0, k] += 1
                if b == med_bins[g, 1]:
                    med_fine[g, 1, k] += 1
