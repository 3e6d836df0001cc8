"""Genes mapped by id onto the checkpoint's vocabulary; predictions of a classifier head equal the model's own."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest
import torch

from engine.errors import InferError
from engine.infer.embed import OBSM_KEY, embed
from engine.infer.embedder import inference_transforms, needs_stats
from engine.infer.predict import PRED_KEY, PRED_PROB_KEY, PROBA_KEY, UNLABELLED
from engine.infer.vocab import map_genes
from engine.preprocess.transforms import Pipeline
from engine.store.format import CSRBlock, Store
from engine.store.ingest import IngestConfig, ingest
from engine.train.checkpoint import gene_fingerprint, latest_checkpoint, load_checkpoint, read_meta


def _ingest_with_vocab(tiny_h5ads, path, genes) -> Store:
    """The tiny inputs ingested again (same cells, same shuffle) onto another gene vocabulary."""
    vocab = path.parent / f"{path.name}.genes.txt"
    vocab.write_text("\n".join(genes))
    return ingest(
        tiny_h5ads,
        path,
        IngestConfig(shard_cells=400, obs_keys=("cell_type", "batch"), vocab=str(vocab), executor="local"),
    ).store


def test_checkpoint_records_the_training_vocabulary(vae_checkpoint, tiny_store):
    meta = read_meta(latest_checkpoint(vae_checkpoint))
    genes = [str(g) for g in Store.open(tiny_store).gene_ids]
    vocab = meta["vocabulary"]
    assert vocab["genes"] == genes and vocab["fingerprint"] == gene_fingerprint(genes)
    assert vocab["obs_categories"] == {"batch": ["b0", "b1"]}


def test_a_gene_selection_is_recorded_and_needs_no_training_store(tiny_store, tiny_h5ads, helpers, tmp_path):
    """A VAE on its store's HVGs records their ids; with that store gone it embeds a store of the same genes in
    another order as it embedded the training store: the genes selected again by id, no statistics needed."""
    import shutil

    import anndata as ad

    from engine.preprocess.stats import StatsConfig, compute_stats, load_stats

    train = tmp_path / "train.store"
    shutil.copytree(tiny_store, train)
    compute_stats(train, StatsConfig(hvg=24, executor="local"))
    vae = {"name": "vae", "config": {"n_latent": 3, "n_hidden": 16}}
    ckpt = helpers.pretrain(train, tmp_path / "vae", vae, [], [{"select_genes": "hvg"}])
    genes = np.asarray(Store.open(train).gene_ids).astype(str)
    selected = read_meta(latest_checkpoint(ckpt))["vocabulary"]["selected_genes"]
    assert selected == list(genes[load_stats(train).highly_variable])

    before = ad.read_zarr(embed(ckpt, train, tmp_path / "before.zarr").out)
    shutil.rmtree(train)  # the training store, its statistics with it
    permuted = _ingest_with_vocab(
        tiny_h5ads, tmp_path / "permuted.store", list(np.random.default_rng(2).permutation(genes))
    )
    after = ad.read_zarr(embed(ckpt, permuted.path, tmp_path / "after.zarr").out)
    ref = before.obsm[OBSM_KEY][before.obs_names.get_indexer(after.obs_names)]
    np.testing.assert_allclose(after.obsm[OBSM_KEY], ref, rtol=0, atol=1e-6)


def test_inference_reads_the_transform_spec_as_training_parsed_it():
    """Every spelling of a step the spec accepts: `select_genes: {hvg: true}` needs the statistics as `hvg` does,
    a recorded selection replaces either and needs none, and inference never masks."""
    assert needs_stats([{"select_genes": "hvg"}]) and needs_stats([{"select_genes": {"hvg": True}}])
    assert needs_stats([{"normalize_total": {"target_sum": None}}]) and not needs_stats(["normalize_total", "log1p"])
    spec = [{"select_genes": {"hvg": True}}, "log1p", {"binning": {"n_bins": 11}}, {"mask": {"fraction": 0.3}}]
    assert inference_transforms(spec) == spec[:3]
    recorded = [{"select_genes": {"genes": ["g2", "g0"]}}, *spec[1:3]]
    assert inference_transforms(spec, {"selected_genes": ["g2", "g0"]}) == recorded
    assert not needs_stats(inference_transforms(spec, {"selected_genes": ["g2", "g0"]}))


def test_genes_in_another_order_give_identical_embeddings(
    vae_checkpoint, tiny_store, tiny_h5ads, reference_embedding, tmp_path
):
    import anndata as ad

    genes = [str(g) for g in Store.open(tiny_store).gene_ids]
    shuffled = list(np.random.default_rng(1).permutation(genes))
    permuted = _ingest_with_vocab(tiny_h5ads, tmp_path / "permuted.store", shuffled)
    assert list(permuted.gene_ids) != genes and sorted(permuted.gene_ids) == sorted(genes)
    out = tmp_path / "emb.zarr"
    res = embed(vae_checkpoint, permuted.path, out, part_cells=750)
    a = ad.read_zarr(out)
    assert res.parts == 2 and a.uns["cellray"]["genes_missing"] == 0
    ref = reference_embedding.obsm[OBSM_KEY][reference_embedding.obs_names.get_indexer(a.obs_names)]
    np.testing.assert_allclose(a.obsm[OBSM_KEY], ref, rtol=0, atol=1e-6)


def test_missing_genes_are_zero_and_counted_and_a_small_overlap_is_refused(vae_checkpoint, tiny_store, caplog):
    meta = read_meta(latest_checkpoint(vae_checkpoint))
    genes = pd.Index(meta["vocabulary"]["genes"])
    n = len(genes)
    store_genes = pd.Index(["NEW1", *genes[::-1][:250], "NEW2"])  # 250 training genes, reversed, and 2 unknown ones
    with caplog.at_level(logging.WARNING):
        gmap = map_genes(store_genes, meta, "s.store")
    assert (gmap.n_missing, gmap.n_dropped) == (n - 250, 2)
    assert f"{n - 250} of the checkpoint's {n} genes are not in the store" in caplog.text
    # a block in the store's columns lands in the training columns; unknown genes vanish, missing ones stay zero
    rng = np.random.default_rng(0)
    dense = rng.integers(0, 3, (5, len(store_genes))).astype(np.float32)
    import scipy.sparse as sp

    m = sp.csr_matrix(dense)
    mapped = gmap.apply(CSRBlock(m.indptr.astype(np.int64), m.indices, m.data, len(store_genes))).to_scipy().toarray()
    expected = np.zeros((5, len(genes)), np.float32)
    expected[:, genes.get_indexer(store_genes[1:-1])] = dense[:, 1:-1]
    np.testing.assert_array_equal(mapped, expected)
    message = rf"only 100 of the checkpoint's {n} genes \({100 * 100 / n:.0f}%\) are in the store; at least 50%"
    with pytest.raises(InferError, match=message):
        map_genes(genes[:100], meta, "s.store")
    assert map_genes(genes[:100], meta, "s.store", min_overlap=0.3).n_missing == n - 100


def test_embed_refuses_a_store_without_enough_genes(vae_checkpoint, tiny_store, tiny_h5ads, tmp_path, capsys):
    from jobs.cli import main

    genes = [str(g) for g in Store.open(tiny_store).gene_ids]
    few = _ingest_with_vocab(tiny_h5ads, tmp_path / "few.store", genes[:40])
    args = ["embed", "--checkpoint", str(vae_checkpoint), "--store", str(few.path), "--out", str(tmp_path / "x.zarr")]
    assert main(args) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and f"only 40 of the checkpoint's {len(genes)} genes" in err[0]
    assert not list(tmp_path.glob("*x.zarr*"))


def test_probe_predictions_agree_with_the_model(probe_checkpoint, tiny_store, tmp_path):
    import anndata as ad

    out = tmp_path / "pred.zarr"
    res = embed(probe_checkpoint, tiny_store, out, executor="ray", resources={"workers": 1, "cpus_per_worker": 2})
    assert res.predicts == "cell_type"
    a = ad.read_zarr(out)
    store = Store.open(tiny_store)
    model, meta = load_checkpoint(probe_checkpoint)
    categories = store.manifest.obs_schema["cell_type"]["categories"]
    assert list(a.uns["cellray"]["classes"]) == [*categories, UNLABELLED]
    assert a.uns["cellray"]["label_key"] == "cell_type"
    # the model called directly on the same cells through the same transforms
    pipe = Pipeline.from_spec(meta["data"]["transforms"], store)
    logits = []
    for s in range(store.n_shards):
        x = pipe(store.read_csr(s), np.arange(store.cell_offsets[s], store.cell_offsets[s + 1]))["X"]
        with torch.no_grad():
            x = torch.from_numpy(x.to_scipy().toarray())
            logits.append(model({"X": x}))
    proba = torch.softmax(torch.cat(logits), dim=-1).numpy()
    np.testing.assert_allclose(a.obsm[PROBA_KEY], proba, atol=1e-5)
    np.testing.assert_allclose(a.obsm[OBSM_KEY], proba, atol=1e-5)  # the probe's embedding is its probabilities
    best = proba.argmax(1)
    expected = pd.Categorical([categories[i] if i < len(categories) else None for i in best], categories=categories)
    expected = pd.Series(expected, index=a.obs_names).astype(object).fillna("-")
    assert (a.obs[PRED_KEY].astype(object).fillna("-") == expected).all()
    np.testing.assert_allclose(a.obs[PRED_PROB_KEY].to_numpy(), proba.max(1), atol=1e-5)
    assert a.obs[PRED_KEY].cat.categories.tolist() == categories
