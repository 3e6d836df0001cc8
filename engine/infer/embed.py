"""Embeddings of every cell of a store from a trained checkpoint, written as an AnnData.

`embed(checkpoint, store, out)` fans the store's shards out to a pool of Ray actors (each loads the model
once), runs the data section's transforms (without masking) and `model.embed` over contiguous cell ranges,
and writes an AnnData in store order: the store's obs, `obsm["X_cellray"]`, and `uns["cellray"]` (provenance).
The output (.h5ad or .zarr) is written under a temporary name and renamed into place.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import models
from engine.atomic import atomic_path
from engine.errors import InferError
from engine.loading.tensors import to_torch
from engine.preprocess.transforms import Pipeline
from engine.progress import Progress, silent
from engine.runtime import ray_session
from engine.store.format import Store
from engine.train.checkpoint import latest_checkpoint, load_checkpoint, read_meta

log = logging.getLogger(__name__)

OBSM_KEY = "X_cellray"



@dataclass
class EmbedResult:
    out: Path
    n_cells: int
    dim: int
    checkpoint: Path
    step: int


def _inference_transforms(transforms: list) -> list:
    """The training transforms minus masking: inference sees every value."""
    return [t for t in transforms if not (t == "mask" or (isinstance(t, dict) and "mask" in t))]


class Embedder:
    """Loads a checkpoint once; embeds cell ranges of store shards. A Ray actor in `embed`, plain object in tests."""

    def __init__(self, checkpoint: str, store: str, batch_size: int = 1024):
        import torch

        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        self.model, self.meta = load_checkpoint(checkpoint)
        self.store = Store.open(store)
        self.batch_size = batch_size
        transforms = _inference_transforms(self.meta["data"].get("transforms") or [])
        self.pipeline = Pipeline.from_spec(transforms, self.store) if transforms else None
        self.obs_keys = models.make_config(self.meta["model"]["name"], self.meta["model"]["config"]).obs_keys()

    def shard(self, shard: int) -> np.ndarray:
        import torch

        n = self.store.manifest.shards[shard].n_cells
        codes = {k: self.store.obs_codes(shard, k) for k in self.obs_keys}
        offset = int(self.store.cell_offsets[shard])
        parts = []
        for start in range(0, n, self.batch_size):
            stop = min(n, start + self.batch_size)
            block = self.store.read_csr(shard, start, stop)
            index = np.arange(offset + start, offset + stop, dtype=np.int64)
            out = self.pipeline(block, index) if self.pipeline is not None else {"X": block}
            batch = to_torch({**out, **{k: v[start:stop] for k, v in codes.items()}, "index": index}, self.obs_keys)
            with torch.inference_mode():
                parts.append(self.model.embed(batch).cpu().numpy())
        return np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)


def embed(
    checkpoint: str | os.PathLike,
    store: str | os.PathLike,
    out: str | os.PathLike,
    *,
    address: str | None = None,
    batch_size: int = 1024,
    num_actors: int | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> EmbedResult:
    """Embed every cell of `store` with the model of `checkpoint` (a checkpoint dir or a run's output folder)."""
    import anndata as ad
    import pandas as pd
    import ray
    from ray.util import ActorPool

    out = Path(out)
    if out.suffix not in (".h5ad", ".zarr"):
        raise InferError(f"{out}: --out must end in .h5ad or .zarr")
    if out.exists() and not overwrite:
        raise InferError(f"{out}: already exists (pass --overwrite to replace it)")
    ckpt = latest_checkpoint(checkpoint)
    st = Store.open(store)
    progress = progress or silent
    with ray_session(address):
        n_shards = st.n_shards
        n_actors = num_actors or max(1, min(n_shards, int(ray.available_resources().get("CPU", 1)), 8))
        actor = ray.remote(num_cpus=1)(Embedder)
        actors = [actor.remote(str(ckpt), str(st.path.resolve()), batch_size) for _ in range(n_actors)]
        pool = ActorPool(actors)
        parts = []
        for i, part in enumerate(pool.map(lambda a, s: a.shard.remote(s), range(n_shards))):  # results in shard order
            parts.append(part)
            progress("embed", i + 1, n_shards)
        for a in actors:
            ray.kill(a)
    emb = np.concatenate(parts).astype(np.float32)
    if emb.shape[0] != st.n_cells:
        raise InferError(f"{st.path}: embedded {emb.shape[0]} cells, the manifest says {st.n_cells}")
    obs = pd.concat([st.read_obs(s) for s in range(st.n_shards)])
    meta = read_meta(ckpt)
    adata = ad.AnnData(obs=obs, obsm={OBSM_KEY: emb})
    adata.uns["cellray"] = {
        "checkpoint": str(ckpt),
        "model": meta["model"]["name"],
        "step": int(meta["step"]),
        "store": str(st.path),
    }
    _write_atomically(adata, out, overwrite)
    log.info("wrote %s: %d cells x %d dims", out, emb.shape[0], emb.shape[1])
    return EmbedResult(out=out, n_cells=emb.shape[0], dim=emb.shape[1], checkpoint=ckpt, step=int(meta["step"]))


def _write_atomically(adata, out: Path, overwrite: bool) -> None:
    import warnings

    import anndata as ad

    with atomic_path(out, overwrite=overwrite) as tmp:
        if out.suffix == ".zarr":
            # zarr v3 with sharding: the format of cellray stores, and anndata's next defaults
            with ad.settings.override(zarr_write_format=3, auto_shard_zarr_v3=True), warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Consolidated metadata is currently not part")
                adata.write_zarr(tmp)
        else:
            adata.write_h5ad(tmp)
