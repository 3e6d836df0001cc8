"""Embedding quality of every model: kNN label accuracy vs PCA-50 of log-normalized data and vs the VAE.

    python bench/quality.py [--quick] [--models vae,transformer-binned,transformer-rank,probe]
                            [--datasets pbmc68k,kang] [--workers 0] [--threads 1] [--steps-scale 1.0]

Datasets (real, from ../shared/data/fetch_real.sh; found in $CELLRAY_DATA, ~/.cache/cellray-data or /tmp/cellray-data):
- pbmc68k_reduced: 700 cells x 765 genes, 10 `bulk_labels`; counts rebuilt as round(expm1(raw.X) * n_counts / 1e4);
  500 highly variable genes;
- Kang 2018 PBMC ctrl + stim: 13,999 cells x 14,053 genes, label = condition (the `dataset` column; the files
  carry no cell types); 2,000 highly variable genes.
Each dataset is ingested into a store and summarised (`cellray stats --hvg N`); every model is pretrained with
`engine.train.pretrain` (the real loop: the Loader and its transforms, AdamW with warm-up + cosine; `--workers 0`
runs it in this process, N > 0 on Ray Train with N DDP workers), embedded with `engine.infer.embed.embed`, and
scored by 5-fold kNN (k=15) label accuracy. The peer: scanpy normalize_total(1e4) + log1p + PCA(50) on the same
cells (all genes), same kNN. Held-out reconstruction: each model's loss terms averaged over the validation split
(10% of cells, never trained on): VAE NLL per cell; transformer masked-token loss / accuracy and the cell-level
reconstruction (mvc MSE, per-cell Pearson r); probe accuracy.

Models (specs in MODELS below; every config a `small()` preset):
- vae: raw counts;
- transformer-binned (scGPT): normalize_total + log1p + HVG + 51 value bins; masked-bin cross-entropy + mvc;
- transformer-rank (Geneformer): normalize_total + HVG + rank tokens (x / gene median); masked-gene cross-entropy + mvc;
- probe: a supervised classifier of the label on log1p counts (a ceiling, not a peer: it is trained on the labels).
Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

K = 15
FOLDS = 5
VAL_FRACTION = 0.1
NORM_LOG = [{"normalize_total": {"target_sum": 1e4}}, "log1p"]

# dataset -> label, HVG count, the VAE's cells per batch
DATASETS = {
    "pbmc68k": {"label": "bulk_labels", "hvg": 500, "vae_batch": 64},
    "kang": {"label": "dataset", "hvg": 2000, "vae_batch": 256},
}


def model_specs(ds: dict, label: str) -> dict[str, dict]:
    """name -> {model, config, transforms, lr, steps, batch}: the runs behind the README's figures."""
    from models.probe import ProbeConfig
    from models.transformer import TransformerConfig
    from models.vae import VAEConfig

    return {
        "vae": {
            "model": "vae",
            "config": VAEConfig.small(),
            "transforms": [],
            "lr": 3e-3,
            "steps": 400,
            "batch": ds["vae_batch"],
        },
        "transformer-binned": {
            "model": "transformer",
            "config": TransformerConfig.small(),
            "transforms": NORM_LOG + [{"select_genes": "hvg"}, {"binning": {"n_bins": 51}}],
            "lr": 3e-3,
            "steps": 300,
            "batch": 64,
        },
        "transformer-rank": {
            "model": "transformer",
            "config": TransformerConfig.small(input="rank"),
            "transforms": [
                {"normalize_total": {"target_sum": 1e4}},
                {"select_genes": "hvg"},
                {"rank_tokens": {"max_len": 2048}},
            ],
            "lr": 3e-3,
            "steps": 300,
            "batch": 64,
        },
        "probe": {
            "model": "probe",
            "config": ProbeConfig.small(label_key=label),
            "transforms": [],
            "lr": 3e-3,
            "steps": 200,
            "batch": 64,
        },
    }


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


def prepare(name: str, inputs: list[Path], label: str, hvg: int, work: Path) -> Path:
    """Ingest the inputs into a store and compute its gene statistics with `hvg` highly variable genes."""
    from engine.preprocess.stats import StatsConfig, compute_stats
    from engine.store.ingest import IngestConfig, ingest

    store = work / f"{name}.store"
    obs_keys = () if label == "dataset" else (label,)
    ingest(inputs, store, IngestConfig(shard_cells=4000, obs_keys=obs_keys, overwrite=True))
    compute_stats(store, StatsConfig(hvg=hvg))
    return store


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
    return knn_accuracy(a.obsm["X_pca"], obs[label].to_numpy(), k=K, folds=FOLDS), seconds


def held_out(checkpoint: Path, store: Path, spec) -> dict[str, float]:
    """The model's loss terms averaged over the validation split (cells training never read)."""
    import torch

    from engine.loading.loader import Loader
    from engine.loading.sampler import SamplerConfig
    from engine.train.checkpoint import load_checkpoint

    model, _ = load_checkpoint(checkpoint)
    model.eval()
    sums: dict[str, float] = {}
    n = 0
    with (
        torch.no_grad(),
        torch.random.fork_rng(devices=[]),
        Loader(
            store,
            SamplerConfig(
                batch_size=256, split="val", val_fraction=spec.data.val_fraction, remainder="pad", shuffle=False
            ),
            transforms=spec.data.transforms or None,
            obs_keys=tuple(spec.data.obs_keys),
            mode="local",
        ) as loader,
    ):
        torch.manual_seed(0)
        for batch in loader:
            real = ~batch.pop("pad")
            batch = {
                k: v[real] if torch.is_tensor(v) and v.layout == torch.strided and len(v) == len(real) else v
                for k, v in batch.items()
            }
            if "X" in batch and batch["X"].layout != torch.strided:  # sparse X: keep the real rows
                batch["X"] = batch["X"].to_dense()[real]
            out = model.loss(batch, step=None)
            m = int(real.sum())
            for k, v in {"loss": float(out.loss), **out.terms}.items():
                sums[k] = sums.get(k, 0.0) + float(v) * m
            n += m
    return {k: round(v / max(1, n), 4) for k, v in sums.items() if k not in ("masked", "kl_weight")} | {"cells": n}


