"""The transform pipeline on real Kang cells from a real store, against scanpy on the same cells; spec errors."""

import pickle
import shutil

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import scipy.sparse as sp

from engine.errors import CellrayError, TransformError
from engine.preprocess.stats import StatsConfig, compute_stats, load_stats
from engine.preprocess.transforms import Pipeline, parse_spec
from engine.store.format import CSRBlock, Store
from engine.store.ingest import IngestConfig, ingest

N_HVG = 400


@pytest.fixture(scope="module")
def kang_store(kang_sample, tmp_path_factory, ray_local) -> Store:
    """1,200 + 1,200 real Kang cells ingested into 3 shards, with seurat_v3 statistics."""
    out = tmp_path_factory.mktemp("kang_tf") / "kang.store"
    store = ingest(kang_sample(1200, seed=0), out, IngestConfig(shard_cells=1000)).store
    compute_stats(store, StatsConfig(hvg=N_HVG, flavor="seurat_v3"))
    return Store.open(store.path)


@pytest.fixture(scope="module")
def kang_adata(kang_store) -> ad.AnnData:
    """The whole store in memory, in store order, float32 counts (what scanpy sees)."""
    X = sp.vstack([kang_store.read_csr(k).to_scipy() for k in range(kang_store.n_shards)]).tocsr().astype(np.float32)
    return ad.AnnData(X=X, var=pd.DataFrame(index=kang_store.gene_ids.astype(str)))


def run(pipe: Pipeline, store: Store) -> dict:
    """Apply the pipeline batch by batch (store blocks of 500 cells) and stack the outputs."""
    outs = []
    for k in range(store.n_shards):
        n = store.manifest.shards[k].n_cells
        for start in range(0, n, 500):
            block = store.read_csr(k, start, min(n, start + 500))
            cells = store.cell_offsets[k] + np.arange(start, start + block.n_cells)
            outs.append(pipe(block, cells))
    stacked = {}
    for key in outs[0]:
        parts = [o[key] for o in outs]
        stacked[key] = (
            sp.vstack([p.to_scipy() for p in parts]).tocsr()
            if isinstance(parts[0], CSRBlock)
            else np.concatenate(parts)
        )
    return stacked


def max_abs(a, b) -> float:
    a = a.toarray() if sp.issparse(a) else np.asarray(a)
    b = b.toarray() if sp.issparse(b) else np.asarray(b)
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max())


def test_normalize_log1p_sparse_and_dense_match_scanpy(kang_store, kang_adata):
    ref = kang_adata.copy()
    sc.pp.normalize_total(ref, target_sum=1e4)
    out = run(Pipeline.from_spec([{"normalize_total": {"target_sum": 1e4}}], kang_store), kang_store)
    assert isinstance(out["X"], sp.csr_matrix) and out["X"].dtype == np.float32
    assert max_abs(out["X"], ref.X) <= 1e-5  # in fact bit for bit: same float32 operations as scanpy
    np.testing.assert_array_equal(out["X"].indptr, ref.X.indptr)
    sc.pp.log1p(ref)
    out = run(
        Pipeline.from_spec([{"normalize_total": {"target_sum": 1e4}}, "log1p", "densify"], kang_store), kang_store
    )
    assert out["X"].dtype == np.float32 and out["X"].shape == kang_adata.shape
    assert max_abs(out["X"], ref.X) <= 1e-5


def test_median_target_sum_uses_store_library_median(kang_store, kang_adata):
    ref = kang_adata.copy()
    sc.pp.normalize_total(ref)  # target_sum None: median library size
    out = run(Pipeline.from_spec([{"normalize_total": {"target_sum": None}}, "log1p"], kang_store), kang_store)
    sc.pp.log1p(ref)
    assert max_abs(out["X"], ref.X) <= 1e-5


def test_scale_with_store_statistics_matches_scanpy(kang_store, kang_adata):
    ref = kang_adata.copy()
    sc.pp.normalize_total(ref, target_sum=1e4)
    sc.pp.log1p(ref)
    sc.pp.scale(ref, max_value=10)
    spec = [{"normalize_total": {"target_sum": 1e4}}, "log1p", {"scale": {"max_value": 10}}]
    out = run(Pipeline.from_spec(spec, kang_store), kang_store)
    assert out["X"].dtype == np.float32
    assert max_abs(out["X"], ref.X) <= 1e-5
    ref = kang_adata.copy()
    sc.pp.scale(ref, zero_center=False)
    assert (
        max_abs(run(Pipeline.from_spec([{"scale": {"zero_center": False}}], kang_store), kang_store)["X"], ref.X)
        <= 1e-5
    )


