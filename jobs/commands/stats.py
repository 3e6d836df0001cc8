"""`cellray stats`: one pass of gene statistics (and highly variable genes) over a store, stored inside it."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("stats", help="per-gene statistics and highly variable genes of a store (stored in STORE/stats)")
    p.add_argument("store", help="a store directory or URI")
    p.add_argument("--hvg", type=int, default=None, metavar="N", help="select N highly variable genes")
    p.add_argument(
        "--flavor",
        default="seurat_v3",
        choices=["seurat_v3", "seurat", "cell_ranger"],
        help="HVG method as in scanpy: seurat_v3 on counts (default), seurat on log-normalized, "
        "cell_ranger on normalized",
    )
    p.add_argument("--batch-key", default=None, metavar="KEY", help="obs column: select HVGs per batch and combine")
    p.add_argument(
        "--target-sum", type=float, default=1e4, help="normalize_total target of the normalized layers and medians"
    )
    p.add_argument("--n-bins", type=int, default=20, help="mean bins of the seurat / cell_ranger flavors")
    p.add_argument("--span", type=float, default=0.3, help="loess span of seurat_v3")
    p.add_argument("--block-cells", type=int, default=32768, help="at most this many cells per task")
    p.add_argument(
        "--executor",
        default="auto",
        choices=["auto", "ray", "local"],
        help="Ray tasks, or in this process (local); auto = local below 5M non-zeros",
    )
    p.add_argument(
        "--export", default=None, metavar="PATH", help="also write the per-gene table (a local .csv or .parquet)"
    )
    p.add_argument("--address", default=None, help="Ray cluster address (default: an embedded local Ray)")
    p.set_defaults(func=run_stats)


def run_stats(args: argparse.Namespace) -> int:
    from engine.errors import StatsError
    from engine.preprocess.stats import StatsConfig, compute_stats, export_table
    from jobs.progress import progress_bar

    if args.export is not None and Path(args.export).suffix not in (".csv", ".parquet"):
        raise StatsError(f"--export {args.export}: expected a .csv or .parquet file name")
    config = StatsConfig(
        target_sum=args.target_sum,
        hvg=args.hvg,
        flavor=args.flavor,
        batch_key=args.batch_key,
        span=args.span,
        n_bins=args.n_bins,
        block_cells=args.block_cells,
        executor=args.executor,
        address=args.address,
    )
    with progress_bar() as progress:
        stats = compute_stats(args.store, config, progress=progress)
    lib = stats.library
    print(
        f"wrote {stats.where}: {stats.n_cells:,} cells x {len(stats.genes):,} genes; "
        f"{int((stats.nnz > 0).sum()):,} genes detected"
    )
    print(
        f"library size  median {lib['median']:,.1f}  mean {lib['mean']:,.1f}  [{lib['min']:,.0f}, {lib['max']:,.0f}] "
        f" zero cells {lib['zero_cells']}"
    )
    if stats.hvg:
        hv = stats.highly_variable
        batch = f", batch key {stats.hvg['batch_key']}" if stats.hvg["batch_key"] else ""
        print(f"hvg           {int(hv.sum()):,} genes ({stats.hvg['flavor']}{batch})")
    if args.export is not None:
        print(f"exported      {export_table(stats, args.export)}")
    return 0
