"""Every model on real cells (a Kang ctrl/stim sample) through the engine's own transforms: the loss goes down,
embeddings have one row per cell in batch order, and the debug() / small() presets build and run."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

import models
from engine.loading.tensors import to_torch
from engine.preprocess.stats import StatsConfig, compute_stats
from engine.preprocess.transforms import Pipeline
from engine.store.format import Store
from engine.store.ingest import IngestConfig, ingest
from engine.train.data import data_summary

NORM = {"normalize_total": {"target_sum": 1e4}}
HVG = {"select_genes": "hvg"}
# name -> (model, config overrides, transforms); the VAE and the probe read the HVG counts (small and fast)
RUNS = {
    "vae": ("vae", {}, [HVG]),
    "transformer-binned": ("transformer", {}, [NORM, "log1p", HVG, {"binning": {"n_bins": 11}}]),
    "transformer-binned-kernel-mask": (
        "transformer",
        {"value_encoder": "category", "value_loss": "mse", "pooling": "cls"},
        [NORM, "log1p", HVG, {"binning": {"n_bins": 11}}, {"mask": {"fraction": 0.3}}],
    ),
    "transformer-rank": ("transformer", {}, [NORM, HVG, {"rank_tokens": {"max_len": 64}}]),
    "probe": ("probe", {"label_key": "dataset"}, [HVG]),
}


@pytest.fixture(scope="module")
def kang_store(kang_sample, tmp_path_factory):
    """150 real ctrl + 150 real stim cells, with gene statistics and 200 highly variable genes."""
    store = tmp_path_factory.mktemp("kang_models") / "kang.store"
    ingest(kang_sample(150, 0), store, IngestConfig(shard_cells=128, executor="local"))
    compute_stats(store, StatsConfig(hvg=200, flavor="seurat", executor="local"))  # seurat_v3 loess needs more cells
    return Store.open(store)


def cells(store: Store, transforms: list) -> tuple[dict, Pipeline | None]:
    """Every cell of the store as one batch dict of tensors, as the loader would hand it over."""
    pipe = Pipeline.from_spec(transforms, store) if transforms else None
    parts = []
    for shard in range(store.n_shards):
        block = store.read_csr(shard)
        index = store.cell_offsets[shard] + np.arange(block.n_cells)
        out = pipe(block, index) if pipe is not None else {"X": block.to_scipy().toarray().astype(np.float32)}
        if hasattr(out["X"], "to_scipy"):
            out["X"] = out["X"].to_scipy().toarray()
        parts.append({**out, "index": index, "dataset": store.obs_codes(shard, "dataset")})
    batch = {k: np.concatenate([np.asarray(p[k]) for p in parts]) for k in parts[0]}
    return to_torch(batch, ("dataset",)), pipe


def build(store: Store, pipe: Pipeline | None, name: str, preset: str, overrides: dict):
    model_name = RUNS[name][0]
    cls = models.get(model_name).Config
    base = cls.debug() if preset == "debug" else cls.small()
    # debug() pins data sizes for unit tests; clear them so the data fills them in, as a run does
    sized = {f.name: 0 for f in dataclasses.fields(cls) if f.name in ("n_genes", "n_input", "n_classes")}
    config = dataclasses.replace(base, **sized, **overrides).resolve(data_summary(store, pipe))
    return models.build(model_name, config)


@pytest.mark.parametrize("name", list(RUNS))
def test_loss_decreases_on_real_cells(kang_store, name):
    torch.manual_seed(0)
    _, overrides, transforms = RUNS[name]
    batch, pipe = cells(kang_store, transforms)
    model = build(kang_store, pipe, name, "debug", overrides)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    n = len(batch["index"])
    losses = []
    for step in range(40):
        rows = torch.randperm(n)[:64]
        out = model.loss({k: v[rows] for k, v in batch.items()}, step=step)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert np.isfinite(losses).all()
    assert np.mean(losses[-10:]) < 0.9 * np.mean(losses[:10]), losses


@pytest.mark.parametrize("name", list(RUNS))
def test_embedding_rows_follow_the_cells(kang_store, name):
    """One row per cell; a cell's row does not depend on its position in the batch or on its batch mates."""
    torch.manual_seed(0)
    _, overrides, transforms = RUNS[name]
    batch, pipe = cells(kang_store, transforms)
    model = build(kang_store, pipe, name, "small", overrides).eval()
    n = len(batch["index"])
    emb = model.embed(batch)
    assert emb.shape[0] == n and emb.dtype == torch.float32 and torch.isfinite(emb).all()
    assert emb.std(0).max() > 0, "every cell got the same embedding"
    perm = torch.randperm(n)
    shuffled = model.embed({k: v[perm] for k, v in batch.items()})
    torch.testing.assert_close(shuffled, emb[perm], rtol=1e-4, atol=1e-5)
    part = model.embed({k: v[:7] for k, v in batch.items()})
    torch.testing.assert_close(part, emb[:7], rtol=1e-4, atol=1e-5)


def test_presets_resolve_from_the_data(kang_store):
    """debug() and small() of every model build from the data summary (the engine's own sizing) and run."""
    for name, (model_name, overrides, transforms) in RUNS.items():
        batch, pipe = cells(kang_store, transforms)
        summary = data_summary(kang_store, pipe)
        for preset in ("debug", "small"):
            model = build(kang_store, pipe, name, preset, overrides)
            config = model.config
            assert summary.n_genes == 200
            if model_name == "transformer":
                assert config.n_genes == 200 and config.input == ("rank" if "rank" in name else "binned")
            elif model_name == "vae":
                assert config.n_genes == 200
            else:
                assert config.n_input == 200 and config.n_classes == 3  # ctrl, stim, missing
            rows = torch.arange(16)
            out = model.loss({k: v[rows] for k, v in batch.items()}, step=0)
            assert np.isfinite(out.loss.item()), (name, preset)
    small = models.get("transformer").Config.small()
    assert (small.d_model, small.n_layers, small.max_len) == (64, 2, 128)
