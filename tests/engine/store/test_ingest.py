"""Ingest: round trip against anndata, bad inputs, bounded memory. Real h5ad/zarr files, real local Ray."""

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from engine.errors import InputError
from engine.store.format import Store
from engine.store.ingest import IngestConfig, ingest
from engine.store.synthetic import synthetic_counts


def expected_matrix(paths, gene_ids, layer=None):
    """Each input cell's counts on the store vocabulary, keyed by (dataset, obs_name), via anndata."""
    out = {}
    for p in paths:
        a = ad.read_h5ad(p) if p.suffix == ".h5ad" else ad.read_zarr(p)
        X = sp.csr_matrix(a.layers[layer] if layer else a.X)
        cols = gene_ids.get_indexer(a.var_names)
        keep = cols >= 0
        dense = np.zeros((a.n_obs, len(gene_ids)), dtype=np.float64)
        dense[:, cols[keep]] = X.toarray()[:, keep]
        dataset = p.name.removesuffix(".h5ad").removesuffix(".zarr")
        for i, name in enumerate(a.obs_names):
            out[(dataset, name)] = dense[i]
    return out


def store_rows(store: Store):
    rows, keys = [], []
    for k in range(store.n_shards):
        rows.append(store.read_csr(k).to_scipy().toarray())
        obs = store.read_obs(k, ["dataset", "obs_name"])
        keys += list(zip(obs["dataset"].astype(str), obs["obs_name"].astype(str)))
    return np.vstack(rows), keys


@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize("vocab", ["union", "intersection"])
def test_round_trip_every_cell_exactly_once(tmp_path, tiny_h5ads, ray_local, shuffle, vocab):
    store = ingest(
        tiny_h5ads, tmp_path / "s.store", IngestConfig(shard_cells=256, shuffle=shuffle, vocab=vocab, seed=5)
    ).store
    expected = expected_matrix(tiny_h5ads, store.gene_ids)
    X, keys = store_rows(store)
    assert len(keys) == len(set(keys)) == len(expected) == store.n_cells
    for row, key in zip(X, keys):
        np.testing.assert_array_equal(row, expected[key])
    in_order = keys == list(expected)
    assert in_order != shuffle  # shuffled stores mix inputs; unshuffled keep input order
    if shuffle:  # cells of every input are spread over the shards, not left in input blocks
        first = pd.Series([d for d, _ in keys[:256]])
        assert first.nunique() == len(tiny_h5ads)
    n_union = len(set().union(*[set(ad.read_h5ad(p, backed="r").var_names) for p in tiny_h5ads]))
    assert store.n_genes == (n_union if vocab == "union" else 270)


def test_local_and_ray_executors_write_the_same_store(tmp_path, tiny_h5ads, ray_local):
    cfg = dict(shard_cells=300, seed=9, obs_keys=("cell_type",))
    a = ingest(tiny_h5ads, tmp_path / "ray.store", IngestConfig(executor="ray", **cfg)).store
    b = ingest(tiny_h5ads, tmp_path / "local.store", IngestConfig(executor="local", **cfg)).store
    assert [s.checksum for s in a.manifest.shards] == [s.checksum for s in b.manifest.shards]
    pd.testing.assert_frame_equal(a.read_obs(1), b.read_obs(1))


def test_vocabulary_file_layer_dense_and_zarr_inputs(tmp_path, ray_local):
    a = synthetic_counts(300, 50, nnz_per_cell=20, seed=1)
    a.layers["counts"] = a.X.copy()
    a.X = np.log1p(a.X.toarray())  # dense, normalised X; counts in a layer
    a.write_zarr(tmp_path / "dense.zarr")
    b = synthetic_counts(200, 50, nnz_per_cell=20, seed=2)
    b.layers["counts"] = b.X.toarray()  # a dense layer
    b.write_h5ad(tmp_path / "b.h5ad")
    vocab = tmp_path / "genes.txt"
    vocab.write_text("\n".join(list(a.var_names[:30][::-1]) + ["ENSG_NOT_THERE"]))
    store = ingest(
        [tmp_path / "dense.zarr", tmp_path / "b.h5ad"],
        tmp_path / "s.store",
        IngestConfig(vocab=str(vocab), layer="counts", obs_keys=("cell_type",)),
    ).store
    assert list(store.gene_ids) == vocab.read_text().split("\n")
    expected = expected_matrix([tmp_path / "dense.zarr", tmp_path / "b.h5ad"], store.gene_ids, layer="counts")
    X, keys = store_rows(store)
    for row, key in zip(X, keys):
        np.testing.assert_array_equal(row, expected[key])
    assert X[:, -1].sum() == 0  # a vocabulary gene no input has stays zero
    assert store.manifest.count_dtype == "uint16"


