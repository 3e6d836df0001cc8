"""Kernels against straightforward numpy references: dtypes, gene maps, binning, rank tokens, masks, caching."""

import subprocess
import sys
from pathlib import Path

import anndata as ad
import numba
import numpy as np
import pytest
import scipy.sparse as sp

from engine.preprocess import kernels
from engine.store.format import CSRBlock
from engine.store.synthetic import synthetic_counts

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def counts() -> sp.csr_matrix:
    return synthetic_counts(600, 400, nnz_per_cell=50, seed=3).X.tocsr()


@pytest.fixture(scope="module")
def kang_lognorm(real_data_dir) -> np.ndarray:
    """1,000 real Kang cells, normalize_total(1e4) + log1p with scanpy, dense float32."""
    import scanpy as sc

    a = ad.read_h5ad(real_data_dir / "kang_ctrl.h5ad")
    a = a[np.random.default_rng(0).choice(a.n_obs, 1000, replace=False)].copy()
    sc.pp.normalize_total(a, target_sum=1e4)
    sc.pp.log1p(a)
    return a.X.toarray().astype(np.float32)


def dense(X, gene_map=None, n_out=None, norm=True, target=1e4, log=True, lib_selected=False, out=None):
    """The fused kernel on a scipy CSR or a CSRBlock (which keeps the store's uint16/uint32 dtypes)."""
    shape = (X.n_cells, X.n_genes) if isinstance(X, CSRBlock) else X.shape
    n_out = shape[1] if n_out is None else n_out
    has_map = gene_map is not None
    gmap = gene_map if has_map else np.zeros(1, dtype=np.int64)
    out = np.empty((shape[0], n_out), dtype=np.float32) if out is None else out
    z = np.zeros(0)
    return kernels.transform_dense(
        X.indptr, X.indices, X.data, gmap, has_map, lib_selected, norm, target, log, False, z, z, 0.0, True, out
    )


@numba.njit
def _log1p32_all(v, out):
    for i in range(v.size):
        out[i] = kernels.log1p32(v[i])
    return out


def test_log1p32_is_float64_log1p_rounded_to_float32():
    """The kernels' log1p through log: the same float32 as float64 log1p on a million normalized counts (counts
    1-999 over size factors of libraries of 100 to 100k counts), and on the edges libm's own answers."""
    rng = np.random.default_rng(0)
    counts = rng.integers(1, 1000, 1_000_000).astype(np.float64)
    v = (counts / (rng.integers(100, 100_000, counts.size) / 1e4).astype(np.float32)).astype(np.float32)
    want = np.log1p(v.astype(np.float64)).astype(np.float32)
    assert np.array_equal(_log1p32_all(v, np.empty_like(v)), want)
    edges = np.array(
        [0.0, -0.0, 1e-30, 2.0**-60, 1e-12, 3e-10, 1e-7, 0.5, -0.5, -1.0, -2.0, 3.4e38, np.inf, np.nan], np.float32
    )
    with np.errstate(divide="ignore", invalid="ignore"):
        want = np.log1p(edges.astype(np.float64)).astype(np.float32)
    np.testing.assert_array_equal(_log1p32_all(edges, np.empty_like(edges)), want)


