"""Embedding quality of every model: scIB metrics and kNN label transfer, each also as a ratio to HVG-PCA-50 of
the same cells from the same run.

    python bench/quality.py [--quick] [--models vae,transformer-binned,transformer-rank,probe]
                            [--datasets liu,zeisel,cbmc,worm] [--workers 0] [--threads 1] [--steps-scale 1.0]
                            [--min-passes 2] [--seeds 0] [--eval-cells 10000]

Datasets (real, raw counts; found in $CELLRAY_DATA, ~/.cache/cellray-data or /tmp/cellray-data):
- from bench/fetch_labelled.sh (label `cell_type`, batch `batch`): liu (Liu 2021 COVID PBMC, 30,534 cells x 1,000
  genes, 17 types, 3 batches), zeisel (mouse cortex, 3,005 x 4,000, 7 types), cbmc (cord blood CITE-seq RNA, 8,617
  x 500, 13 types), worm (C. elegans neurons, 4,186 x 13,488, 10 types); baron_human / baron_mouse (~2,000 cells)
  are fetched too but are under 3,000 cells;
- from ../shared/data/fetch_real.sh: pbmc68k (700 cells x 765 genes, 10 `bulk_labels`; counts rebuilt as
  round(expm1(raw.X) * n_counts / 1e4)) and kang (13,999 cells, label = condition: every model scores ~0.99).
Each dataset is ingested into a store and summarised (`cellray stats --hvg N`); every model is pretrained with
`engine.train.pretrain` (the real loop: the Loader and its transforms, AdamW with warm-up + cosine; `--workers 0`
runs it in this process, N > 0 on Ray Train with N DDP workers) for its preset's steps or two passes over the
training cells, whichever is more (`--min-passes`; liu's transformers: 858 steps, not 300), embedded with
`engine.infer.embed.embed`, and scored by `engine.infer.evaluate.evaluate_embedding` (what `cellray evaluate` runs):
scib-metrics' Benchmarker (bio conservation; batch correction where the dataset has batches) and 5-fold kNN (k=15)
label accuracy, on up to --eval-cells cells, beside HVG-PCA-50 (normalize_total 1e4, log1p, 2,000 HVG, PCA 50) of
the same cells computed in the same call. Held-out reconstruction: each model's loss terms averaged over the
validation split (10% of cells, never trained on). Cost: training seconds per 1,000 cells seen and embedding seconds
per 1,000 cells (1 torch thread in-process unless --threads), and the baseline's seconds per 1,000 cells.
--seeds 0,1,2 trains each model once per seed (train.seed and data.seed: its start, masks, sampling and block
order) on the same scored cells and baseline, prints each run, and reports the median of each figure.

Models (specs in model_specs below; every config a `small()` preset):
- vae: raw counts of the store's HVGs, the batch column as covariate of the decoder;
- transformer-binned (scGPT-like): normalize_total + log1p + HVG + 51 value bins, a cell's 128 highest bins in
  context, each token with its value x its gene's vector; masked-bin cross-entropy + mvc;
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

VAL_FRACTION = 0.1
# Every run gets its preset's steps or this many passes over the training cells, whichever is more: a model that
# saw a large dataset's cells less than once is under-trained, not compared (liu: 300 steps of 64 are 0.7 passes).
# --min-passes 0 gives the presets' steps alone (the protocol of the README's figures before 2026-12-04's last).
MIN_PASSES = 2
NORM_LOG = [{"normalize_total": {"target_sum": 1e4}}, "log1p"]

# dataset -> input files, label and batch obs columns, HVG count of the store's stats, the VAE's cells per batch
DATASETS = {
    "liu": {"files": ["liu_covid_pbmc.h5ad"], "label": "cell_type", "batch": "batch", "hvg": 1000, "vae_batch": 256},
    "zeisel": {"files": ["zeisel.h5ad"], "label": "cell_type", "batch": "batch", "hvg": 2000, "vae_batch": 128},
    "cbmc": {"files": ["cbmc_citeseq.h5ad"], "label": "cell_type", "batch": "batch", "hvg": 500, "vae_batch": 256},
    # worm: seurat_v3's loess fit of 13,488 sparse genes is singular (as in scanpy): seurat flavor, log-normalized
    "worm": {"files": ["worm_neurons.h5ad"], "label": "cell_type", "batch": "batch", "hvg": 2000, "vae_batch": 128,
             "flavor": "seurat"},
    "pbmc68k": {"files": ["pbmc68k_reduced.h5ad"], "label": "bulk_labels", "batch": None, "hvg": 500, "vae_batch": 64},
    "kang": {"files": ["kang_ctrl.h5ad", "kang_stim.h5ad"], "label": "dataset", "batch": None, "hvg": 2000,
             "vae_batch": 256},
}  # fmt: skip


def model_specs(ds: dict, label: str) -> dict[str, dict]:
    """name -> {model, config, transforms, lr, steps, batch}: the runs behind the README's figures."""
    from models.probe import ProbeConfig
    from models.transformer import TransformerConfig
    from models.vae import VAEConfig

    specs = {
        "vae": {
            "model": "vae",
            # the batch as covariate of the decoder, as scVI users run it (a constant where there is one batch)
            "config": VAEConfig.small(batch_key=ds["batch"]),
            "transforms": [{"select_genes": "hvg"}],  # raw counts of the store's HVGs, as scVI's tutorials run it
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
            "lr": 1.5e-3,  # 3e-3 before gene_init: pca (transformer-rank-lr3)
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

    # The VAE ablations below start from the preset before 2026-12-05 (10 latent, 128 hidden, KL weight 1), as
    # the README's commands for them ran; the batch-covariate runs of 2026-12-05 chose today's preset.
    def former(**kw) -> VAEConfig:
        return VAEConfig.small(**{"n_latent": 10, "n_hidden": 128, "max_kl_weight": 1.0, **kw})

    vae = dict(specs["vae"], config=former())
    specs["vae-former"] = vae
    specs["vae-nobatch"] = dict(specs["vae"], config=VAEConfig.small())  # today's preset without the covariate
    # the VAE as scVI users run it on data with batches: the batch as covariate of the decoder (scVI's default)
    specs["vae-batch"] = dict(vae, config=former(batch_key=ds["batch"]))
    specs["vae-30"] = dict(vae, config=former(n_latent=30))  # a wider latent, with and without
    # the batch in the encoder too (scVI's encode_covariates=True; cellray's only mode before 2026-12-04)
    specs["vae-batch-encoded"] = dict(vae, config=former(batch_key=ds["batch"], encode_batch=True))
    specs["vae-batch-30"] = dict(vae, config=former(batch_key=ds["batch"], n_latent=30))
    # scVI's other defaults, one at a time: the KL weight warmed up over the whole run (scVI: 400 epochs, its
    # whole run), a zero-inflated likelihood, Adam's 1e-3, a wider hidden layer. Run on liu, whose 1,000 genes are
    # its HVGs (the same counts with or without select_genes); vae-h256 on all four, on every gene as then
    specs["vae-klrun"] = dict(vae, config=former(kl_warmup_steps=vae["steps"]))
    specs["vae-zinb"] = dict(vae, config=former(likelihood="zinb"))
    specs["vae-lr1"] = dict(vae, lr=1e-3)
    specs["vae-h256"] = dict(vae, transforms=[], config=former(n_hidden=256))
    specs["vae-3x"] = dict(vae, steps=3 * vae["steps"])
    specs["vae-lr1-3x"] = dict(vae, lr=1e-3, steps=3 * vae["steps"])
    specs["vae-klrun-3x"] = dict(vae, steps=3 * vae["steps"], config=former(kl_warmup_steps=3 * vae["steps"]))
    specs["vae-batchnorm"] = dict(vae, config=former(norm="batch"))  # scVI's norm (cellray's: layer)
    specs["vae-2layers"] = dict(vae, config=former(n_layers=2))
    specs["vae-nodropout"] = dict(vae, config=former(dropout=0.0))
    specs["vae-latent16"] = dict(vae, config=former(n_latent=16))
    specs["vae-b128"] = dict(vae, batch=128, steps=2 * vae["steps"])  # scVI's 128 cells a step, the same cells
    specs["vae-b128-3x"] = dict(vae, batch=128, steps=6 * vae["steps"])
    # every gene of the store (the preset before 2026-12-04's night; zeisel and worm have more genes than HVGs);
    # 10x the steps (scVI's default for 30,000 cells is 261 epochs); the encoder on log-normalized counts
    specs["vae-allgenes"] = dict(vae, transforms=[])
    specs["vae-10x"] = dict(vae, steps=10 * vae["steps"])
    specs["vae-normin"] = dict(vae, config=former(encode_normalized=True))
    specs["vae-h256-10x"] = dict(vae, steps=10 * vae["steps"], config=former(n_hidden=256))
    # scVI's optimizer around the VAE: no gradient clipping (the loop clips at norm 1.0), and no weight decay (scVI:
    # 1e-6; the loop's AdamW: 0.01 on matrices)
    specs["vae-noclip"] = dict(vae, grad_clip=0.0)
    specs["vae-noclip-wd0"] = dict(vae, grad_clip=0.0, weight_decay=0.0)
    # the KL term's weight after warm-up (scVI's max_kl_weight): a freer latent, or one nearer the prior
    specs["vae-kl05"] = dict(vae, config=former(max_kl_weight=0.5))
    specs["vae-kl2"] = dict(vae, config=former(max_kl_weight=2.0))
    specs["vae-kl025"] = dict(vae, config=former(max_kl_weight=0.25))
    specs["vae-kl01"] = dict(vae, config=former(max_kl_weight=0.1))
    specs["vae-h256-kl025"] = dict(vae, config=former(n_hidden=256, max_kl_weight=0.25))
    # the batch covariate (scIB's batch mixing) with a lighter KL term or a wider layer (liu's labels kept);
    # with all three and 16 latent dimensions it is today's preset, `vae`
    batch = ds["batch"]
    specs["vae-batch-kl05"] = dict(vae, config=former(batch_key=batch, max_kl_weight=0.5))
    specs["vae-batch-kl025"] = dict(vae, config=former(batch_key=batch, max_kl_weight=0.25))
    specs["vae-batch-h256"] = dict(vae, config=former(batch_key=batch, n_hidden=256))
    specs["vae-batch-h256-kl025"] = dict(vae, config=former(batch_key=batch, n_hidden=256, max_kl_weight=0.25))
    specs["vae-batch-h256-kl01"] = dict(vae, config=former(batch_key=batch, n_hidden=256, max_kl_weight=0.1))
    specs["vae-batch-h512-kl025"] = dict(vae, config=former(batch_key=batch, n_hidden=512, max_kl_weight=0.25))
    specs["vae-batch-h256-kl025-2x"] = dict(
        vae, steps=2 * vae["steps"], config=former(batch_key=batch, n_hidden=256, max_kl_weight=0.25)
    )
    # ablations toward a transformer that beats PCA (run only when named in --models): a longer context of
    # expressed genes (small() keeps 128 of a cell's expressed HVGs; PCA sees all of them), and 3x the steps
    binned = specs["transformer-binned"]
    specs["transformer-binned-ctx512"] = dict(binned, config=TransformerConfig.small(max_len=512))
    # binned input without the per-gene value vectors, and rank input with them (log1p(x / gene median))
    specs["transformer-binned-nogenevalues"] = dict(binned, config=TransformerConfig.small(gene_values=False))
    specs["transformer-rank-genevalues"] = dict(
        specs["transformer-rank"], config=TransformerConfig.small(input="rank", gene_values=True)
    )
    specs["transformer-binned-3x"] = dict(binned, steps=3 * binned["steps"])
    specs["transformer-binned-mvc50"] = dict(binned, config=TransformerConfig.small(mvc_weight=50.0))
    specs["transformer-binned-mvconly"] = dict(binned, config=TransformerConfig.small(mlm_weight=0.0))
    # 4x the cells per step at about the same attention cost per step (256 x 64^2 = 64 x 128^2 token pairs)
    specs["transformer-binned-b256"] = dict(binned, config=TransformerConfig.small(max_len=64), batch=256)
    # the context past a cell's expressed genes filled with unexpressed ones (scGPT's include_zero_gene)
    specs["transformer-binned-zeros"] = dict(binned, config=TransformerConfig.small(zero_genes=True))
    # the default before 2026-12-04: a random subset of a cell's expressed genes when it has more than max_len
    # (scGPT's), not its highest bins, and no per-gene value vectors
    specs["transformer-binned-random"] = dict(
        binned, config=TransformerConfig.small(context="random", gene_values=False)
    )
    specs["transformer-binned-cls"] = dict(binned, config=TransformerConfig.small(pooling="cls"))
    # trained on 128 expressed genes a step, embedded with up to 2,048 (every expressed HVG of nearly every cell)
    specs["transformer-binned-embedall"] = dict(binned, config=TransformerConfig.small(embed_max_len=2048))
    # the mvc target as the tokens hold it: bin / (n_bins - 1) (scGPT's) or log1p(x / gene median), not the
    # log-normalized expression
    specs["transformer-binned-tokentarget"] = dict(binned, config=TransformerConfig.small(mvc_target="token"))
    specs["transformer-rank-tokentarget"] = dict(
        specs["transformer-rank"], config=TransformerConfig.small(input="rank", mvc_target="token")
    )
    specs["transformer-rank-3x"] = dict(specs["transformer-rank"], steps=3 * specs["transformer-rank"]["steps"])
    rank = specs["transformer-rank"]
    # each batch's own per-gene offset in the mvc reconstruction (scGPT's batch-conditioned MVC decoder)
    specs["transformer-rank-batch"] = dict(rank, config=TransformerConfig.small(input="rank", batch_key=ds["batch"]))
    specs["transformer-binned-batch"] = dict(binned, config=TransformerConfig.small(batch_key=ds["batch"]))
    specs["transformer-rank-mvc30"] = dict(rank, config=TransformerConfig.small(input="rank", mvc_weight=30.0))
    specs["transformer-rank-mvconly"] = dict(rank, config=TransformerConfig.small(input="rank", mlm_weight=0.0))
    specs["transformer-rank-b128"] = dict(rank, batch=128)
    # liu, where the rank transformer is furthest from PCA: twice the learning rate, more steps, a shorter context
    # for more steps at the same cost
    specs["transformer-rank-lr6"] = dict(rank, lr=6e-3)
    specs["transformer-rank-2x"] = dict(rank, steps=2 * rank["steps"])
    specs["transformer-rank-6x"] = dict(rank, steps=6 * rank["steps"])
    specs["transformer-rank-ctx64-6x"] = dict(
        rank, steps=6 * rank["steps"], config=TransformerConfig.small(input="rank", max_len=64)
    )
    # the top 256 ranks, not 128 (liu's cells express a median of 344 of its 1,000 genes)
    specs["transformer-rank-ctx256"] = dict(rank, config=TransformerConfig.small(input="rank", max_len=256))
    # without gradient clipping (the loop's default clips the norm at 1.0, which these models' gradients exceed)
    specs["transformer-rank-noclip"] = dict(rank, grad_clip=0.0)
    specs["transformer-binned-noclip"] = dict(binned, grad_clip=0.0)
    # the gene embeddings' random start (GPT-2's), the default before 2026-12-04's start from the data's principal
    # axes (gene_init: pca)
    specs["transformer-binned-randominit"] = dict(binned, config=TransformerConfig.small(gene_init="random"))
    specs["transformer-rank-randominit"] = dict(
        rank, config=TransformerConfig.small(input="rank", gene_init="random"), lr=3e-3
    )
    specs["transformer-rank-lr3"] = dict(rank, lr=3e-3)  # the start from the data at the earlier learning rate
    specs["transformer-binned-lr15"] = dict(binned, lr=1.5e-3)  # the rank preset's learning rate, on binned input
    # dropout 0.1 on attention and residual branches (small() has none; scGPT trains with 0.2)
    specs["transformer-binned-drop10"] = dict(binned, config=TransformerConfig.small(dropout=0.1))
    return specs


def data_dir() -> Path | None:
    for d in (os.environ.get("CELLRAY_DATA"), Path.home() / ".cache/cellray-data", "/tmp/cellray-data"):
        if d and any((Path(d) / ds["files"][0]).exists() for ds in DATASETS.values()):
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


def prepare(name: str, inputs: list[Path], keys: list[str], hvg: int, work: Path, flavor: str = "seurat_v3") -> Path:
    """Ingest the inputs (obs columns `keys`) into a store and compute its gene statistics with `hvg` highly
    variable genes."""
    from engine.preprocess.stats import StatsConfig, compute_stats
    from engine.store.ingest import IngestConfig, ingest

    store = work / f"{name}.store"
    obs_keys = tuple(k for k in keys if k != "dataset")  # `dataset` (the input file) is always kept
    ingest(inputs, store, IngestConfig(shard_cells=4000, obs_keys=obs_keys, overwrite=True))
    compute_stats(store, StatsConfig(hvg=hvg, flavor=flavor))
    return store


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


def run_model(
    name: str, run: dict, dataset: str, store: Path, evaluation, work: Path, workers: int, seed: int = 0
) -> dict:
    """Pretrain, embed and evaluate one model: its row (and the run's HVG-PCA-50 scores, under "baseline")."""
    from engine.infer.embed import embed
    from engine.infer.evaluate import BASELINE, MODEL, evaluate_embedding
    from engine.train.driver import pretrain
    from jobs.spec import parse_spec

    steps = run["steps"]
    obs_keys = list(run["config"].obs_keys())  # the probe's label, the VAE's batch covariate
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
                "seed": seed,  # the sampler's block order and shuffles
            },
            "model": {"name": run["model"], "config": dataclasses.asdict(run["config"])},
            "train": {
                "max_steps": steps,
                "lr": run["lr"],
                "warmup_steps": max(1, steps // 10),
                "min_lr_ratio": 0.1,
                "checkpoint_every": steps,
                "report_every": max(1, steps // 10),
                "seed": seed,  # the model's start, masks and sampling
                "output": str(work / f"run-{dataset}-{name}-{seed}"),
                # else the loop's defaults
                **{k: run[k] for k in ("grad_clip", "weight_decay") if k in run},
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
    out = work / f"{dataset}-{name}.zarr"
    t0 = time.perf_counter()
    res = embed(result.output, store, out, overwrite=True)
    embed_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    report = evaluate_embedding(out, evaluation, store=str(store))
    eval_s = time.perf_counter() - t0
    h = result.history
    return {
        **scores(report, MODEL),
        "dim": res.dim,
        "steps": steps,
        "batch": run["batch"],
        "train_s": round(train_s, 1),
        "embed_s": round(embed_s, 1),
        "eval_s": round(eval_s, 1),  # evaluate_embedding: the baseline and both embeddings' scIB and kNN
        "cells_per_s": round(steps * run["batch"] / train_s, 1),
        "train_s_per_1k_cells": round(train_s / (steps * run["batch"]) * 1000, 2),
        "embed_s_per_1k_cells": round(embed_s / res.n_cells * 1000, 3),
        "loss_first": round(h[0]["loss"], 4),
        "loss_last": round(h[-1]["loss"], 4),
        "held_out": held_out(result.checkpoint, store, spec),
        "baseline": {**scores(report, BASELINE), "seconds": report["seconds"]["baseline"], "cells": report["cells"]},
        "batch_correction": report["batch_correction"],
    }


HEADLINE = {
    "scib_bio": "Bio conservation",
    "scib_batch": "Batch correction",
    "scib_total": "Total",
    "knn": "kNN accuracy",
}


def scores(report: dict, which: str) -> dict:
    """The headline figures of one embedding of an evaluate_embedding report: scIB bio / batch / total (None where
    absent: no batches) and kNN accuracy."""
    s = report["scores"][which]
    out = {k: (round(s[m], 4) if m in s else None) for k, m in HEADLINE.items()}
    # scIB's total where there are batches, else its bio conservation (as `cellray evaluate`'s headline)
    return {**out, "scib": out["scib_total"] if out["scib_total"] is not None else out["scib_bio"]}


def ratios(row: dict, pca: dict) -> dict:
    keys = [*HEADLINE, "scib"]
    return {f"{k}_vs_pca": round(row[k] / pca[k], 3) if row[k] is not None and pca[k] else None for k in keys}


def median_row(seeded: list[dict], seeds: list[int]) -> dict:
    """One model's row over several seeds: each headline figure, ratio and cost the median of the seeds' (each seed's
    kept under "seeds")."""
    import statistics

    figures = [*HEADLINE, "scib"]
    figures += [f"{k}_vs_pca" for k in figures]
    figures += ["train_s", "embed_s", "train_s_per_1k_cells", "embed_s_per_1k_cells"]
    median = {k: statistics.median(r[k] for r in seeded) if seeded[0][k] is not None else None for k in figures}
    return {**seeded[0], **median, "seeds": {s: {k: r[k] for k in figures} for s, r in zip(seeds, seeded)}}


def print_row(name: str, row: dict) -> None:
    print(
        f"  {name:20s} bio {_fmt(row['scib_bio'])} {_fmt(row['scib_bio_vs_pca'], True)}  batch "
        f"{_fmt(row['scib_batch'])} {_fmt(row['scib_batch_vs_pca'], True)}  total "
        f"{_fmt(row['scib_total'])} {_fmt(row['scib_total_vs_pca'], True)}  scib "
        f"{_fmt(row['scib'])} {_fmt(row['scib_vs_pca'], True)}"
        f"  kNN {_fmt(row['knn'])} {_fmt(row['knn_vs_pca'], True)}  ({row['steps']} steps x "
        f"{row['batch']} cells, train {row['train_s']:.0f} s, embed {row['embed_s']:.0f} s)  "
        f"held-out {row['held_out']}",
        flush=True,
    )


def _fmt(v: float | None, x: bool = False) -> str:
    return "   -  " if v is None else (f"{v:.2f}x" if x else f"{v:.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="zeisel only, half the steps (a few minutes)")
    ap.add_argument("--models", default="vae,transformer-binned,transformer-rank")
    ap.add_argument("--datasets", default="liu,zeisel,cbmc,worm")
    ap.add_argument("--workers", type=int, default=0, help="Ray Train DDP workers (0: the loop in this process)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the in-process loop (2 cores, shared)")
    ap.add_argument("--steps-scale", type=float, default=1.0, help="multiply every run's optimizer steps")
    ap.add_argument("--min-passes", type=int, default=MIN_PASSES, help="passes over the training cells, at least")
    ap.add_argument("--seeds", default="0", help="training seeds, comma-separated: each row the median of theirs")
    ap.add_argument("--eval-cells", type=int, default=10_000, help="cells scored per dataset (a random sample)")
    args = ap.parse_args()
    import logging
    import warnings

    import torch

    from engine.infer.config import EvalConfig
    from engine.loading.sampler import Sampler, SamplerConfig
    from engine.store.format import Store

    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    from engine.runtime import ray_session

    d = data_dir()
    if d is None:
        print("no real data found: run bench/fetch_labelled.sh (and ../shared/data/fetch_real.sh) first")
        print(json.dumps({"skipped": "no real data"}))
        return
    datasets = ["zeisel"] if args.quick else args.datasets.split(",")
    wanted = args.models.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    scale = args.steps_scale * (0.5 if args.quick else 1.0)
    summary: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="cellray-quality-") as tmp, ray_session():
        work = Path(tmp)
        for dataset in datasets:
            ds = DATASETS[dataset]
            inputs = [d / f for f in ds["files"]]
            if not all(p.exists() for p in inputs):
                print(f"{dataset}: {inputs} not found, skipped", flush=True)
                continue
            if dataset == "pbmc68k":
                inputs = [pbmc68k_counts(inputs[0], work / "pbmc68k_counts.h5ad")]
            label, batch = ds["label"], ds["batch"]
            keys = [k for k in (label, batch) if k]
            store = prepare(dataset, inputs, keys, ds["hvg"], work, ds.get("flavor", "seurat_v3"))
            split = SamplerConfig(batch_size=1, split="train", val_fraction=VAL_FRACTION)
            n_train = Sampler.for_store(Store.open(store), split).n_split_cells  # the cells pretraining reads
            evaluation = EvalConfig(label_key=label, batch_key=batch, max_cells=args.eval_cells)
            rows: dict[str, dict] = {}
            for name, run in model_specs(ds, label).items():
                if name not in wanted:
                    continue
                steps = max(run["steps"], -(-args.min_passes * n_train // run["batch"]))
                run = dict(run, steps=max(10, int(steps * scale)))
                seeded = []
                for seed in seeds:
                    row = run_model(name, run, dataset, store, evaluation, work, args.workers, seed)
                    pca = row.pop("baseline")  # the same cells and baseline whatever the seed
                    if "pca50" not in rows:
                        rows["pca50"] = {**pca, "s_per_1k_cells": round(pca["seconds"] / pca["cells"] * 1000, 3)}
                        print(f"{dataset}: {label}, {pca['cells']} cells scored ({row['batch_correction']})")
                        print(f"  {'pca50':20s} bio {_fmt(pca['scib_bio'])}  batch {_fmt(pca['scib_batch'])}  total "
                              f"{_fmt(pca['scib_total'])}  scib {_fmt(pca['scib'])}  kNN {_fmt(pca['knn'])}",
                              flush=True)  # fmt: skip
                    row.update(ratios(row, rows["pca50"]))
                    seeded.append(row)
                    print_row(name if len(seeds) == 1 else f"{name} seed {seed}", row)
                rows[name] = seeded[0] if len(seeds) == 1 else median_row(seeded, seeds)
                if len(seeds) > 1:
                    print_row(f"{name} median", rows[name])
            summary[dataset] = rows
    print(json.dumps({"k": 15, "folds": 5, "workers": args.workers, "threads": args.threads, "datasets": summary}))


if __name__ == "__main__":
    main()
