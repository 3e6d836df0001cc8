"""`cellray run SPEC.yaml` (pretraining on Ray Train) and `cellray embed` (embeddings of every cell)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run a job spec (pretrain, embed, stats, ingest, sleep) on the local Ray or on --address")
    p.add_argument("spec", type=Path, help="a YAML job spec, e.g. jobs/pretrain_vae.yaml")
    p.add_argument("--address", default=None, help="Ray cluster address (default: an embedded local Ray)")
    p.add_argument("--check", action="store_true", help="validate the spec (and its store) and exit")
    p.add_argument("--json", action="store_true", help="print the final summary as JSON")
    p.set_defaults(func=run_job)

    p = sub.add_parser("embed", help="embed every cell of a store with a trained checkpoint; write an AnnData")
    p.add_argument("--checkpoint", required=True, type=Path, help="a checkpoint dir, or a run's train.output folder (latest)")
    p.add_argument("--store", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path, help="output .h5ad or .zarr")
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--label-key", default=None, help="obs column: print the kNN label accuracy of the embeddings")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--address", default=None, help="Ray cluster address (default: an embedded local Ray)")
    p.set_defaults(func=run_embed)


def run_job(args: argparse.Namespace) -> int:
    from jobs.progress import progress_bar
    from jobs.spec import load_spec

    spec = load_spec(args.spec, check_data=True)  # the store, obs keys and transforms too
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
            + f", {_fmt(summary['cells_per_s'], '.0f')} cells/s, data wait {_fmt(100 * (summary['data_wait_frac'] or 0), '.0f')}%"
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
    from engine.infer.embed import OBSM_KEY, embed
    from engine.infer.evaluate import knn_accuracy
    from jobs.progress import progress_bar

    with progress_bar() as progress:
        res = embed(
            args.checkpoint, args.store, args.out, address=args.address, batch_size=args.batch_size,
            overwrite=args.overwrite, progress=progress,
        )
    print(f"{res.out}: {res.n_cells} cells x {res.dim} dims in obsm['{OBSM_KEY}'] (checkpoint step {res.step})")
    if args.label_key:
        import anndata as ad

        from engine.errors import CellrayError

        a = ad.read_h5ad(res.out) if res.out.suffix == ".h5ad" else ad.read_zarr(res.out)
        if args.label_key not in a.obs:
            raise CellrayError(f"--label-key {args.label_key!r}: not an obs column of {args.store}; it has {list(a.obs.columns)}")
        labels = a.obs[args.label_key].to_numpy()
        acc = knn_accuracy(a.obsm[OBSM_KEY], labels, k=15)
        n_labels = len(set(labels[a.obs[args.label_key].notna().to_numpy()]))
        print(f"kNN (k=15) accuracy of {args.label_key!r} ({n_labels} labels) on the embeddings: {acc:.3f}")
    return 0


def _fmt(v, f: str = ".4g") -> str:
    return "n/a" if v is None else format(v, f)
