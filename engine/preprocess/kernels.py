"""Numba kernels for per-cell preprocessing: fused normalize/log1p/select/scale/densify, binning, rank tokens, masks.

Every kernel works on the CSR arrays of a batch (indptr, indices, data) in whatever dtype the store holds
(uint16/uint32 indices; uint16/uint32 counts or float32 data), writes into preallocated outputs, and runs
parallel over cells. Arithmetic follows scanpy exactly where there is a scanpy counterpart:

- normalize_total: library = float32(sum of float32 values, accumulated in float64); factor =
  float32(library / target) (1 where the library is 0); value = float32(x / factor).
- log1p: float32(log1p(x)) computed in float64 (`log1p32`; within one ulp of numpy's float32 log1p).
- scale: (x - mean) / std in float64 with std = 1 where it is 0, clipped to [-max_value, max_value]
  (only above when not zero-centred), then float32.

Compiled kernels are cached on disk (`cache=True`), so a fresh Ray worker loads them instead of compiling.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Iterator

import numba
import numpy as np
from numba import njit, prange

from engine.cachehints import store_fence, stream_row
from engine.hashing import splitmix64_next

log = logging.getLogger(__name__)


def _configure_threading() -> None:
    """Prefer the OpenMP layer: unlike `workqueue` it is safe when several threads (a Ray actor's reader threads)
    launch kernels at once; Ray workers are spawned, not forked, so its fork caveat does not bite."""
    if os.environ.get("NUMBA_THREADING_LAYER"):
        return
    try:
        from numba.np.ufunc import omppool  # noqa: F401

        numba.config.THREADING_LAYER = "omp"
    except ImportError:  # no libgomp: numba falls back to its default choice
        log.debug("numba OpenMP threading layer unavailable; using numba's default")


_configure_threading()


@contextlib.contextmanager
def num_threads(n: int | None) -> Iterator[None]:
    """Run kernels with `n` threads inside the block (None: leave as is)."""
    if n is None:
        yield
        return
    old = numba.get_num_threads()
    numba.set_num_threads(max(1, min(n, numba.config.NUMBA_NUM_THREADS)))
    try:
        yield
    finally:
        numba.set_num_threads(old)


# ----------------------------------------------------------------------------------------------- value steps


@njit(cache=True, inline="always")
def row_factor(indptr, indices, data, gene_map, has_map, lib_selected, i, target):
    """scanpy's size factor of row i: float32(float32(library) / target), 1 for an empty row."""
    s = 0.0
    for j in range(indptr[i], indptr[i + 1]):
        if has_map and lib_selected and gene_map[indices[j]] < 0:
            continue
        s += np.float64(np.float32(data[j]))
    f = np.float32(np.float64(np.float32(s)) / target)
    if f == 0:
        f = np.float32(1.0)
    return np.float64(f)


@njit(cache=True, inline="always")
def _column(gene, gene_map, has_map):
    """The output column of store gene `gene`: gene_map's (-1: dropped), or the gene itself without a map."""
    return gene_map[np.int64(gene)] if has_map else np.int64(gene)


@njit(cache=True, inline="always")
def log1p32(v):
    """float32(log1p(v)) of a float32 v, computed in float64 through log (faster than libm's log1p: `python
    bench/kernels.py` times both): u = 1 + v rounds, and log(u) - (u - 1 - v) / u corrects for it (Goldberg), within
    an ulp of float64 log1p, so the float32 result is log1p's but where the two straddle a float32 rounding boundary
    (never in the test's or the bench's million normalized counts). Where u is 1 (v below 2^-53), below 1, or not
    finite: libm's log1p."""
    x = np.float64(v)
    u = 1.0 + x
    if 1.0 < u < np.inf:
        return np.float32(math.log(u) - ((u - 1.0) - x) / u)
    return np.float32(np.log1p(x))


@njit(cache=True, inline="always")
def _value(x, factor, do_norm, do_log):
    v = np.float32(x)
    if do_norm:
        v = np.float32(np.float64(v) / factor)
    if do_log:
        v = log1p32(v)
    return v


@njit(cache=True, inline="always")
def _scaled(v, mean, std, max_value, zero_center):
    w = np.float64(v)
    if zero_center:
        w -= mean
    w /= std
    if max_value > 0:
        if w > max_value:
            w = max_value
        elif zero_center and w < -max_value:
            w = -max_value
    return np.float32(w)


TABLE = 256  # integer counts below this take their per-cell value from a small table (one log1p per distinct count)


@njit(cache=True, inline="always")
def _value_cached(x, factor, do_norm, do_log, table):
    """`_value`, memoised per cell for small integral counts: a cell of 2,000 non-zeros holds a few dozen distinct
    counts, so this replaces most log1p calls (the kernel's main cost) with a table read. Same numbers."""
    xf = np.float32(x)
    if xf >= 0 and xf < TABLE:
        c = np.int64(xf)
        if np.float32(c) == xf:
            v = table[c]
            if v != v:  # NaN: not computed yet in this cell
                v = _value(xf, factor, do_norm, do_log)
                table[c] = v
            return v
    return _value(xf, factor, do_norm, do_log)


STREAM_ROWS = 64  # rows per parallel task of transform_dense: one scratch row and table each


@njit(cache=True, parallel=True)
def transform_dense(
    indptr, indices, data, gene_map, has_map, lib_selected, do_norm, target, do_log,
    do_scale, mean, std, max_value, zero_center, out, zeroed=False,
):  # fmt: skip
    """The fused value pipeline into a dense, C-contiguous float32 `out` (n_cells, n_out), zeroed or filled here.

    gene_map[g] is the output column of store gene g, or -1 to drop it (`has_map` False: identity).
    `lib_selected`: library sizes count only kept genes (select_genes ran before normalize_total).
    `mean`/`std` are indexed by output column. `max_value <= 0` disables clipping.
    `zeroed`: `out` is known to be all zeros (fresh np.zeros), so values are written straight into it. Otherwise
    every column is written: each row is built in a scratch row (the value of a zero everywhere else) and streamed
    out whole (`stream_row`), so the old batch's lines are not read from memory before being overwritten.
    """
    n = len(indptr) - 1
    n_out = out.shape[1]
    memo = do_norm or do_log
    streamed = do_scale or not zeroed
    blank = np.zeros(n_out if streamed else 0, dtype=np.float32)  # a row's columns where the cell has no count
    if do_scale:
        for c in range(n_out):
            blank[c] = _scaled(np.float32(0.0), mean[c], std[c], max_value, zero_center)
    for task in prange((n + STREAM_ROWS - 1) // STREAM_ROWS):
        scratch = blank.copy()
        written = np.empty(n_out if streamed else 0, dtype=np.int64)  # the scratch row's columns written so far
        table = np.empty(TABLE if memo else 1, dtype=np.float32)
        for i in range(task * STREAM_ROWS, min(n, (task + 1) * STREAM_ROWS)):
            row = scratch if streamed else out[i]
            factor = 1.0
            if do_norm:
                factor = row_factor(indptr, indices, data, gene_map, has_map, lib_selected, i, target)
            table[:] = np.nan
            w = 0
            for j in range(indptr[i], indptr[i + 1]):
                c = _column(indices[j], gene_map, has_map)
                if c < 0:
                    continue
                v = _value_cached(data[j], factor, do_norm, do_log, table) if memo else np.float32(data[j])
                if do_scale:
                    v = _scaled(v, mean[c], std[c], max_value, zero_center)
                row[c] = v
                if streamed and w < n_out:
                    written[w] = c
                    w += 1
            if streamed:
                stream_row(out[i], scratch)
                if w < n_out:  # back to blank for the next row: the columns written (a row of many genes dropped
                    for k in range(w):  # by the map has few)
                        scratch[written[k]] = blank[written[k]]
                else:  # as many writes as columns (a value in every column, or genes repeated): all of it
                    scratch[:] = blank
        if streamed:
            store_fence()
    return out


@njit(cache=True, parallel=True)
def kept_per_row(indptr, indices, gene_map, out):
    """out[i] = number of non-zeros of row i whose gene is kept by gene_map."""
    for i in prange(len(indptr) - 1):
        k = 0
        for j in range(indptr[i], indptr[i + 1]):
            if gene_map[indices[j]] >= 0:
                k += 1
        out[i] = k
    return out


@njit(cache=True, parallel=True)
def transform_csr(
    indptr, indices, data, gene_map, has_map, sort_rows, lib_selected, do_norm, target, do_log,
    out_indptr, out_indices, out_data,
):  # fmt: skip
    """The fused value pipeline into CSR outputs (out_indptr precomputed from `kept_per_row`); same sparsity
    as the input restricted to kept genes. `sort_rows`: the map reorders columns, so sort each row's indices."""
    n = len(indptr) - 1
    for i in prange(n):
        factor = 1.0
        if do_norm:
            factor = row_factor(indptr, indices, data, gene_map, has_map, lib_selected, i, target)
        k = out_indptr[i]
        table = np.full(TABLE, np.nan, dtype=np.float32)
        for j in range(indptr[i], indptr[i + 1]):
            c = _column(indices[j], gene_map, has_map)
            if c < 0:
                continue
            out_indices[k] = c
            out_data[k] = _value_cached(data[j], factor, do_norm, do_log, table)
            k += 1
        if sort_rows:
            lo, hi = out_indptr[i], out_indptr[i + 1]
            order = np.argsort(out_indices[lo:hi])
            out_indices[lo:hi] = out_indices[lo:hi][order]
            out_data[lo:hi] = out_data[lo:hi][order]
    return out_indptr


@njit(cache=True, parallel=True)
def library_sizes(indptr, data, out):
    """Per-cell sum of values (float64 accumulation)."""
    for i in prange(len(indptr) - 1):
        s = 0.0
        for j in range(indptr[i], indptr[i + 1]):
            s += np.float64(data[j])
        out[i] = s
    return out


@njit(cache=True, parallel=True)
def any_negative(data) -> bool:
    n = len(data)
    chunks = 64
    flags = np.zeros(chunks, dtype=np.bool_)
    step = (n + chunks - 1) // chunks
    for t in prange(chunks):
        for j in range(t * step, min(n, (t + 1) * step)):
            if data[j] < 0:
                flags[t] = True
                break
    return flags.any()


# ----------------------------------------------------------------------------------------------- tokens


@njit(cache=True, parallel=True)
def bin_values(X, n_bins, out):
    """scGPT value binning: per row, edges = np.quantile(non-zeros, linspace(0, 1, n_bins - 1)) (numpy's linear
    method, reproduced bit for bit), bin = np.digitize(x, edges) in 1..n_bins-1 for non-zeros, 0 for zeros."""
    n, g = X.shape
    q = np.linspace(0.0, 1.0, n_bins - 1)
    for i in prange(n):
        row = X[i]
        m = 0
        for c in range(g):
            if row[c] != 0:
                m += 1
        out[i, :] = 0
        if m == 0:
            continue
        nz = np.empty(m, dtype=X.dtype)
        k = 0
        for c in range(g):
            if row[c] != 0:
                nz[k] = row[c]
                k += 1
        s = np.sort(nz)
        edges = np.empty(n_bins - 1, dtype=np.float64)
        for b in range(n_bins - 1):
            vi = np.float64(m - 1) * q[b]
            lo = np.int64(np.floor(vi))
            hi = min(lo + 1, m - 1)
            t = vi - np.float64(lo)
            a = s[lo]
            d = np.float64(s[hi] - a)  # numpy subtracts in the array dtype
            if t >= 0.5:
                edges[b] = np.float64(s[hi]) - d * (1.0 - t)
            else:
                edges[b] = np.float64(a) + d * t
        for c in range(g):
            v = row[c]
            if v != 0:
                out[i, c] = np.searchsorted(edges, np.float64(v), side="right")
    return out


@njit(cache=True, parallel=True)
def rank_tokens(indptr, indices, data, medians, max_len, offset, pad_id, out_genes, out_values, out_len):
    """Geneformer rank-value tokens of CSR rows (columns already in model order): r = x / medians[col] for
    x > 0, sorted by r descending (ties: lower column first), top `max_len`; token = col + offset; padded."""
    n = len(indptr) - 1
    for i in prange(n):
        lo, hi = indptr[i], indptr[i + 1]
        m = 0
        for j in range(lo, hi):
            if data[j] > 0 and medians[indices[j]] > 0:
                m += 1
        cols = np.empty(m, dtype=np.int64)
        vals = np.empty(m, dtype=np.float64)
        k = 0
        for j in range(lo, hi):
            c = np.int64(indices[j])
            if data[j] > 0 and medians[c] > 0:
                cols[k] = c
                vals[k] = np.float64(data[j]) / medians[c]
                k += 1
        by_col = np.argsort(cols, kind="mergesort")
        cols = cols[by_col]
        vals = vals[by_col]
        order = np.argsort(-vals, kind="mergesort")
        L = min(m, max_len)
        for t in range(L):
            out_genes[i, t] = cols[order[t]] + offset
            out_values[i, t] = np.float32(vals[order[t]])
        for t in range(L, max_len):
            out_genes[i, t] = pad_id
            out_values[i, t] = 0
        out_len[i] = L
    return out_len


# ----------------------------------------------------------------------------------------------- masking


@njit(cache=True, parallel=True)
def random_mask(cell_ids, lengths, fraction, seed, out):
    """For each cell, mask exactly int(lengths[i] * fraction) of its first lengths[i] positions, chosen by a
    partial Fisher-Yates shuffle driven by splitmix64(seed, cell id): the same seed and cell id give the same
    mask in any process, batch or order."""
    n, width = out.shape
    for i in prange(n):
        out[i, :] = False
        L = min(np.int64(lengths[i]), width)
        k = np.int64(np.float64(L) * fraction)
        if k <= 0:
            continue
        state = np.uint64(seed) * np.uint64(0xD1B54A32D192ED03) ^ np.uint64(cell_ids[i])
        state, _ = splitmix64_next(state)
        pos = np.arange(L)
        for t in range(k):
            state, r = splitmix64_next(state)
            j = t + np.int64(r % np.uint64(L - t))
            tmp = pos[t]
            pos[t] = pos[j]
            pos[j] = tmp
            out[i, pos[t]] = True
    return out
