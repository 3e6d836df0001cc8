"""Embedding quality: kNN label accuracy of the cellray VAE latent space vs PCA-50 of log-normalized data (scanpy).

    python bench/quality.py [--quick] [--workers N]

Datasets (real, from ../shared/data/fetch_real.sh; found in $CELLRAY_DATA, ~/.cache/cellray-data or /tmp/cellray-data):
- pbmc68k_reduced: 700 cells x 765 genes, 10 `bulk_labels`; counts rebuilt as round(expm1(raw.X) * n_counts / 1e4);
- Kang 2018 PBMC ctrl + stim: 13,999 cells x 14,053 genes, label = condition (the `dataset` column); skipped by --quick.
Each dataset is ingested into a store, the VAE is pretrained with `engine.train.pretrain` (Ray Train, `--workers`
DDP workers; in-process with --quick), embedded with `engine.embed.embed`, and scored with leave-one-out kNN
(k=15) on the latent mean. The peer: scanpy normalize_total(1e4) + log1p + PCA(50) on the same cells, same kNN.
Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

K = 15


def data_dir() -> Path | None:
    for d in (os.environ.get("CELLRAY_DATA"), Path.home() / ".cache/cellray-data", "/tmp/cellray-data"):
        if d and (Path(d) / "pbmc68k_reduced.h5ad").exists():
            return Path(d)
    return None


def pbmc68k_counts(src: Path, out: Path) -> Path:
    import anndata as ad
    import numpy as np
    import scipy.sparse as sp

    a = ad.read_h5ad(src)
    raw = a.raw.to_adata()
    x = raw.X.toarray() if sp.issparse(raw.X) else np.asarray(raw.X)
    counts = np.rint(np.expm1(x) * a.obs["n_counts"].to_numpy()[:, None] / 1e4).astype(np.float32)
    c = ad.AnnData(X=sp.csr_matrix(counts), obs=a.obs[["bulk_labels"]].copy(), var=raw.var[[]].copy())
    c.write_h5ad(out)
    return out


def pca_knn(store_path: Path, label: str) -> tuple[float, float]:
    import anndata as ad
    import numpy as np
    import pandas as pd
    import scanpy as sc
    import scipy.sparse as sp

    from engine.infer.evaluate import knn_accuracy
    from engine.store.format import Store

    store = Store.open(store_path)
    X = sp.vstack([store.read_csr(s).to_scipy() for s in range(store.n_shards)]).tocsr().astype(np.float32)
    obs = pd.concat([store.read_obs(s, [label]) for s in range(store.n_shards)])
    a = ad.AnnData(X=X, obs=obs)
    t0 = time.perf_counter()
    sc.pp.normalize_total(a, target_sum=1e4)
    sc.pp.log1p(a)
    sc.pp.pca(a, n_comps=min(50, min(a.shape) - 1))
    seconds = time.perf_counter() - t0
    return knn_accuracy(a.obsm["X_pca"], obs[label].to_numpy(), k=K), seconds


def run_dataset(
    name: str, inputs: list[Path], label: str, work: Path, steps: int, batch: int, workers: int, n_hidden: int
) -> dict:
    import anndata as ad

    from engine.infer.embed import OBSM_KEY, embed
    from engine.infer.evaluate import knn_accuracy
    from engine.store.ingest import IngestConfig, ingest
    from engine.train.driver import pretrain
    from jobs.spec import parse_spec

    store = work / f"{name}.store"
    obs_keys = () if label == "dataset" else (label,)
    ingest(inputs, store, IngestConfig(shard_cells=4000, obs_keys=obs_keys, overwrite=True))
    spec = parse_spec(
        {
            "kind": "pretrain",
            "name": name,
            "data": {"store": str(store), "batch_size": batch, "obs_keys": [], "val_fraction": 0.0},
            "model": {"name": "vae", "config": {"n_latent": 10, "n_hidden": n_hidden, "kl_warmup_steps": steps // 4}},
            "train": {
                "max_steps": steps,
                "lr": 3e-3,
                "warmup_steps": 10,
                "checkpoint_every": steps,
                "report_every": max(1, steps // 10),
                "output": str(work / f"run-{name}"),
            },
            "resources": {
                "workers": workers,
                "cpus_per_worker": 0.5,
                "readers_per_worker": 1 if workers else 0,
                "cpus_per_reader": 0.5,
            },
        }
    )
    t0 = time.perf_counter()
    result = pretrain(spec)
    train_s = time.perf_counter() - t0
    out = work / f"{name}.h5ad"
    embed(result.output, store, out, overwrite=True)
    a = ad.read_h5ad(out)
    vae = knn_accuracy(a.obsm[OBSM_KEY], a.obs[label].to_numpy(), k=K)
    pca, pca_s = pca_knn(store, label)
    h = result.history
    row = {
        "dataset": name,
        "cells": int(a.n_obs),
        "labels": int(a.obs[label].nunique()),
        "label_key": label,
        "vae_knn": round(vae, 4),
        "pca50_knn": round(pca, 4),
        "ratio_vs_pca": round(vae / pca, 4),
        "train_s": round(train_s, 1),
        "pca_s": round(pca_s, 2),
        "steps": steps,
        "loss_first": round(h[0]["loss"], 2),
        "loss_last": round(h[-1]["loss"], 2),
    }
    print(
        f"{name:16s} {row['cells']:>6d} cells {row['labels']:>2d} labels ({label}): kNN@{K} VAE {vae:.3f}  PCA-50 "
        f"{pca:.3f}  "
        f"ratio {vae / pca:.3f}  (train {train_s:.0f} s, {steps} steps, loss {row['loss_first']} -> "
        f"{row['loss_last']})",
        flush=True,
    )
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="pbmc68k only, fewer steps, in-process training (< 1 min)")
    ap.add_argument("--workers", type=int, default=2, help="Ray Train DDP workers (0: in-process)")
    args = ap.parse_args()
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.WARNING)
    from engine.runtime import ray_session

    d = data_dir()
    if d is None:
        print("no real data found: run ../shared/data/fetch_real.sh first")
        print(json.dumps({"skipped": "no real data"}))
        return
    workers = 0 if args.quick else args.workers
    rows = []
    with tempfile.TemporaryDirectory(prefix="cellray-quality-") as tmp, ray_session():
        work = Path(tmp)
        pbmc = pbmc68k_counts(d / "pbmc68k_reduced.h5ad", work / "pbmc68k_counts.h5ad")
        rows.append(run_dataset("pbmc68k", [pbmc], "bulk_labels", work, 150 if args.quick else 400, 64, workers, 128))
        if not args.quick and (d / "kang_ctrl.h5ad").exists():
            kang = [d / "kang_ctrl.h5ad", d / "kang_stim.h5ad"]
            rows.append(run_dataset("kang", kang, "dataset", work, 300, 256, workers, 128))
    summary = {r["dataset"]: {k: r[k] for k in ("vae_knn", "pca50_knn", "ratio_vs_pca")} for r in rows}
    print(
        json.dumps({"k": K, "workers": workers, **{f"{ds}_{k}": v for ds, m in summary.items() for k, v in m.items()}})
    )


if __name__ == "__main__":
    main()
