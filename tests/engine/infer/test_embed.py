"""`cellray embed`: one row per cell in store order, obs preserved, equal to the model run directly, opens with plain
anndata/scanpy as .zarr and .h5ad; `kind: embed` specs run the same path."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from engine.errors import InferError
from engine.infer.embed import OBSM_KEY, embed
from engine.infer.evaluate import knn_accuracy
from engine.infer.parts import checksum
from engine.store.format import Store
from jobs.cli import main
from jobs.spec import load_spec


def test_zarr_output_is_plain_anndata_in_store_order(reference_embedding, vae_checkpoint, tiny_store, helpers):
    a = reference_embedding
    store = Store.open(tiny_store)
    obs = helpers.store_obs(store)
    assert a.n_obs == store.n_cells and a.obsm[OBSM_KEY].shape == (store.n_cells, 3)
    assert list(a.obs_names) == list(obs.index) and a.obs_names.is_unique  # every cell once, in store order
    pd.testing.assert_frame_equal(a.obs, obs, check_categorical=True)
    u = a.uns["cellray"]
    assert u["step"] == 4 and u["model"] == "vae" and u["parts"] == 10 and u["part_cells"] == 150
    assert u["vocabulary_fingerprint"].startswith("sha256:") and u["genes_missing"] == 0
    # the same numbers as the model applied directly to every cell (with its batch code)
    direct = helpers.direct_vae_embedding(vae_checkpoint, store)
    np.testing.assert_allclose(a.obsm[OBSM_KEY], direct, rtol=1e-5, atol=1e-5)


def test_a_checkpoint_from_before_a_config_field_embeds_as_it_was_trained(
    vae_checkpoint, tiny_store, tmp_path, helpers
):
    """A checkpoint whose meta.json predates `encode_batch` (cellray's VAE then fed the batch to its encoder too):
    load_checkpoint builds that model, FORMER_DEFAULTS, so its weights fit and `cellray embed` serves it; today's
    default, a decoder-only covariate, would not fit them."""
    import shutil

    import anndata as ad
    import torch

    import models
    from engine.train.checkpoint import latest_checkpoint, load_checkpoint, read_meta

    run = Path(shutil.copytree(vae_checkpoint, tmp_path / "old"))
    ckpt = latest_checkpoint(run)
    meta = read_meta(ckpt)
    config = {k: v for k, v in meta["model"]["config"].items() if k != "encode_batch"}
    meta["model"]["config"] = config
    (ckpt / "meta.json").write_text(json.dumps(meta))
    torch.manual_seed(0)
    old = models.build("vae", dict(config, encode_batch=True))  # the model such a checkpoint holds
    torch.save(old.state_dict(), ckpt / "model.pt")
    model, _ = load_checkpoint(run)
    assert model.config.encode_batch and model.config.batch_key == "batch"
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), old.state_dict().values()))
    with pytest.raises(RuntimeError, match="size mismatch"):
        models.build("vae", config).load_state_dict(old.state_dict())  # read with today's default
    embed(run, tiny_store, tmp_path / "e.h5ad")
    old.eval()
    direct = helpers.direct_vae_embedding(run, Store.open(tiny_store))  # the batch reaches the encoder
    np.testing.assert_allclose(ad.read_h5ad(tmp_path / "e.h5ad").obsm[OBSM_KEY], direct, rtol=1e-5, atol=1e-5)


def test_commit_records_match_the_written_parts(vae_checkpoint, tiny_store, tmp_path):
    import anndata as ad

    out = tmp_path / "emb.zarr"
    res = embed(vae_checkpoint, tiny_store, out, part_cells=400)  # in-process (a small store); one part per shard
    assert (res.parts, res.parts_run) == (4, 4)
    emb = ad.read_zarr(out).obsm[OBSM_KEY]
    records = sorted((out / ".cellray" / "parts").glob("*.json"))
    assert [r.name for r in records] == [f"{k:05d}.json" for k in range(4)]
    total = 0
    for f in records:
        rec = json.loads(f.read_text())
        assert rec["rows"] == rec["stop"] - rec["start"] and rec["start"] == total
        assert rec["checksum"] == checksum({OBSM_KEY: emb[rec["start"] : rec["stop"]]})
        total += rec["rows"]
    assert total == Store.open(tiny_store).n_cells
    assert not (out / ".cellray" / "tmp").exists() and not list(tmp_path.glob(".*"))  # no temporaries left


def test_h5ad_assembled_from_parts_opens_in_scanpy(reference_embedding, vae_checkpoint, tiny_store, tmp_path):
    import scanpy as sc

    out = tmp_path / "emb.h5ad"
    res = embed(vae_checkpoint, tiny_store, out, batch_size=100, part_cells=150)  # in-process: the same numbers
    a = sc.read_h5ad(out)
    ref = reference_embedding
    pd.testing.assert_frame_equal(a.obs, ref.obs)
    np.testing.assert_allclose(a.obsm[OBSM_KEY], ref.obsm[OBSM_KEY], atol=1e-5)  # another batch size, same numbers
    assert a.uns["cellray"]["fingerprint"] == ref.uns["cellray"]["fingerprint"]
    assert a.n_obs == res.n_cells and a.obsm[OBSM_KEY].dtype == np.float32
    assert not list(tmp_path.glob(".*"))  # the parts directory is gone once the .h5ad is in place
    # a rerun of a finished output is a no-op; another layout is refused, --overwrite replaces
    again = embed(vae_checkpoint, tiny_store, out, part_cells=150)
    assert again.parts_run == 0
    with pytest.raises(InferError, match="already exists"):
        embed(vae_checkpoint, tiny_store, out, part_cells=100)
    assert embed(vae_checkpoint, tiny_store, out, part_cells=500, overwrite=True).parts == 3


def test_embed_cli_zarr_and_knn(vae_checkpoint, tiny_store, tmp_path, capsys):
    import anndata as ad

    out = tmp_path / "emb.zarr"
    args = ["embed", "--checkpoint", str(vae_checkpoint), "--store", str(tiny_store), "--out", str(out)]
    assert main([*args, "--label-key", "cell_type", "--executor", "local", "--part-cells", "700"]) == 0
    printed = capsys.readouterr().out
    assert "kNN (k=15) accuracy of 'cell_type'" in printed and "3 of 3 parts this run" in printed
    assert ad.read_zarr(out).obsm[OBSM_KEY].shape[0] == Store.open(tiny_store).n_cells
    no_checkpoint = ["--checkpoint", str(tmp_path), "--store", str(tiny_store), "--out", str(tmp_path / "x.h5ad")]
    assert main(["embed", *no_checkpoint]) == 2
    assert main([*args, "--label-key", "nope", "--part-cells", "700"]) == 2  # up to date; then a one-line error
    assert "not an obs column" in capsys.readouterr().err


def test_kind_embed_spec_runs_the_same_path(vae_checkpoint, tiny_store, tmp_path, capsys):
    import anndata as ad

    spec = tmp_path / "embed.yaml"
    out = tmp_path / "spec-emb.zarr"
    spec.write_text(
        yaml.safe_dump(
            {
                "kind": "embed",
                "name": "tiny-embed",
                "checkpoint": str(vae_checkpoint),
                "store": str(tiny_store),
                "out": str(out),
                "part_cells": 500,
            }
        )
    )
    assert main(["run", str(spec), "--check"]) == 0
    assert main(["run", str(spec), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["cells"] == Store.open(tiny_store).n_cells and summary["parts"] == 3
    assert ad.read_zarr(out).obsm[OBSM_KEY].shape == (summary["cells"], 3)
    example = load_spec(Path(__file__).resolve().parents[3] / "jobs" / "embed_vae.yaml")
    assert example.kind == "embed" and example.resources.workers == 2 and example.out.endswith(".zarr")
    spec.write_text(yaml.safe_dump({"kind": "embed", "checkpoint": "x", "store": "y", "out": "z", "batch_size": 0}))
    assert main(["run", str(spec)]) == 2
    assert "batch_size" in capsys.readouterr().err


def test_more_gpus_than_the_cluster_has_is_refused_before_anything_starts(vae_checkpoint, tiny_store, tmp_path):
    with pytest.raises(InferError, match=r"1 inference actors x 1 GPUs do not fit the cluster \(4 CPUs, 0 GPUs\)"):
        embed(vae_checkpoint, tiny_store, tmp_path / "gpu.zarr", resources={"gpus_per_worker": 1})
    assert not list(tmp_path.iterdir())  # no output, no lock, no parts directory


def test_knn_accuracy_separates_clusters():
    rng = np.random.default_rng(0)
    labels = np.repeat(["a", "b", "c"], 100)
    emb = rng.normal(size=(300, 4)) + np.repeat(np.eye(3, 4) * 10, 100, axis=0)
    assert knn_accuracy(emb, labels, k=5) == 1.0
    assert knn_accuracy(rng.normal(size=(300, 4)), labels, k=5) < 0.6


def test_a_corrupted_chunk_under_embed_is_one_line_exit_2(vae_checkpoint, tiny_store, tmp_path, capsys):
    """Bad bytes in the store end the run with the store error (store, shard, array, chunk), nothing written."""
    import shutil
    from pathlib import Path

    store = Path(shutil.copytree(tiny_store, tmp_path / "bad.store"))
    chunk = sorted((store / "shards" / "00001" / "X" / "data" / "c").iterdir())[0]
    raw = bytearray(chunk.read_bytes())
    raw[40] ^= 0x10
    chunk.write_bytes(bytes(raw))
    out = tmp_path / "emb.zarr"
    capsys.readouterr()
    code = main(["embed", "--checkpoint", str(vae_checkpoint), "--store", str(store), "--out", str(out)])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(err) == 1 and "shards/00001/X/data" in err[0], err
    assert not out.exists()