def test_obs_columns_missing_in_an_input_are_filled_and_categories_unified(tiny_store, tiny_h5ads):
    store = Store.open(tiny_store)
    obs = pd.concat([store.read_obs(k) for k in range(store.n_shards)])
    assert obs.loc[obs["dataset"] == "ds2", "batch"].isna().all()  # ds2 has no batch column
    assert set(obs["batch"].dropna()) == {"b0", "b1"}
    assert store.manifest.obs_schema["cell_type"]["categories"] == sorted(obs["cell_type"].unique())


# -------------------------------------------------------------------------------------------- bad input


def _write(tmp_path, name, X, var_names=None, obs_names=None):
    n, g = X.shape
    a = ad.AnnData(
        X=X,
        obs=pd.DataFrame(index=obs_names or [f"c{i}" for i in range(n)]),
        var=pd.DataFrame(index=var_names or [f"G{i}" for i in range(g)]),
    )
    p = tmp_path / name
    a.write_h5ad(p)
    return p


def _counts(n=40, g=10, seed=0):
    return sp.random(n, g, density=0.4, format="csr", random_state=seed, data_rvs=lambda k: np.arange(1, k + 1)).astype(
        np.float32
    )


def _assert_fails_cleanly(tmp_path, inputs, match, config=IngestConfig()):
    out = tmp_path / "out.store"
    with pytest.raises(InputError, match=match):
        ingest(inputs, out, config)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]  # no half-written store left behind


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda X: X.data.__setitem__(3, 2.5), r"bad\.h5ad: field 'X' has non-integer values \(first at row"),
        (lambda X: X.data.__setitem__(3, -1.0), r"bad\.h5ad: field 'X' has negative values"),
        (lambda X: X.data.__setitem__(3, np.nan), r"bad\.h5ad: field 'X' has NaN or inf"),
        (lambda X: X.data.__setitem__(3, np.inf), r"bad\.h5ad: field 'X' has NaN or inf"),
    ],
)
def test_bad_counts_are_refused_naming_file_and_field(tmp_path, ray_local, mutate, match):
    good = _write(tmp_path, "good.h5ad", _counts())
    X = _counts(seed=1)
    mutate(X)
    _assert_fails_cleanly(tmp_path, [good, _write(tmp_path, "bad.h5ad", X)], match)


@pytest.mark.parametrize("field, value", [("chunk_elements", 0), ("chunk_elements", -16), ("shard_cells", 0)])
def test_sizes_that_cannot_be_written_are_refused_naming_the_field(field, value):
    """A chunk or shard of no values is a one-line error naming the field (a chunk size of 0 divided by zero)."""
    with pytest.raises(InputError, match=rf"IngestConfig: {field}: Input should be greater than 0"):
        IngestConfig(**{field: value})


def test_non_integer_is_accepted_when_allowed(tmp_path, ray_local):
    X = _counts()
    X.data[:] = X.data / 3
    store = ingest(
        [_write(tmp_path, "norm.h5ad", X)], tmp_path / "s.store", IngestConfig(allow_non_integer=True, executor="local")
    ).store
    assert store.manifest.count_dtype == "float32"


def test_duplicate_gene_ids_and_obs_names(tmp_path, ray_local):
    dup_genes = _write(tmp_path, "dupg.h5ad", _counts(), var_names=["G0", "G1", "G1"] + [f"G{i}" for i in range(3, 10)])
    _assert_fails_cleanly(tmp_path, [dup_genes], r"dupg\.h5ad: var index has duplicate gene ids, e.g. \['G1'\]")
    dup_cells = _write(tmp_path, "dupc.h5ad", _counts(n=3), obs_names=["a", "b", "a"])
    _assert_fails_cleanly(tmp_path, [dup_cells], r"dupc\.h5ad: obs index has duplicate cell names")


def test_no_overlap_with_vocabulary(tmp_path, ray_local):
    a = _write(tmp_path, "a.h5ad", _counts())
    b = _write(tmp_path, "b.h5ad", _counts(), var_names=[f"OTHER{i}" for i in range(10)])
    vocab = tmp_path / "v.txt"
    vocab.write_text("G1\nG2\n")
    _assert_fails_cleanly(tmp_path, [a, b], r"b\.h5ad: none of its 10 var ids", IngestConfig(vocab=str(vocab)))
    _assert_fails_cleanly(
        tmp_path, [a, b], "intersection of their var indexes is empty", IngestConfig(vocab="intersection")
    )