@pytest.mark.parametrize("idx_dtype", [np.uint16, np.uint32])
@pytest.mark.parametrize("data_dtype", [np.uint16, np.uint32, np.float32])
def test_store_dtypes_give_identical_results(counts, idx_dtype, data_dtype):
    ref = dense(counts)
    X = CSRBlock(counts.indptr, counts.indices.astype(idx_dtype), counts.data.astype(data_dtype), counts.shape[1])
    assert X.indices.dtype == idx_dtype and X.data.dtype == data_dtype
    np.testing.assert_array_equal(dense(X), ref)
    lib = counts.sum(axis=1).A1
    expected = np.log1p(counts.toarray() / lib[:, None] * 1e4).astype(np.float32)
    np.testing.assert_allclose(ref, expected, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("scale", [False, True])
def test_rows_streamed_into_a_used_buffer_equal_rows_written_into_zeros(scale):
    """A reused `out` gets each row built in a scratch row and streamed out; the scratch goes back to blank between
    rows: after a row with a value in every output column (the whole scratch reset), after a row of many genes the
    map drops, after an empty row. Same as the direct write into fresh zeros, scaled or not."""
    rng = np.random.default_rng(0)
    n_genes, n_out = 50, 10
    rows = [np.arange(n_genes), np.array([3]), np.arange(10, 50), np.array([], int), rng.choice(n_genes, 7, False)]
    rows = [np.sort(r) for r in rows * 30]  # 150 rows: more than one parallel task of STREAM_ROWS
    indptr = np.concatenate([[0], np.cumsum([len(r) for r in rows])]).astype(np.int64)
    indices = np.concatenate(rows).astype(np.uint16)
    data = rng.integers(1, 9, len(indices)).astype(np.uint16)
    gene_map = np.full(n_genes, -1, dtype=np.int64)
    gene_map[rng.choice(n_genes, n_out, replace=False)] = np.arange(n_out)
    mean, std = rng.uniform(0, 1, n_out), rng.uniform(0.5, 2, n_out)
    args = (indptr, indices, data, gene_map, True, False, True, 1e4, True, scale, mean, std, 3.0, True)
    want = kernels.transform_dense(*args, np.zeros((len(rows), n_out), np.float32), not scale)
    got = kernels.transform_dense(*args, np.full((len(rows), n_out), 7.0, np.float32), False)
    np.testing.assert_array_equal(got, want)
    if not scale:  # the rows are what they say: every column, at most one, none
        assert (want[0::5] != 0).all() and (want[1::5] != 0).sum(axis=1).max() <= 1 and not want[3::5].any()


def test_gene_map_reorders_drops_and_sorts_csr(counts):
    rng = np.random.default_rng(1)
    n_out = 150
    gene_map = np.full(counts.shape[1], -1, dtype=np.int64)
    picked = rng.choice(counts.shape[1], 120, replace=False)
    gene_map[picked] = rng.choice(n_out, 120, replace=False)  # some output columns stay empty (genes the store lacks)
    full = dense(counts)
    expected = np.zeros((counts.shape[0], n_out), dtype=np.float32)
    expected[:, gene_map[picked]] = full[:, picked]
    np.testing.assert_array_equal(dense(counts, gene_map, n_out), expected)

    kept = kernels.kept_per_row(counts.indptr, counts.indices, gene_map, np.empty(counts.shape[0], dtype=np.int64))
    indptr = np.concatenate([[0], np.cumsum(kept)])
    indices = np.empty(indptr[-1], dtype=np.uint16)
    data = np.empty(indptr[-1], dtype=np.float32)
    kernels.transform_csr(
        counts.indptr, counts.indices, counts.data, gene_map, True, True, False, True, 1e4, True, indptr, indices, data
    )
    out = sp.csr_matrix((data, indices, indptr), shape=(counts.shape[0], n_out))
    assert out.has_sorted_indices
    np.testing.assert_array_equal(out.toarray(), expected)

    # library over the selected genes only (select_genes before normalize_total)
    sub = counts[:, picked]
    lib = sub.sum(axis=1).A1
    got = dense(counts, gene_map, n_out, log=False, lib_selected=True)[:, gene_map[picked]]
    np.testing.assert_allclose(got, sub.toarray() / np.where(lib == 0, 1, lib)[:, None] * 1e4, rtol=1e-6)


def binning_reference(row: np.ndarray, n_bins: int) -> np.ndarray:
    """scGPT's binning of one cell, literally (numpy quantile edges, np.digitize)."""
    out = np.zeros(len(row), dtype=np.int64)
    nz = row.nonzero()[0]
    if len(nz) == 0:
        return out
    bins = np.quantile(row[nz], np.linspace(0, 1, n_bins - 1))
    out[nz] = np.digitize(row[nz], bins)
    return out


@pytest.mark.parametrize("n_bins", [51, 5])
def test_binning_matches_numpy_reference_on_real_data(kang_lognorm, n_bins):
    X = kang_lognorm[:400]
    got = kernels.bin_values(X, n_bins, np.empty(X.shape, dtype=np.int64))
    expected = np.stack([binning_reference(r, n_bins) for r in X])
    np.testing.assert_array_equal(got, expected)
    assert got.max() == n_bins - 1 and got[X == 0].max() == 0 and got[X != 0].min() >= 1


def test_binning_ties_and_edge_rows():
    X = np.array([[0, 0, 0, 0], [1, 1, 1, 1], [0, 2, 2, 5], [3, 0, 0, 0]], dtype=np.float32)
    got = kernels.bin_values(X, 11, np.empty(X.shape, dtype=np.int64))
    np.testing.assert_array_equal(got, np.stack([binning_reference(r, 11) for r in X]))


def rank_reference(X: sp.csr_matrix, medians: np.ndarray, max_len: int, offset: int, pad: int):
    genes = np.full((X.shape[0], max_len), pad, dtype=np.int64)
    for i in range(X.shape[0]):
        row = X[i].toarray().ravel().astype(np.float64)
        ok = (row > 0) & (medians > 0)
        cols = np.flatnonzero(ok)
        r = row[cols] / medians[cols]
        order = np.argsort(-r, kind="stable")[:max_len]
        genes[i, : len(order)] = cols[order] + offset
    return genes


def test_rank_tokens_match_numpy_reference(counts):
    rng = np.random.default_rng(2)
    medians = rng.uniform(0.5, 5, counts.shape[1])
    medians[:10] = 0  # genes never seen: never ranked
    for max_len in (8, 64):  # truncated and padded
        n = counts.shape[0]
        genes = np.empty((n, max_len), dtype=np.int64)
        values = np.empty((n, max_len), dtype=np.float32)
        lengths = np.empty(n, dtype=np.int64)
        kernels.rank_tokens(counts.indptr, counts.indices, counts.data, medians, max_len, 2, 0, genes, values, lengths)
        np.testing.assert_array_equal(genes, rank_reference(counts, medians, max_len, 2, 0))
        assert ((genes != 0).sum(axis=1) == lengths).all()
        assert (np.diff(values, axis=1)[:, :-1][genes[:, 1:-1] != 0] <= 0).all()  # sorted descending


def mask_for(cell_ids, lengths, width, fraction=0.3, seed=7):
    return kernels.random_mask(
        np.asarray(cell_ids, np.int64),
        np.asarray(lengths, np.int64),
        fraction,
        seed,
        np.empty((len(cell_ids), width), dtype=np.bool_),
    )


def test_mask_is_deterministic_per_seed_and_cell_in_any_process():
    ids = np.array([5, 17, 123456789012, 3])
    m = mask_for(ids, [50, 50, 50, 20], 50)
    assert (m.sum(axis=1) == [15, 15, 15, 6]).all()  # exactly int(length * fraction)
    assert not m[3, 20:].any()  # never beyond a cell's length (padding)
    # the same cell in another batch, at another position, gives the same mask
    np.testing.assert_array_equal(mask_for([123456789012, 5], [50, 50], 50), m[[2, 0]])
    assert not np.array_equal(mask_for(ids, [50] * 4, 50, seed=8), m)  # another seed, another mask
    code = (
        "import numpy as np; from engine.preprocess import kernels; "
        "m = kernels.random_mask(np.array([5, 17, 123456789012, 3]), np.array([50, 50, 50, 20]), 0.3, 7, "
        "np.empty((4, 50), dtype=np.bool_)); "
        "print(''.join('1' if b else '0' for b in m.ravel()))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()
    assert out == "".join("1" if b else "0" for b in m.ravel())


def test_compiled_kernels_are_cached_for_new_processes(counts):
    dense(counts)  # compiled (or loaded) here; a new process must load it from the on-disk cache
    code = (
        "import numpy as np, scipy.sparse as sp; from engine.preprocess import kernels\n"
        "X = sp.random(5, 7, density=0.5, format='csr', dtype=np.float32, random_state=0)\n"
        f"X.indices = X.indices.astype(np.{counts.indices.dtype}); X.data = X.data.astype(np.{counts.data.dtype})\n"
        "z = np.zeros(0)\n"
        "kernels.transform_dense(X.indptr, X.indices, X.data, np.zeros(1, np.int64), False, False, True, 1e4, True, "
        "False, z, z, 0.0, True, np.empty((5, 7), np.float32))\n"
        "s = kernels.transform_dense.stats; print(sum(s.cache_hits.values()), sum(s.cache_misses.values()))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    assert out == ["1", "0"], f"cache hits, misses in a new process: {out}"


def test_any_negative():
    assert not kernels.any_negative(np.arange(1000, dtype=np.float32))
    x = np.ones(1000, dtype=np.float32)
    x[777] = -1
    assert kernels.any_negative(x)