def run_model(name: str, run: dict, dataset: str, store: Path, label: str, work: Path, workers: int) -> dict:
    import anndata as ad

    from engine.infer.embed import OBSM_KEY, embed
    from engine.infer.evaluate import knn_accuracy
    from engine.train.driver import pretrain
    from jobs.spec import parse_spec

    steps = run["steps"]
    obs_keys = [label] if run["model"] == "probe" else []
    spec = parse_spec(
        {
            "kind": "pretrain",
            "name": f"{dataset}-{name}",
            "data": {
                "store": str(store),
                "batch_size": run["batch"],
                "transforms": run["transforms"],
                "obs_keys": obs_keys,
                "val_fraction": VAL_FRACTION,
            },
            "model": {"name": run["model"], "config": dataclasses.asdict(run["config"])},
            "train": {
                "max_steps": steps,
                "lr": run["lr"],
                "warmup_steps": max(1, steps // 10),
                "min_lr_ratio": 0.1,
                "checkpoint_every": steps,
                "report_every": max(1, steps // 10),
                "output": str(work / f"run-{dataset}-{name}"),
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
    out = work / f"{dataset}-{name}.h5ad"
    t0 = time.perf_counter()
    embed(result.output, store, out, overwrite=True)
    embed_s = time.perf_counter() - t0
    a = ad.read_h5ad(out)
    acc = knn_accuracy(a.obsm[OBSM_KEY], a.obs[label].to_numpy(), k=K, folds=FOLDS)
    h = result.history
    return {
        "knn": round(acc, 4),
        "dim": int(a.obsm[OBSM_KEY].shape[1]),
        "steps": steps,
        "batch": run["batch"],
        "train_s": round(train_s, 1),
        "embed_s": round(embed_s, 1),
        "cells_per_s": round(steps * run["batch"] / train_s, 1),
        "loss_first": round(h[0]["loss"], 4),
        "loss_last": round(h[-1]["loss"], 4),
        "held_out": held_out(result.checkpoint, store, spec),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="pbmc68k only, half the steps (a minute or two)")
    ap.add_argument("--models", default="vae,transformer-binned,transformer-rank,probe")
    ap.add_argument("--datasets", default="pbmc68k,kang")
    ap.add_argument("--workers", type=int, default=0, help="Ray Train DDP workers (0: the loop in this process)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the in-process loop (2 cores, shared)")
    ap.add_argument("--steps-scale", type=float, default=1.0, help="multiply every run's optimizer steps")
    args = ap.parse_args()
    import logging
    import warnings

    import torch

    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    from engine.runtime import ray_session

    d = data_dir()
    if d is None:
        print("no real data found: run ../shared/data/fetch_real.sh first")
        print(json.dumps({"skipped": "no real data"}))
        return
    datasets = ["pbmc68k"] if args.quick else args.datasets.split(",")
    wanted = args.models.split(",")
    scale = args.steps_scale * (0.5 if args.quick else 1.0)
    summary: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="cellray-quality-") as tmp, ray_session():
        work = Path(tmp)
        for dataset in datasets:
            ds = DATASETS[dataset]
            label = ds["label"]
            if dataset == "pbmc68k":
                inputs = [pbmc68k_counts(d / "pbmc68k_reduced.h5ad", work / "pbmc68k_counts.h5ad")]
            else:
                inputs = [d / "kang_ctrl.h5ad", d / "kang_stim.h5ad"]
                if not inputs[0].exists():
                    continue
            store = prepare(dataset, inputs, label, ds["hvg"], work)
            pca, pca_s = pca_knn(store, label)
            print(f"{dataset}: {label}, PCA-50 kNN@{K} ({FOLDS}-fold) {pca:.3f} ({pca_s:.1f} s)", flush=True)
            rows: dict[str, dict] = {"pca50": {"knn": round(pca, 4), "seconds": round(pca_s, 2)}}
            for name, run in model_specs(ds, label).items():
                if name not in wanted:
                    continue
                run = dict(run, steps=max(10, int(run["steps"] * scale)))
                row = run_model(name, run, dataset, store, label, work, args.workers)
                row["vs_pca"] = round(row["knn"] / pca, 3)
                if "vae" in rows:
                    row["vs_vae"] = round(row["knn"] / rows["vae"]["knn"], 3)
                rows[name] = row
                print(
                    f"  {name:20s} kNN {row['knn']:.3f}  x{row['vs_pca']:.2f} PCA"
                    + (f"  x{row['vs_vae']:.2f} VAE" if "vs_vae" in row else "")
                    + f"  ({row['steps']} steps x {row['batch']} cells, train {row['train_s']:.0f} s,"
                    + f" embed {row['embed_s']:.0f} s)"
                    + f"  held-out {row['held_out']}",
                    flush=True,
                )
            summary[dataset] = rows
    print(json.dumps({"k": K, "folds": FOLDS, "workers": args.workers, "threads": args.threads, "datasets": summary}))


if __name__ == "__main__":
    main()