def test_select_hvg_then_densify_matches_scanpy_subset(kang_store, kang_adata):
    ref = kang_adata.copy()
    sc.pp.highly_variable_genes(ref, n_top_genes=N_HVG, flavor="seurat_v3")
    sc.pp.normalize_total(ref, target_sum=1e4)
    sc.pp.log1p(ref)
    ref = ref[:, ref.var["highly_variable"].to_numpy()]
    pipe = Pipeline.from_spec(
        [{"normalize_total": {"target_sum": 1e4}}, "log1p", {"select_genes": "hvg"}, "densify"], kang_store
    )
    assert pipe.n_genes_out == N_HVG
    assert max_abs(run(pipe, kang_store)["X"], ref.X) <= 1e-5


def test_select_gene_list_reorders_keeps_missing_zero_and_can_normalize_after(kang_store, kang_adata, caplog):
    vocab = list(kang_store.gene_ids.astype(str))
    genes = [vocab[500], "NOT_A_GENE_1", vocab[3], vocab[4000], "NOT_A_GENE_2", vocab[77]]
    pipe = Pipeline.from_spec([{"select_genes": genes}, "normalize_total", "log1p", "densify"], kang_store)
    assert "2 of 6 genes are not in the vocabulary" in caplog.text
    out = run(pipe, kang_store)["X"]
    ref = kang_adata[:, [g for g in genes if g in vocab]].copy()
    sc.pp.normalize_total(ref, target_sum=1e4)  # scanpy on the subset: library sizes over these genes only
    sc.pp.log1p(ref)
    cols = [i for i, g in enumerate(genes) if g in vocab]
    assert max_abs(out[:, cols], ref.X) <= 1e-5
    assert not out[:, [1, 4]].any()
    sparse = run(Pipeline.from_spec([{"select_genes": {"genes": genes}}], kang_store), kang_store)["X"]
    assert (
        sparse.has_sorted_indices and max_abs(sparse[:, cols], kang_adata[:, [g for g in genes if g in vocab]].X) == 0
    )
    # the selection's ids in column order (what a checkpoint records): none when a listed gene has no column's id
    present = [g for g in genes if g in vocab]
    assert Pipeline.from_spec([{"select_genes": present}], kang_store).selected_genes(vocab) == present
    assert (
        pipe.selected_genes(vocab) is None and Pipeline.from_spec(["log1p"], kang_store).selected_genes(vocab) is None
    )


def test_rank_tokens_and_binning_and_mask(kang_store, kang_adata):
    stats = load_stats(kang_store)
    out = run(
        Pipeline.from_spec(
            ["normalize_total", {"rank_tokens": {"max_len": 64}}, {"mask": {"fraction": 0.15, "seed": 1}}], kang_store
        ),
        kang_store,
    )
    assert out["genes"].shape == (kang_adata.n_obs, 64) and out["genes"].dtype == np.int64
    X = kang_adata.X
    for i in (0, 999, 2399):  # a straightforward reference per cell: counts / library / medians, sorted descending
        row = X[i].toarray().ravel().astype(np.float64)
        ok = (row > 0) & (stats.median > 0)
        cols = np.flatnonzero(ok)
        norm = (row[cols] / row.sum() * 1e4).astype(np.float32).astype(np.float64)
        order = np.argsort(-(norm / stats.median[cols]), kind="stable")[:64]
        np.testing.assert_array_equal(out["genes"][i, : len(order)], cols[order])
        assert (out["genes"][i, len(order) :] == -1).all() and out["lengths"][i] == len(order)
        assert out["mask"][i].sum() == int(min(64, len(cols)) * 0.15)
    out = run(
        Pipeline.from_spec(
            ["normalize_total", "log1p", {"select_genes": "hvg"}, "densify", {"binning": {"n_bins": 51}}], kang_store
        ),
        kang_store,
    )
    assert out["values"].shape == (kang_adata.n_obs, N_HVG) and out["values"].max() == 50
    assert ((out["values"] == 0) == (out["X"] == 0)).all()


