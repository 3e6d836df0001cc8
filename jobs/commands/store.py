"""`cellray ingest`, `info`, `verify` and `synth`: making and inspecting stores."""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from engine.errors import CellrayError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ingest", help="ingest .h5ad / AnnData .zarr files into a sharded cellray store")
    p.add_argument("inputs", nargs="+", help=".h5ad files or AnnData .zarr stores (local)")
    p.add_argument(
        "--out", required=True, help="the store to create: a directory, or s3://BUCKET/PREFIX (gs://, az://)"
    )
    p.add_argument("--vocab", default="union", help="union (default), intersection, or a file of gene ids")
    p.add_argument("--obs", default="", help="comma-separated obs columns to keep (dataset and obs_name always are)")
    p.add_argument("--layer", default=None, help="take counts from this layer instead of X")
    p.add_argument("--no-shuffle", action="store_true", help="keep input order (default: pre-shuffle all cells)")
    p.add_argument("--seed", type=int, default=0, help="seed of the pre-shuffle")
    p.add_argument(
        "--shard-size", default="128MB", help="cells per shard (e.g. 100000) or uncompressed bytes of X (e.g. 128MB)"
    )
    p.add_argument("--codec", default="blosc-lz4", choices=["blosc-lz4", "blosc-zstd", "zstd"])
    p.add_argument("--allow-non-integer", action="store_true", help="accept non-integer values (e.g. normalised data)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing store at --out")
    p.add_argument("--address", default=None, help="Ray cluster address (default: an embedded local Ray)")
    p.add_argument(
        "--executor",
        default="auto",
        choices=["auto", "ray", "local"],
        help="ray tasks, or in-process (local); auto = local for inputs under 512 MB of X",
    )
    p.set_defaults(func=run_ingest)

    p = sub.add_parser("info", help="print a store's manifest summary")
    p.add_argument("store", help="a store directory or URI")
    p.add_argument("--json", action="store_true", help="print the whole manifest as JSON")
    p.set_defaults(func=run_info)

    p = sub.add_parser("verify", help="re-read every shard and check structure, counts and checksums")
    p.add_argument("store", help="a store directory or URI")
    p.set_defaults(func=run_verify)

    p = sub.add_parser("synth", help="write a synthetic count matrix as .h5ad (demo data without a download)")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--cells", type=int, default=10_000)
    p.add_argument("--genes", type=int, default=2_000)
    p.add_argument("--nnz-per-cell", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run_synth)


MIN_SHARD_BYTES = 2**20  # a shard under 1 MB of X is all per-file overhead


def parse_size(text: str) -> tuple[int | None, int | None]:
    """'100000' -> (cells, None); '256MB' / '1GiB' / '0.5G' -> (None, bytes). Anything else is refused."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(?:([KMGT])(?:I?B)?|B)?\s*", text.upper())
    bad = f"--shard-size {text!r}: expected a positive cell count (100000) or a size of at least 1MB (256MB, 1GiB)"
    if m is None:
        raise CellrayError(bad)
    number, unit = m.groups()
    if unit is None and not text.strip().upper().endswith("B"):
        if "." in number or int(number) < 1:
            raise CellrayError(bad)
        return int(number), None
    nbytes = int(float(number) * {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40, None: 1}[unit])
    if nbytes < MIN_SHARD_BYTES:
        raise CellrayError(bad)
    return None, nbytes


def run_ingest(args: argparse.Namespace) -> int:
    from engine.store.format import Codec
    from engine.store.ingest import IngestConfig, ingest
    from jobs.progress import progress_bar

    cells, nbytes = parse_size(args.shard_size)
    config = IngestConfig(
        vocab=args.vocab,
        obs_keys=tuple(k for k in args.obs.split(",") if k),
        layer=args.layer,
        shuffle=not args.no_shuffle,
        seed=args.seed,
        shard_cells=cells,
        **({"shard_bytes": nbytes} if nbytes else {}),
        allow_non_integer=args.allow_non_integer,
        overwrite=args.overwrite,
        codec=Codec(name=args.codec),
        address=args.address,
        executor=args.executor,
    )
    with progress_bar() as progress:
        result = ingest(args.inputs, args.out, config, progress=progress)
    store, r = result.store, result.report
    print(
        f"wrote {store.path}: {store.n_cells:,} cells x {store.n_genes:,} genes in {store.n_shards} shard(s), "
        f"{r.seconds:.1f} s ({store.n_cells / r.seconds:,.0f} cells/s), "
        f"peak task memory growth {r.peak_task_rss_growth / 2**20:,.0f} MB"
    )
    return 0


def run_info(args: argparse.Namespace) -> int:
    from engine.store.format import Store

    store = Store.open(args.store)
    m = store.manifest
    if args.json:
        json.dump(m.to_dict(), sys.stdout, indent=2)
        print()
        return 0
    nnz = sum(s.nnz for s in m.shards)
    print(f"store        {store.path}  ({m.format} v{m.version}, created {m.created})")
    print(
        f"cells        {m.n_cells:,} in {len(m.shards)} shard(s)   genes {m.n_genes:,}   non-zeros {nnz:,} "
        f"({nnz / max(m.n_cells, 1):.0f}/cell)"
    )
    print(
        f"X            counts {m.count_dtype}, gene indices {m.index_dtype}, codec {m.codec.name} (level "
        f"{m.codec.level}, {m.codec.shuffle}), {m.chunk_elements:,} values/chunk"
    )
    print(f"shuffled     {m.shuffle.get('shuffled')} (seed {m.shuffle.get('seed')})")
    for col, sch in m.obs_schema.items():
        cats = sch.get("categories")
        detail = (
            f"{len(cats)} categories: {', '.join(cats[:6])}{', ...' if len(cats) > 6 else ''}"
            if cats is not None
            else sch["dtype"]
        )
        print(f"obs          {col:<14} {detail}")
    for p in m.provenance:
        print(f"source       {p['dataset']:<14} {p['n_cells']:>10,} cells  {p['path']} [{p['field']}]")
    if "stats" in store.root:
        print("stats        present (cellray stats)")
    return 0


def run_verify(args: argparse.Namespace) -> int:
    from engine.store.verify import verify_store
    from jobs.progress import progress_bar

    with progress_bar() as progress:
        problems = verify_store(args.store, progress=progress)
    if problems:
        for p in problems:
            print(f"BAD  {p}", file=sys.stderr)
        return 1
    print(f"OK   {args.store}: every shard re-read; structure, counts and checksums match the manifest")
    return 0


def run_synth(args: argparse.Namespace) -> int:
    from engine.store.synthetic import synthetic_counts

    adata = synthetic_counts(args.cells, args.genes, args.nnz_per_cell, seed=args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(f".{args.out.name}.tmp")
    adata.write_h5ad(tmp)
    tmp.rename(args.out)
    print(f"wrote {args.out}: {adata.n_obs:,} cells x {adata.n_vars:,} genes")
    return 0
