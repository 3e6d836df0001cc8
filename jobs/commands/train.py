"""`cellray run SPEC.yaml` (pretraining on Ray Train, or inference) and `cellray embed` (embeddings of every cell)."""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run", help="run a job spec (pretrain, embed, stats, ingest, sleep) on the local Ray or on --address"
    )
    p.add_argument("spec", help="a YAML job spec, e.g. jobs/pretrain_vae.yaml (or its URI in a bucket)")
    p.add_argument("--address", default=None, help="Ray cluster address (default: an embedded local Ray)")
    p.add_argument("--check", action="store_true", help="validate the spec (and its store) and exit")
    p.add_argument("--json", action="store_true", help="print the final summary as JSON")
    p.set_defaults(func=run_job)

    p = sub.add_parser("embed", help="embed every cell of a store with a checkpoint into an AnnData (resumable)")
    p.add_argument(
        "--checkpoint", required=True, help="a checkpoint dir, or a run's train.output folder (latest); or a URI"
    )
    p.add_argument("--store", required=True, help="a store directory or URI")
    p.add_argument(
        "--out",
        required=True,
        help="output AnnData: OUT.zarr (written in parts, resumable) or OUT.h5ad (assembled from the parts); "
        "s3://.../OUT.zarr (gs://, az://) is uploaded when complete",
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
    """`cellray run SPEC`: what a scheduled job runs too (jobs/kinds/)."""
    from jobs.kinds import KINDS
    from jobs.spec import check_spec, load_spec

    spec = load_spec(args.spec)
    if args.check:
        print(f"{args.spec}: ok ({check_spec(spec)})")
        return 0
    return _run_kind(spec, args.address, args.json, KINDS[spec.kind])


def run_embed(args: argparse.Namespace) -> int:
    from engine.infer.config import EmbedConfig
    from jobs.kinds import KINDS

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
    if args.label_key:  # checked before anything is written: the output's obs columns are the store's (+ cellray_*)
        from engine.errors import InferError
        from engine.store.format import Store

        columns = list(Store.open(args.store).manifest.obs_schema)
        if args.label_key not in columns and not args.label_key.startswith("cellray_"):
            raise InferError(f"--label-key {args.label_key!r}: not an obs column of {args.store}; it has {columns}")
    _run_kind(config, args.address, False, KINDS["embed"])
    if args.label_key:
        _print_knn(config.out, args.label_key)
    return 0


def _run_kind(spec, address: str | None, as_json: bool, kind) -> int:
    """Run a spec of any kind on the local Ray or `address` and print its summary (a line, or JSON)."""
    from jobs.progress import progress_bar

    with progress_bar() as progress:
        summary = kind.run(spec, address, progress)
    print(json.dumps(summary) if as_json else "\n".join(kind.describe(summary)))
    return 0


def _print_knn(out: str, label_key: str) -> None:
    from engine.infer.evaluate import knn_accuracy, read_sample

    s = read_sample(out, label_key)
    acc = knn_accuracy(s.emb, s.labels, k=15)
    n_labels = len(set(s.labels))
    print(f"kNN (k=15) accuracy of {label_key!r} ({n_labels} labels) on the embeddings: {acc:.3f}")
