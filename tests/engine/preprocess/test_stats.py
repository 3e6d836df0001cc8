"""Gene statistics on real Ray over real stores: exact moments whatever the split, scanpy's HVG sets on real Kang
cells, medians within their bound, atomic storage, and `cellray stats`."""

import shutil

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import scipy.sparse as sp

from engine.errors import StatsError
from engine.preprocess.stats import StatsConfig, compute_stats, load_stats
from engine.store.format import Store
from engine.store.ingest import IngestConfig, ingest
from jobs.cli import main as cli


def store_matrix(store: Store) -> sp.csr_matrix:
    return sp.vstack([store.read_csr(k).to_scipy() for k in range(store.n_shards)]).tocsr().astype(np.float32)


def rel_err(got: np.ndarray, want: np.ndarray) -> float:
    scale = np.where(want == 0, 1.0, np.abs(want))
    return float(np.max(np.abs(got - want) / scale))


@pytest.fixture(scope="module")
def tiny_copy(tiny_store, tmp_path_factory) -> Store:
    """A private copy of the session's tiny store (stats are written into it)."""
    dst = tmp_path_factory.mktemp("stats_tiny") / "tiny.store"
    shutil.copytree(tiny_store, dst)
    return Store.open(dst)


@pytest.fixture(scope="module")
def kang_store(kang_sample, tmp_path_factory, ray_local) -> Store:
    """1,000 + 1,000 real Kang cells (control and stimulated: `dataset` is the batch) in 3 shards."""
    out = tmp_path_factory.mktemp("kang_stats") / "kang.store"
    return ingest(kang_sample(1000, seed=1), out, IngestConfig(shard_cells=700)).store


@pytest.fixture(scope="module")
def kang_adata(kang_store) -> ad.AnnData:
    obs = pd.concat([kang_store.read_obs(k, ["dataset"]) for k in range(kang_store.n_shards)])
    return ad.AnnData(
        X=store_matrix(kang_store),
        obs=obs.reset_index(drop=True).set_index(obs.index.astype(str)),
        var=pd.DataFrame(index=kang_store.gene_ids.astype(str)),
    )


def test_moments_exact_whatever_the_split(tiny_copy, tiny_h5ads, tmp_path, ray_local):
    X = store_matrix(tiny_copy).toarray().astype(np.float64)
    mean, var = X.mean(axis=0), X.var(axis=0, ddof=1)
    lib = X.sum(axis=1)
    norm = (X.astype(np.float32) / (lib / 1e4).astype(np.float32)[:, None]).astype(np.float32)
    lognorm = np.log1p(norm).astype(np.float64)
    results = []
    other = ingest(
        tiny_h5ads, tmp_path / "resharded.store", IngestConfig(shard_cells=137, obs_keys=("cell_type", "batch"))
    ).store
    assert other.n_shards != tiny_copy.n_shards
    for store, block, executor in ((tiny_copy, 100_000, "local"), (tiny_copy, 53, "ray"), (other, 1000, "ray")):
        s = compute_stats(store, StatsConfig(block_cells=block, executor=executor), write=False)
        order = pd.Index(store.gene_ids.astype(str)).get_indexer(tiny_copy.gene_ids.astype(str))
        g = s.genes.iloc[order]
        if store is tiny_copy:
            assert rel_err(g["mean"].to_numpy(), mean) <= 1e-6 and rel_err(g["var"].to_numpy(), var) <= 1e-6
            assert rel_err(g["lognorm_mean"].to_numpy(), lognorm.mean(0)) <= 1e-6
            assert rel_err(g["lognorm_var"].to_numpy(), lognorm.var(0, ddof=1)) <= 1e-6
            assert rel_err(g["norm_var"].to_numpy(), norm.astype(np.float64).var(0, ddof=1)) <= 1e-6
            np.testing.assert_array_equal(g["nnz"].to_numpy(), (X > 0).sum(axis=0))
            assert s.library["median"] == np.median(lib) and s.library["n_cells"] == X.shape[0]
            assert s.library["q25"] == pytest.approx(np.quantile(lib, 0.25), rel=1e-12)
        results.append(g[["mean", "var", "lognorm_var"]].to_numpy())
    # a shuffled, re-sharded store of the same cells, split into other blocks: the same numbers
    assert rel_err(results[1], results[0]) <= 1e-12 and rel_err(results[2], results[0]) <= 1e-12


def test_medians_within_stated_bound(kang_store, kang_adata):
    s = compute_stats(kang_store, StatsConfig(executor="ray"), write=False)
    assert s.median_rel_error <= 1e-3
    ref = kang_adata.copy()
    sc.pp.normalize_total(ref, target_sum=1e4)
    Xc = ref.X.tocsc()
    checked = 0
    for g in np.flatnonzero(np.diff(Xc.indptr) > 0)[::25]:
        vals = Xc.data[Xc.indptr[g] : Xc.indptr[g + 1]].astype(np.float64)
        exact = np.median(vals[vals > 0])
        assert abs(s.median[g] / exact - 1) <= s.median_rel_error, (g, s.median[g], exact)
        checked += 1
    assert checked > 100 and (s.median[np.diff(Xc.indptr) == 0] == 0).all()


