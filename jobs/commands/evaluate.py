"""`cellray evaluate EMBEDDINGS`: scIB metrics and kNN label transfer of an embedding, beside HVG-PCA-50 of the
same cells (engine.infer.evaluate); a table on stdout and, with --json, the report as JSON."""

from __future__ import annotations

import argparse
import json
from typing import Any


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="score an embedding (cellray embed's output) with scIB metrics and kNN label transfer vs HVG-PCA-50",
    )
    p.add_argument("embeddings", help="a cellray embed output: OUT.zarr or OUT.h5ad")
    p.add_argument("--label-key", required=True, help="obs column of cell types (bio conservation, kNN)")
    p.add_argument("--batch-key", default=None, help="obs column of batches (batch-correction metrics)")
    p.add_argument(
        "--baseline",
        choices=["pca", "none"],
        default="pca",
        help="pca: HVG-PCA-50 of the same cells' counts, from the store the embedding was made from (default)",
    )
    p.add_argument("--store", default=None, help="the store the embedding was made from (default: as recorded)")
    p.add_argument("--max-cells", type=int, default=20_000, help="score a random sample of this many cells")
    p.add_argument("--json", default=None, metavar="OUT", help="also write the report as JSON to this file")
    p.set_defaults(func=run_evaluate)


def run_evaluate(args: argparse.Namespace) -> int:
    from rich.console import Console

    from engine.atomic import write_text_atomically
    from engine.infer.config import EvalConfig
    from engine.infer.evaluate import evaluate_embedding

    config = EvalConfig(
        label_key=args.label_key, batch_key=args.batch_key, baseline=args.baseline, max_cells=args.max_cells
    )
    console = Console()
    with console.status(f"scoring {args.embeddings} ..."):
        report = evaluate_embedding(args.embeddings, config, store=args.store)
    console.print(table(report))
    if args.json:
        write_text_atomically(args.json, json.dumps(report, indent=1))
        console.print(f"report: {args.json}")
    return 0


def _fmt(v: float | None, ratio: bool = False) -> str:
    return "-" if v is None else (f"{v:.2f}x" if ratio else f"{v:.3f}")


def table(report: dict[str, Any]) -> Any:
    """The report as a rich table: one row per metric (grouped by type), embedding | baseline | ratio."""
    from rich.table import Table

    from engine.infer.evaluate import BASELINE, MODEL

    scores, types, ratios = report["scores"], report["metric_types"], report["ratios"] or {}
    base = report["baseline"]
    batches = f", {report['batches']} batches" if report["batches"] else ""
    t = Table(
        title=f"{report['embedding']}: {report['cells']:,} cells, {report['labels']} {report['label_key']!r} "
        f"labels{batches}",
        caption=f"batch correction: {report['batch_correction']}; scIB values raw (not min-max scaled)",
    )
    t.add_column("metric")
    t.add_column("type")
    t.add_column("embedding", justify="right")
    if base:
        t.add_column(base, justify="right")
        t.add_column("ratio", justify="right")
    for metric, kind in types.items():
        row = [metric, kind, _fmt(scores[MODEL].get(metric))]
        if base:
            row += [_fmt(scores[BASELINE].get(metric)), _fmt(ratios.get(metric), ratio=True)]
        t.add_row(*row, style="bold" if kind == "Aggregate score" else None)
    return t
