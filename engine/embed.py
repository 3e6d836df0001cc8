"""Embeddings of every cell of a store from a trained checkpoint, written as an AnnData.

`embed(checkpoint, store, out)` fans the store's shards out to a pool of Ray actors (each loads the model
once), runs the data section's transforms (without masking) and `model.embed` over contiguous cell ranges,
and writes an AnnData in store order: the store's obs, `obsm["X_cellray"]`, and `uns["cellray"]` (provenance).
The output (.h5ad or .zarr) is written under a temporary name and renamed into place.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engine.errors import CellrayError

log = logging.getLogger(__name__)

OBSM_KEY = "X_cellray"


class EmbedError(CellrayError):
    """An embedding export that cannot run as asked."""


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


def _model_obs_keys(meta: dict[str, Any]) -> list[str]:
    cfg = meta["model"]["config"]
    return [k for k in (cfg.get("batch_key"), cfg.get("label_key")) if k]


def to_torch_batch(out: dict[str, Any], obs: dict[str, np.ndarray]) -> dict[str, Any]:
    """A transform pipeline's numpy output (dense X or CSRBlock) as the torch batch models take."""
    import torch

    from engine.store import CSRBlock

    batch: dict[str, Any] = {}
    for k, v in out.items():
        if isinstance(v, CSRBlock):
            v = v.to_scipy().toarray().astype(np.float32)
        batch[k] = torch.from_numpy(np.ascontiguousarray(v))
    for k, v in obs.items():
        batch[k] = torch.from_numpy(v.astype(np.int64))
    return batch


class Embedder:
    """Loads a checkpoint once; embeds cell ranges of store shards. A Ray actor in `embed`, plain object in tests."""

    def __init__(self, checkpoint: str, store: str, batch_size: int = 1024):
        import torch

        from engine.store import Store
        from engine.train import load_checkpoint

        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        self.model, self.meta = load_checkpoint(checkpoint)
        self.store = Store.open(store)
        self.batch_size = batch_size
        transforms = _inference_transforms(self.meta["data"].get("transforms") or [])
        self.pipeline = None
        if transforms:
            from engine.transforms import Pipeline

            self.pipeline = Pipeline.from_spec(transforms, self.store)
        self.obs_keys = _model_obs_keys(self.meta)

    def shard(self, shard: int) -> np.ndarray:
        import torch

        n = self.store.manifest.shards[shard].n_cells
        obs = self.store.read_obs(shard, self.obs_keys) if self.obs_keys else None
        offset = int(self.store.cell_offsets[shard])
        parts = []
        for start in range(0, n, self.batch_size):
            stop = min(n, start + self.batch_size)
            block = self.store.read_csr(shard, start, stop)
            index = np.arange(offset + start, offset + stop, dtype=np.int64)
            out = self.pipeline(block, index) if self.pipeline is not None else {"X": block}
            codes = {k: np.asarray(obs[k].cat.codes)[start:stop] for k in self.obs_keys} if obs is not None else {}
            batch = to_torch_batch(out, codes)
            batch["index"] = torch.from_numpy(index)
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
    progress=None,
) -> EmbedResult:
    """Embed every cell of `store` with the model of `checkpoint` (a checkpoint dir or a run's output folder)."""
    import anndata as ad
    import pandas as pd
    import ray
    from ray.util import ActorPool

    from engine.runtime import ray_session
    from engine.store import Store
    from engine.train import latest_checkpoint

    out = Path(out)
    if out.suffix not in (".h5ad", ".zarr"):
        raise EmbedError(f"{out}: --out must end in .h5ad or .zarr")
    if out.exists() and not overwrite:
        raise EmbedError(f"{out}: already exists (pass --overwrite to replace it)")
    ckpt = latest_checkpoint(checkpoint)
    st = Store.open(store)
    progress = progress or (lambda stage, done, total: None)
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
        raise EmbedError(f"{st.path}: embedded {emb.shape[0]} cells, the manifest says {st.n_cells}")
    obs = pd.concat([st.read_obs(s) for s in range(st.n_shards)])
    meta = json.loads((ckpt / "meta.json").read_text())
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
    from engine.store import replace_atomically, temporary_sibling

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(out).with_suffix(out.suffix)
    if out.suffix == ".zarr":
        import anndata as ad

        import warnings

        # zarr v3 with sharding: the format of cellray stores, and anndata's next defaults
        with ad.settings.override(zarr_write_format=3, auto_shard_zarr_v3=True), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Consolidated metadata is currently not part")
            adata.write_zarr(tmp)
        replace_atomically(tmp, out, overwrite)
    else:
        adata.write_h5ad(tmp)
        os.replace(tmp, out)


def knn_accuracy(emb: np.ndarray, labels: np.ndarray, k: int = 15, max_cells: int = 20_000, seed: int = 0) -> float:
    """Leave-one-out kNN label accuracy (majority of the k nearest neighbours, Euclidean) on up to max_cells."""
    import torch

    labels = np.asarray(labels)
    keep = np.flatnonzero(pd_notna(labels))
    if len(keep) > max_cells:
        keep = np.sort(np.random.default_rng(seed).choice(keep, max_cells, replace=False))
    codes, y = np.unique(labels[keep], return_inverse=True)
    x = torch.from_numpy(np.ascontiguousarray(emb[keep], dtype=np.float32))
    y = torch.from_numpy(y)
    correct = 0
    for start in range(0, len(x), 2048):
        d = torch.cdist(x[start : start + 2048], x)
        d[torch.arange(d.shape[0]), torch.arange(start, start + d.shape[0])] = float("inf")  # leave self out
        nn = d.topk(min(k, len(x) - 1), largest=False).indices
        votes = torch.nn.functional.one_hot(y[nn], len(codes)).sum(1)
        correct += int((votes.argmax(1) == y[start : start + 2048]).sum())
    return correct / max(1, len(x))


def pd_notna(values: np.ndarray) -> np.ndarray:
    import pandas as pd

    return np.asarray(pd.notna(values))
