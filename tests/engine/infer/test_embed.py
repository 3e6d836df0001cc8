"""`cellray embed`: one row per cell in store order, obs preserved, equal to the model run directly, opens in scanpy."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from engine.errors import InferError
from engine.infer.embed import OBSM_KEY, embed
from engine.infer.evaluate import knn_accuracy
from engine.store.format import Store
from engine.train.checkpoint import load_checkpoint
from engine.train.driver import pretrain
from jobs.cli import main
from jobs.spec import parse_spec


@pytest.fixture(scope="module")
def vae_checkpoint(tiny_store, ray_local, tmp_path_factory):
    """A VAE with a batch covariate, trained in-process (resources.workers: 0) for a few steps."""
    out = tmp_path_factory.mktemp("embed") / "run"
    spec = parse_spec(
        {
            "kind": "pretrain",
            "name": "embed-test",
            "data": {"store": str(tiny_store), "batch_size": 128, "obs_keys": ["batch"]},
            "model": {"name": "vae", "config": {"n_latent": 3, "n_hidden": 16, "batch_key": "batch"}},
            "train": {"max_steps": 4, "checkpoint_every": 2, "lr": 1e-2, "output": str(out)},
            "resources": {"workers": 0},
        }
    )
    return pretrain(spec).output


def test_embed_h5ad_in_store_order_opens_in_scanpy(vae_checkpoint, tiny_store, tmp_path):
    import scanpy as sc

    out = tmp_path / "emb.h5ad"
    res = embed(vae_checkpoint, tiny_store, out, batch_size=100, num_actors=2)
    store = Store.open(tiny_store)
    a = sc.read_h5ad(out)
    assert a.n_obs == store.n_cells == res.n_cells and a.obsm[OBSM_KEY].shape == (store.n_cells, 3)
    obs = pd.concat([store.read_obs(s) for s in range(store.n_shards)])
    assert list(a.obs_names) == list(obs.index)
    pd.testing.assert_frame_equal(a.obs, obs, check_categorical=True)
    assert a.uns["cellray"]["step"] == 4 and a.uns["cellray"]["model"] == "vae"
    # the same numbers as the model applied directly to a shard's cells (with their batch codes)
    model, _ = load_checkpoint(vae_checkpoint)
    shard = 1
    block = store.read_csr(shard)
    codes = store.read_obs(shard, ["batch"])["batch"].cat.codes.to_numpy()
    direct = model.embed({"X": torch.from_numpy(block.to_scipy().toarray().astype(np.float32)), "batch": torch.from_numpy(codes.astype(np.int64))})
    lo, hi = store.cell_offsets[shard], store.cell_offsets[shard + 1]
    np.testing.assert_allclose(a.obsm[OBSM_KEY][lo:hi], direct.numpy(), rtol=1e-5, atol=1e-5)
    sc.pp.neighbors(a, use_rep=OBSM_KEY, n_neighbors=5)  # scanpy works on it
    assert a.obsp["connectivities"].shape == (store.n_cells, store.n_cells)
    with pytest.raises(InferError, match="already exists"):
        embed(vae_checkpoint, tiny_store, out)


def test_embed_cli_zarr_and_knn(vae_checkpoint, tiny_store, tmp_path, capsys):
    import anndata as ad

    out = tmp_path / "emb.zarr"
    assert main(["embed", "--checkpoint", str(vae_checkpoint), "--store", str(tiny_store), "--out", str(out), "--label-key", "cell_type"]) == 0
    printed = capsys.readouterr().out
    assert "kNN (k=15) accuracy of 'cell_type'" in printed
    assert ad.read_zarr(out).obsm[OBSM_KEY].shape[0] == Store.open(tiny_store).n_cells
    assert main(["embed", "--checkpoint", str(tmp_path), "--store", str(tiny_store), "--out", str(tmp_path / "x.h5ad")]) == 2


def test_knn_accuracy_separates_clusters():
    rng = np.random.default_rng(0)
    labels = np.repeat(["a", "b", "c"], 100)
    emb = rng.normal(size=(300, 4)) + np.repeat(np.eye(3, 4) * 10, 100, axis=0)
    assert knn_accuracy(emb, labels, k=5) == 1.0
    assert knn_accuracy(rng.normal(size=(300, 4)), labels, k=5) < 0.6
