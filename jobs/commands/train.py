"""`cellray run SPEC.yaml` (pretraining on Ray Train, or inference) and `cellray embed` (embeddings of every cell)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run", help="run a job spec (pretrain, embed, stats, ingest, sleep) on the local Ray or on --address"
    )
    p.add_argument("spec", type=Path, help="a YAML job spec, e.g. jobs/pretrain_vae.yaml")
    p.add_argument("--address", default=None, help="Ray cluster address (default: an embedded local Ray)")
    p.add_argument("--check", action="store_true", help="validate the spec (and its store) and exit")
    p.add_argument("--json", action="store_true", help="print the final summary as JSON")
    p.set_defaults(func=run_job)

    p = sub.add_parser("embed", help="embed every cell of a store with a checkpoint into an AnnData (resumable)")
    p.add_argument(
        "--checkpoint", required=True, type=Path, help="a checkpoint dir, or a run's train.output folder (latest)"
    )
    p.add_argument("--store", required=True, type=Path)
    p.add_argument(
        "--out",
        required=True,
        type=Path,
        help="output AnnData: OUT.zarr (written in parts, resumable) or OUT.h5ad (assembled from the parts)",
    )
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--workers", type=int, default=0, help="inference actors (default: as many as fit, at most 8)")
    p.add_argument("--cpus-per-worker", type=float, default=1.0)
    p.add_argument("--gpus-per-worker", type=float, default=0.0, help="> 0: one actor per GPU share (model on GPU)")
    p.add_argument("--part-cells", type=int, default=None, help="cells per output part (default: one store shard)")
    p.add_argument(
        "--min-gene-overlap",
        type=float,
        default=0.5,
        help="refuse a store holding fewer of the checkpoint's genes than this fraction",
    )
    p.add_argument(
        "--executor",
        choices=["auto", "ray", "local"],
        default="auto",
        help="ray: an actor pool; local: this process; auto: local for small stores unless --workers/--gpus",
    )
    p.add_argument("--label-key", default=None, help="obs column: print the kNN label accuracy of the embeddings")
    p.add_argument("--overwrite", action="store_true", help="start over, replacing OUT and any unfinished run")
    p.add_argument("--address", default=None, help="Ray cluster address (default: an embedded local Ray)")
    p.set_defaults(func=run_embed)


def run_job(args: argparse.Namespace) -> int:
    from jobs.progress import progress_bar
    from jobs.spec import load_spec

    spec = load_spec(args.spec, check_data=True)  # the store, obs keys and transforms too
    if spec.kind == "embed" and not args.check:
        return _embed(spec, args.address, None, args.json)  # what `cellray embed` runs, with its summary
    if spec.kind != "pretrain":
        return run_other_kind(spec, args)
    from engine.train.driver import pretrain

    if args.check:
        print(f"{args.spec}: ok ({spec.model.name}, {spec.resources.workers} workers, {spec.train.max_steps} steps)")
        return 0
    from jobs.scheduler.metrics import train_reporter

    with progress_bar() as progress:
        result = pretrain(spec, address=args.address, progress=progress, on_report=train_reporter(spec.name))
    h = result.history
    summary = {
        "job": spec.name,
        "output": str(result.output),
        "checkpoint": str(result.checkpoint) if result.checkpoint else None,
        "steps": h[-1]["step"] if h else 0,
        "loss_first": h[0]["loss"] if h else None,
        "loss_last": h[-1]["loss"] if h else None,
        "val_loss": next((m["val_loss"] for m in reversed(h) if "val_loss" in m), None),
        "cells_per_s": sorted(m["cells_per_s"] for m in h)[len(h) // 2] if h else None,  # median over reports
        "data_wait_frac": sorted(m["data_wait_frac"] for m in h)[len(h) // 2] if h else None,
        "loss_curve": str(result.output / "loss.png") if (result.output / "loss.png").exists() else None,
    }
    if args.json:
        print(json.dumps(summary))
    else:
        print(
            f"{spec.name}: {summary['steps']} steps, loss {_fmt(summary['loss_first'])} -> {_fmt(summary['loss_last'])}"
            + (f" (validation {_fmt(summary['val_loss'])})" if summary["val_loss"] is not None else "")
            + f", {_fmt(summary['cells_per_s'], '.0f')} cells/s, "
            + f"data wait {_fmt(100 * (summary['data_wait_frac'] or 0), '.0f')}%"
        )
        print(f"checkpoint: {summary['checkpoint']}")
        if summary["loss_curve"]:
            print(f"loss curve: {summary['loss_curve']}")
    return 0


def run_other_kind(spec, args: argparse.Namespace) -> int:
    """`cellray run` of an embed, stats, ingest or sleep spec (jobs/kinds.py): what a scheduled job runs."""
    from jobs.kinds import run_kind
    from jobs.progress import progress_bar

    if args.check:
        print(f"{args.spec}: ok ({spec.kind} job {spec.name!r})")
        return 0
    with progress_bar() as progress:
        summary = run_kind(spec, address=args.address, progress=progress)
    print(json.dumps(summary) if args.json else "  ".join(f"{k} {v}" for k, v in summary.items()))
    return 0


def run_embed(args: argparse.Namespace) -> int:
    from engine.infer.config import EmbedConfig

    config = EmbedConfig(
        checkpoint=str(args.checkpoint),
        store=str(args.store),
        out=str(args.out),
        batch_size=args.batch_size,
        part_cells=args.part_cells,
        min_gene_overlap=args.min_gene_overlap,
        overwrite=args.overwrite,
        executor=args.executor,
        resources={
            "workers": args.workers,
            "cpus_per_worker": args.cpus_per_worker,
            "gpus_per_worker": args.gpus_per_worker,
        },
        source="cellray embed",
    )
    return _embed(config, args.address, args.label_key)


def _embed(config, address: str | None, label_key: str | None, as_json: bool = False) -> int:
    """Run an EmbedConfig (from flags or a `kind: embed` spec) and print where the output is."""
    from engine.infer.embed import OBSM_KEY, run_embed
    from engine.infer.evaluate import embedding_sample, knn_accuracy
    from jobs.progress import progress_bar

    with progress_bar() as progress:
        res = run_embed(config, address=address, progress=progress)
    if as_json:
        print(
            json.dumps(
                {
                    "out": str(res.out),
                    "cells": res.n_cells,
                    "dims": res.dim,
                    "step": res.step,
                    "parts": res.parts,
                    "parts_run": res.parts_run,
                    "cells_per_s": res.cells_per_s,
                    "predicts": res.predicts,
                }
            )
        )
        return 0
    pred = f", predictions of {res.predicts!r} in obs['cellray_pred']" if res.predicts else ""
    print(
        f"{res.out}: {res.n_cells} cells x {res.dim} dims in obsm['{OBSM_KEY}']{pred} (checkpoint step {res.step}; "
        f"{res.parts_run} of {res.parts} parts this run, {res.cells_per_s:.0f} cells/s, {res.seconds:.0f} s in all)"
    )
    if label_key:
        emb, labels = embedding_sample(res.out, label_key)
        acc = knn_accuracy(emb, labels, k=15)
        import pandas as pd

        n_labels = len(set(labels[pd.notna(labels)]))
        print(f"kNN (k=15) accuracy of {label_key!r} ({n_labels} labels) on the embeddings: {acc:.3f}")
    return 0


def _fmt(v, f: str = ".4g") -> str:
    return "n/a" if v is None else format(v, f)