@pytest.mark.parametrize(
    "flavor, batch_key",
    [("seurat_v3", None), ("seurat_v3", "dataset"), ("seurat", None), ("seurat", "dataset"), ("cell_ranger", None)],
)
def test_hvg_gene_set_equals_scanpy(kang_store, kang_adata, flavor, batch_key):
    s = compute_stats(kang_store, StatsConfig(hvg=300, flavor=flavor, batch_key=batch_key, executor="ray"), write=False)
    ref = kang_adata.copy()
    if flavor != "seurat_v3":
        sc.pp.normalize_total(ref, target_sum=1e4)
        if flavor == "seurat":
            sc.pp.log1p(ref)
    sc.pp.highly_variable_genes(ref, n_top_genes=300, flavor=flavor, batch_key=batch_key)
    ours = set(s.genes.index[s.highly_variable])
    theirs = set(ref.var_names[ref.var["highly_variable"].to_numpy()])
    assert ours == theirs
    # cell_ranger on 2,000 cells: bins of rare genes have MAD 0, inf dispersions, and scanpy then selects none
    assert len(ours) == (0 if flavor == "cell_ranger" else 300)
    col = "variances_norm" if flavor == "seurat_v3" else "dispersions_norm"
    np.testing.assert_allclose(s.genes[col].to_numpy(), ref.var[col].to_numpy(), rtol=1e-5, atol=1e-6)


def test_stored_atomically_reused_and_checked(kang_store, tmp_path):
    compute_stats(kang_store, StatsConfig(hvg=100, flavor="seurat"))
    first = load_stats(kang_store)
    assert (
        first.hvg == {"n_top_genes": 100, "flavor": "seurat", "batch_key": None} and first.highly_variable.sum() == 100
    )
    compute_stats(kang_store, StatsConfig(hvg=200))  # replaces the old statistics
    again = load_stats(kang_store.path)
    assert again.highly_variable.sum() == 200 and again.hvg["flavor"] == "seurat_v3"
    assert [p.name for p in kang_store.path.iterdir() if "stats" in p.name] == ["stats"]  # no temporary left
    assert again.genes.index.equals(pd.Index(kang_store.gene_ids.astype(str)))
    # statistics copied beside other contents are refused as stale
    other = tmp_path / "other.store"
    shutil.copytree(kang_store.path, other)
    shard0 = Store.open(other).manifest.to_dict()
    shard0["shards"][0]["checksum"] = "crc32:00000000"
    import zarr

    zarr.open_group(str(other), mode="r+").attrs["cellray"] = shard0
    with pytest.raises(StatsError, match="computed for other store contents"):
        load_stats(other)


def test_bad_input(tiny_copy, tmp_path, ray_local):
    shutil.rmtree(tiny_copy.path / "stats", ignore_errors=True)
    with pytest.raises(StatsError, match=r"no statistics .* run `cellray stats"):
        load_stats(tiny_copy)
    with pytest.raises(StatsError, match="'nope' is not an obs column"):
        compute_stats(tiny_copy, StatsConfig(batch_key="nope"))
    with pytest.raises(StatsError, match="'batch' has missing values"):  # one input had no batch column
        compute_stats(tiny_copy, StatsConfig(hvg=10, batch_key="batch"))
    with pytest.raises(StatsError, match="unknown HVG flavor"):
        compute_stats(tiny_copy, StatsConfig(hvg=10, flavor="pearson"))
    with pytest.raises(StatsError, match="target_sum must be > 0"):
        compute_stats(tiny_copy, StatsConfig(target_sum=0))


def test_cli_stats_and_export(kang_store, tmp_path, capsys):
    csv = tmp_path / "genes.csv"
    assert (
        cli(
            [
                "stats",
                str(kang_store.path),
                "--hvg",
                "150",
                "--flavor",
                "seurat",
                "--batch-key",
                "dataset",
                "--export",
                str(csv),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "150 genes (seurat, batch key dataset)" in printed and "library size  median" in printed
    table = pd.read_csv(csv)
    assert list(table["gene_id"]) == list(kang_store.gene_ids.astype(str))
    assert {"gene_id", "mean", "var", "nnz", "highly_variable", "dispersions_norm", "highly_variable_nbatches"} <= set(
        table.columns
    )
    assert table["highly_variable"].sum() == 150
    pq = tmp_path / "genes.parquet"
    assert cli(["stats", str(kang_store.path), "--hvg", "150", "--export", str(pq), "--executor", "local"]) == 0
    assert {"variances_norm", "highly_variable_rank"} <= set(pd.read_parquet(pq).columns)
    assert cli(["stats", str(kang_store.path), "--export", str(tmp_path / "genes.xlsx")]) == 2
    assert "expected a .csv or .parquet" in capsys.readouterr().err