def test_zero_cell_inputs_are_skipped_with_a_warning(tmp_path, ray_local, caplog):
    empty = _write(tmp_path, "empty.h5ad", sp.csr_matrix((0, 10), dtype=np.float32))
    good = _write(tmp_path, "good.h5ad", _counts())
    store = ingest([empty, good], tmp_path / "s.store").store
    assert store.n_cells == 40 and "empty.h5ad: has zero cells; skipped" in caplog.text
    _assert_fails_cleanly(tmp_path, [empty], "every input has zero cells")


def test_truncated_and_unreadable_inputs(tmp_path, ray_local):
    good = _write(tmp_path, "good.h5ad", _counts(n=2000, g=200))
    trunc = tmp_path / "trunc.h5ad"
    trunc.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    _assert_fails_cleanly(tmp_path, [trunc], r"trunc\.h5ad: cannot be read as \.h5ad")
    text = tmp_path / "notes.h5ad"
    text.write_text("not hdf5")
    _assert_fails_cleanly(tmp_path, [text], r"notes\.h5ad: cannot be read")
    _assert_fails_cleanly(tmp_path, [tmp_path / "nope.h5ad"], r"nope\.h5ad: no such file")


def test_missing_layer_and_existing_output(tmp_path, ray_local):
    good = _write(tmp_path, "good.h5ad", _counts())
    _assert_fails_cleanly(
        tmp_path, [good], r"good\.h5ad: field 'layers/counts' not found", IngestConfig(layer="counts")
    )
    out = tmp_path / "exists.store"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(InputError, match="already exists"):
        ingest([good], out)
    assert (out / "keep.txt").read_text() == "mine"  # nothing lost
    with pytest.raises(InputError, match="not a cellray store"):  # --overwrite replaces only a store
        ingest([good], out, IngestConfig(overwrite=True))
    assert (out / "keep.txt").read_text() == "mine"
    real = tmp_path / "real.store"
    ingest([good], real)
    store = ingest([good], real, IngestConfig(overwrite=True, seed=1)).store  # a store is replaced
    assert store.n_cells == 40 and store.manifest.shuffle["seed"] == 1


# -------------------------------------------------------------------------------------------- memory


def test_peak_memory_is_bounded_by_shard_size_not_input_size(tmp_path, ray_local):
    """An input ~10x the shard size: the tasks' peak RSS growth stays near the shard size."""
    a = synthetic_counts(40_000, 2_000, nnz_per_cell=300, seed=0)
    path = tmp_path / "big.h5ad"
    a.write_h5ad(path)
    input_bytes = a.X.data.nbytes + a.X.indices.nbytes
    del a
    shard_cells = 4_000
    result = ingest([path], tmp_path / "s.store", IngestConfig(shard_cells=shard_cells, read_cells=1_000))
    shard_bytes = max(s.nnz for s in result.store.manifest.shards) * 8  # float32 data + uint32 indices in flight
    peak = result.report.peak_task_rss_growth
    assert input_bytes > 8 * shard_bytes
    # growth of each task's RSS over its idle worker (imports excluded): ~2x a shard while it is reordered
    assert peak < 3 * shard_bytes + 16 * 2**20, (peak / 2**20, shard_bytes / 2**20, input_bytes / 2**20)


def test_kang_pbmc_ingests_and_verifies(tmp_path, real_data_dir, ray_local):
    from engine.store.verify import verify_store

    inputs = [real_data_dir / "kang_ctrl.h5ad", real_data_dir / "kang_stim.h5ad"]
    store = ingest(inputs, tmp_path / "kang.store", IngestConfig(shard_cells=4_000)).store
    assert (store.n_cells, store.n_genes) == (13_999, 14_053)
    assert verify_store(store.path) == []
    ctrl = ad.read_h5ad(inputs[0])
    obs = store.read_obs(0, ["dataset", "obs_name"])
    i = int(np.flatnonzero(obs["dataset"] == "kang_ctrl")[0])
    row = store.read_csr(0, i, i + 1).to_scipy().toarray()[0]
    src = ctrl[obs["obs_name"].iloc[i]].X.toarray()[0]
    np.testing.assert_array_equal(row[store.gene_ids.get_indexer(ctrl.var_names)], src)