def test_bytes_per_cell_bounds_the_outputs_a_cell_takes(kang_store):
    """What a Ray-mode Loader sizes its read-ahead by: at least the bytes of every output a cell gets, token arrays
    included, and not far above them."""
    block = kang_store.read_csr(0, 0, 500)
    nnz_per_cell = block.indptr[-1] / 500
    for spec in (
        ["normalize_total", "log1p"],
        ["normalize_total", {"rank_tokens": {"max_len": 64}}, {"mask": {"fraction": 0.15, "seed": 1}}],
        ["normalize_total", "log1p", {"select_genes": "hvg"}, "densify", {"binning": {"n_bins": 51}}],
    ):
        pipe = Pipeline.from_spec(spec, kang_store)
        out = pipe(block, np.arange(500))
        x = out["X"]
        arrays = [v for k, v in out.items() if k != "X"] + (
            [x.indptr, x.indices, x.data] if hasattr(x, "indptr") else [x]
        )
        taken = sum(a.nbytes for a in arrays) / 500
        assert taken <= pipe.bytes_per_cell(kang_store.n_genes, nnz_per_cell) <= 1.5 * taken, spec


def test_pipeline_pickles_for_ray_actors(kang_store):
    pipe = Pipeline.from_spec(
        ["normalize_total", "log1p", {"select_genes": "hvg"}, {"scale": {"max_value": 10}}], kang_store
    )
    block = kang_store.read_csr(0, 0, 50)
    clone = pickle.loads(pickle.dumps(pipe))
    np.testing.assert_array_equal(clone(block, np.arange(50))["X"], pipe(block, np.arange(50))["X"])
    # a reused output buffer holding an older batch gives the same values as a fresh one
    plain = Pipeline.from_spec(["normalize_total", "log1p", "densify"], kang_store)
    buf = np.full((50, kang_store.n_genes), 7.0, dtype=np.float32)
    assert plain(block, np.arange(50), out=buf)["X"] is buf
    np.testing.assert_array_equal(buf, plain(block, np.arange(50))["X"])
    with pytest.raises(TransformError, match="out buffer"):
        plain(block, np.arange(50), out=np.zeros((49, kang_store.n_genes), np.float32))


@pytest.mark.parametrize(
    "spec, message",
    [
        (["log1p", "normalise_total"], "unknown step 'normalise_total'"),
        (["log1p", "normalize_total"], "bad order, 'normalize_total' (step 2) must come before 'log1p' (step 1)"),
        (["densify", "log1p"], "bad order"),
        (["log1p", "log1p"], "appears 2 times"),
        ([{"normalize_total": {"target_sum": 0}}], "target_sum must be > 0"),
        ([{"normalize_total": {"target_sum": -5}}], "target_sum must be > 0"),
        ([{"normalize_total": {"target": 1e4}}], "has no parameter(s) ['target']"),
        (["mask", "densify"], "bad order"),
        (["densify", "binning", "rank_tokens"], "two tokenisers"),
        (["log1p", "mask"], "'mask' needs dense values or tokens"),
        ([{"select_genes": 5}], "select_genes expects 'hvg'"),
        ("log1p", "expected a list of steps"),
    ],
)
def test_bad_specs_are_clear_errors(spec, message):
    with pytest.raises(TransformError) as e:
        parse_spec(spec)
    assert message in str(e.value)


def test_store_dependent_errors(kang_store, tmp_path, tiny_store):
    shutil.copytree(tiny_store, tmp_path / "tiny.store", ignore=shutil.ignore_patterns("stats"))
    tiny = Store.open(tmp_path / "tiny.store")  # a store without statistics
    with pytest.raises(CellrayError, match=r"needs gene statistics, and the store has none: run `cellray stats"):
        Pipeline.from_spec(["log1p", {"scale": {}}], tiny)
    with pytest.raises(CellrayError, match="needs gene statistics"):
        Pipeline.from_spec([{"select_genes": "hvg"}], tiny)
    with pytest.raises(CellrayError, match="needs gene statistics"):
        Pipeline.from_spec([{"rank_tokens": {}}], tiny)
    with pytest.raises(CellrayError, match="none of the 2 genes is in the vocabulary"):
        Pipeline.from_spec([{"select_genes": ["nope1", "nope2"]}], kang_store)
    with pytest.raises(CellrayError, match="computed with target_sum 10000.0, the spec normalizes to 100"):
        Pipeline.from_spec([{"normalize_total": {"target_sum": 100}}, "log1p", "scale"], kang_store)
    pipe = Pipeline.from_spec(["log1p", "densify"])
    bad = CSRBlock(np.array([0, 2, 3]), np.array([0, 1, 1], np.uint16), np.array([1.0, -2.0, 3.0], np.float32), 4)
    with pytest.raises(CellrayError, match="negative values"):
        pipe(bad, np.array([10, 11]))
    good = CSRBlock(bad.indptr, bad.indices, np.abs(bad.data), 4)
    assert pipe.n_genes_out == 4 and pipe(good, np.array([10, 11]))["X"][0, 1] == np.float32(np.log1p(2.0))
