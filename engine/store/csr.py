"""Row gathers on CSR data: the numba kernels that take cells out of decoded chunks or a CSR matrix.

Ingest uses them to reorder a bucket of cells into a shard; the loader to cut shuffled batches (CSR or dense)
out of a buffer of decoded chunks. `buffers` (engine.loading.buffers.BatchBuffers) lends reusable arrays.
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np

from engine.cachehints import prefetch_row, store_fence, stream_row

# Rows are gathered in random order out of a pool of decoded chunks bigger than a core's L2 (a 16-block buffer of
# (a): 5.7 MB), so each row's first lines are asked for this many rows ahead (0: not at all), and the copy finds
# them in cache (`python bench/loader.py --prefetch` measures it)
PREFETCH_ROWS = 8


@dataclass
class CSRRows:
    """Cells as two flat arrays of non-zeros plus, per cell, where its non-zeros start in them and how many
    (decoded chunks of a store, or a plain CSR matrix: no copy is needed to address its rows)."""

    indices: np.ndarray
    data: np.ndarray
    row_start: np.ndarray  # int64, per cell
    row_len: np.ndarray  # int64, per cell

    @property
    def n_cells(self) -> int:
        return len(self.row_start)


@numba.njit(nogil=True, cache=True)
def _rows_counts(row_len, rows, out_indptr):
    out_indptr[0] = 0
    for i in range(rows.shape[0]):
        out_indptr[i + 1] = out_indptr[i] + row_len[rows[i]]


@numba.njit(nogil=True, cache=True)
def _rows_fill(indices, data, row_start, rows, out_indptr, out_indices, out_data, ahead):
    m = rows.shape[0]
    for i in range(min(ahead, m)):
        prefetch_row(indices, data, row_start[rows[i]])
    for i in range(m):
        if ahead and i + ahead < m:
            prefetch_row(indices, data, row_start[rows[i + ahead]])
        a = row_start[rows[i]]
        o = out_indptr[i]
        n = out_indptr[i + 1] - o
        # per-row views and one loop per array: numba vectorises these (5x faster than one fused loop)
        src_i, src_d = indices[a : a + n], data[a : a + n]
        dst_i, dst_d = out_indices[o : o + n], out_data[o : o + n]
        for k in range(n):
            dst_i[k] = src_i[k]
        for k in range(n):
            dst_d[k] = src_d[k]


@numba.njit(nogil=True, cache=True)
def _rows_dense(indices, data, row_start, row_len, rows, out, clear, ahead):
    """Rows into a dense `out`: straight into a fresh zeroed one; into a reused one (`clear`) each row is built in a
    zeroed scratch row and streamed out whole (`stream_row`: no read of the old batch's lines before writing)."""
    m = rows.shape[0]
    row = np.zeros(out.shape[1] if clear else 0, dtype=out.dtype)
    for i in range(min(ahead, m)):
        prefetch_row(indices, data, row_start[rows[i]])
    for i in range(m):
        if ahead and i + ahead < m:
            prefetch_row(indices, data, row_start[rows[i + ahead]])
        r = rows[i]
        a = row_start[r]
        if not clear:
            for k in range(a, a + row_len[r]):
                out[i, indices[k]] = data[k]
            continue
        for k in range(a, a + row_len[r]):
            row[indices[k]] = data[k]
        stream_row(out[i], row)
        for k in range(a, a + row_len[r]):
            row[indices[k]] = 0
    if clear:
        store_fence()


def gather_rows_csr(
    src: CSRRows, rows: np.ndarray, data_dtype=np.float32, index_dtype=np.int32, buffers=None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cells `rows` of `src` as CSR arrays (indptr int64), casting data and indices on the way; indices and
    data come from `buffers` when given."""
    rows = np.ascontiguousarray(rows, dtype=np.int64)
    out_indptr = np.empty(len(rows) + 1, dtype=np.int64)
    _rows_counts(src.row_len, rows, out_indptr)
    nnz = int(out_indptr[-1])
    if buffers is None:
        out_indices, out_data = np.empty(nnz, dtype=index_dtype), np.empty(nnz, dtype=data_dtype)
    else:
        out_indices, out_data = buffers.empty(nnz, index_dtype), buffers.empty(nnz, data_dtype)
    _rows_fill(src.indices, src.data, src.row_start, rows, out_indptr, out_indices, out_data, PREFETCH_ROWS)
    return out_indptr, out_indices, out_data


def gather_rows_dense(src: CSRRows, rows: np.ndarray, n_genes: int, buffers=None) -> np.ndarray:
    """Cells `rows` of `src` as a dense float32 (len(rows), n_genes) array (from `buffers` when given)."""
    if buffers is None:
        out, fresh = np.zeros((len(rows), n_genes), dtype=np.float32), True
    else:
        out, fresh = buffers.get((len(rows), n_genes))
    _rows_dense(
        src.indices,
        src.data,
        src.row_start,
        src.row_len,
        np.ascontiguousarray(rows, dtype=np.int64),
        out,
        not fresh,
        PREFETCH_ROWS,
    )
    return out


def csr_rows(indptr: np.ndarray, indices: np.ndarray, data: np.ndarray) -> CSRRows:
    """A plain CSR matrix seen as a src."""
    indptr = np.asarray(indptr, dtype=np.int64)
    return CSRRows(indices, data, indptr[:-1].copy(), np.diff(indptr))


def gather_csr(indptr, indices, data, rows, data_dtype=np.float32, index_dtype=np.int32):
    """Rows `rows` of a CSR matrix as a new CSR (indptr int64), casting data and indices on the way."""
    return gather_rows_csr(csr_rows(indptr, indices, data), rows, data_dtype, index_dtype)


def gather_dense(indptr, indices, data, rows, n_genes: int) -> np.ndarray:
    """Rows `rows` of a CSR matrix as a dense float32 (len(rows), n_genes) array."""
    return gather_rows_dense(csr_rows(indptr, indices, data), rows, n_genes)
