import json

import anndata as ad
import numpy as np
import pytest
import zarr

from engine.errors import StoreError
from engine.store.format import FORMAT_VERSION, MANIFEST_KEY, Store
from engine.store.verify import verify_store


def test_every_shard_is_a_plain_anndata_matching_the_manifest(tiny_store):
    store = Store.open(tiny_store)
    m = store.manifest
    assert store.n_shards >= 3 and sum(s.n_cells for s in m.shards) == m.n_cells
    for info in m.shards:
        a = ad.read_zarr(tiny_store / info.path)
        assert a.shape == (info.n_cells, m.n_genes)
        assert a.X.nnz == info.nnz
        assert list(a.var_names) == list(store.gene_ids)
        assert a.X.dtype == np.dtype(m.count_dtype) and a.X.indices.dtype == np.dtype(m.index_dtype)
        for col, schema in m.obs_schema.items():
            if "categories" in schema:  # categories are unified across shards
                assert list(a.obs[col].cat.categories) == schema["categories"]


def test_manifest_records_format_codec_and_provenance(tiny_store, tiny_h5ads):
    raw = zarr.open_group(str(tiny_store), mode="r").attrs[MANIFEST_KEY]
    assert raw["format"] == "cellray.store" and raw["version"] == FORMAT_VERSION
    assert raw["codec"]["name"] in ("blosc-lz4", "blosc-zstd", "zstd")
    assert [p["dataset"] for p in raw["provenance"]] == [p.stem for p in tiny_h5ads]
    assert set(raw["obs_schema"]) == {"dataset", "obs_name", "cell_type", "batch"}
    json.dumps(raw)  # plain JSON, readable without cellray


def test_read_csr_equals_anndata_rows(tiny_store):
    store = Store.open(tiny_store)
    a = ad.read_zarr(tiny_store / store.manifest.shards[1].path)
    block = store.read_csr(1, 17, 123)
    assert block.n_cells == 106 and block.indptr[0] == 0
    np.testing.assert_array_equal(block.to_scipy().toarray(), a.X[17:123].toarray())
    with pytest.raises(IndexError):
        store.read_csr(1, 5, store.manifest.shards[1].n_cells + 1)


def test_locate_maps_global_index_to_shard(tiny_store):
    store = Store.open(tiny_store)
    last = store.n_cells - 1
    shard, local = store.locate(np.array([0, store.cell_offsets[1], last]))
    assert shard.tolist() == [0, 1, store.n_shards - 1]
    assert local.tolist() == [0, 0, store.manifest.shards[-1].n_cells - 1]


def test_open_rejects_non_stores_and_other_versions(tmp_path, tiny_store):
    with pytest.raises(StoreError, match="no such store"):
        Store.open(tmp_path / "missing")
    zarr.open_group(str(tmp_path / "plain.zarr"), mode="w")
    with pytest.raises(StoreError, match="no 'cellray' manifest"):
        Store.open(tmp_path / "plain.zarr")
    import shutil

    other = tmp_path / "v99.store"
    shutil.copytree(tiny_store, other)
    g = zarr.open_group(str(other), mode="r+")
    g.attrs[MANIFEST_KEY] = {**g.attrs[MANIFEST_KEY], "version": 99}
    with pytest.raises(StoreError, match="'version' is 99"):
        Store.open(other)


def test_verify_accepts_a_sound_store(tiny_store):
    assert verify_store(tiny_store) == []


def test_verify_catches_a_corrupted_chunk(tmp_path, tiny_store):
    import shutil

    bad = shutil.copytree(tiny_store, tmp_path / "corrupt.store")
    chunk = next((bad / "shards" / "00001" / "X" / "data" / "c").rglob("*"))
    raw = bytearray(chunk.read_bytes())
    for i in range(16, min(len(raw), 400)):  # scramble the compressed payload, keep the file size
        raw[i] ^= 0x5A
    chunk.write_bytes(bytes(raw))
    problems = verify_store(bad)
    assert problems and "shards/00001" in problems[0]


def test_verify_catches_a_deleted_shard(tmp_path, tiny_store):
    import shutil

    bad = shutil.copytree(tiny_store, tmp_path / "missing-shard.store")
    shutil.rmtree(bad / "shards" / "00002")
    problems = verify_store(bad)
    assert len(problems) == 1 and "shards/00002" in problems[0]
