"""Gene statistics + seurat_v3 HVG: `cellray stats` over a store vs scanpy on the in-memory matrix, same run.

    python bench/stats.py [--quick] [--repeats N]

Data: a synthetic store (60,000 cells x 20,000 genes, ~800 non-zeros/cell; 10,000 x 5,000 x 300 with --quick)
and, when fetched, the real Kang PBMC pair (13,999 cells x 14,053 genes), ingested once (not timed).
- cellray: `compute_stats(store, hvg=2000, flavor=seurat_v3)`: per-gene moments of three layers, nnz, medians,
  library sizes, and seurat_v3 with its second pass, reading the store's shards; on a local Ray with all cores
  (in-process below 5M non-zeros, as `executor="auto"` does).
- scanpy: the store read into one in-memory CSR (as `anndata.read_h5ad` would hold it), then
  `sc.pp.highly_variable_genes(flavor="seurat_v3", n_top_genes=2000)`.
Each side runs as its own process and does the work twice: "seconds" is the first (cold: Ray workers start and
import the engine, numba loads its cache), "warm" the second; Ray start-up and the matrix load are reported
apart. The peak RSS is sampled over the process tree (Ray's own processes included for cellray).
Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.procs import ROOT, last_json, median, run_measured  # noqa: E402

N_TOP = 2000


def worker(side: str, store_path: str) -> None:
    """One side of the comparison, in its own process; prints one JSON line."""
    import warnings

    warnings.filterwarnings("ignore")
    t0 = time.perf_counter()
    if side == "cellray":
        from engine.preprocess.stats import StatsConfig, compute_stats
        from engine.runtime import choose_local, init_ray
        from engine.store.format import Store

        if not choose_local("auto", None, Store.open(store_path).x_bytes):
            init_ray()  # compute_stats would start it; started here so that its start-up is reported apart
        t1 = time.perf_counter()
        s = compute_stats(store_path, StatsConfig(hvg=N_TOP, flavor="seurat_v3"), write=False)
        t2 = time.perf_counter()
        compute_stats(store_path, StatsConfig(hvg=N_TOP, flavor="seurat_v3"), write=False)  # warm: workers up
        t3 = time.perf_counter()
        hv = sorted(s.genes.index[s.highly_variable])
    else:
        import anndata as ad
        import numpy as np
        import scanpy as sc
        import scipy.sparse as sp

        from engine.store.format import Store

        store = Store.open(store_path)
        X = sp.vstack([store.read_csr(k).to_scipy() for k in range(store.n_shards)]).tocsr().astype(np.float32)
        a = ad.AnnData(X=X)
        a.var_names = store.gene_ids.astype(str)
        t1 = time.perf_counter()
        sc.pp.highly_variable_genes(a, n_top_genes=N_TOP, flavor="seurat_v3")
        t2 = time.perf_counter()
        sc.pp.highly_variable_genes(a, n_top_genes=N_TOP, flavor="seurat_v3")
        t3 = time.perf_counter()
        hv = sorted(a.var_names[a.var["highly_variable"].to_numpy()])
    print(json.dumps({"setup_s": t1 - t0, "seconds": t2 - t1, "warm_seconds": t3 - t2, "hvg": hv}))


def prepare(work: Path, quick: bool) -> dict[str, Path]:
    from engine.runtime import ray_session
    from engine.store.ingest import IngestConfig, ingest
    from engine.store.synthetic import synthetic_counts

    inputs: dict[str, list[Path]] = {}
    n_cells, n_genes, nnz = (10_000, 5_000, 300) if quick else (60_000, 20_000, 800)
    p = work / "synthetic.h5ad"
    synthetic_counts(n_cells, n_genes, nnz_per_cell=nnz, seed=0).write_h5ad(p)
    inputs[f"synthetic_{n_cells}x{n_genes}"] = [p]
    kang = [
        Path(os.environ.get("CELLRAY_DATA", Path.home() / ".cache/cellray-data")) / f"kang_{k}.h5ad"
        for k in ("ctrl", "stim")
    ]
    if not quick and all(k.exists() for k in kang):
        inputs["kang_13999x14053"] = kang
    stores = {}
    with ray_session():
        for name, paths in inputs.items():
            stores[name] = ingest(paths, work / f"{name}.store", IngestConfig(shard_cells=20_000)).store.path
    return stores


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--worker", nargs=2, metavar=("SIDE", "STORE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(*args.worker)
        return
    repeats = args.repeats or (1 if args.quick else 3)
    work = Path(tempfile.mkdtemp(prefix="cellray-bench-stats-"))
    py = sys.executable
    results: dict = {"n_top_genes": N_TOP, "datasets": {}}
    try:
        for name, store in prepare(work, args.quick).items():
            runs: dict[str, list[dict]] = {"cellray": [], "scanpy": []}
            for _ in range(repeats):
                for side in runs:  # alternate, so load changes on this shared machine hit both alike
                    m = run_measured(
                        [py, str(Path(__file__).resolve()), "--worker", side, str(store)], env={"PYTHONPATH": str(ROOT)}
                    )
                    runs[side].append(
                        {**last_json(m["stdout"]), "peak_tree_mb": m["peak_tree_mb"], "wall_s": m["seconds"]}
                    )
            same = runs["cellray"][0]["hvg"] == runs["scanpy"][0]["hvg"]
            row = {}
            for side, rs in runs.items():
                row[f"{side}_seconds"] = median([r["seconds"] for r in rs])
                row[f"{side}_warm_seconds"] = median([r["warm_seconds"] for r in rs])
                row[f"{side}_setup_seconds"] = median([r["setup_s"] for r in rs])
                row[f"{side}_peak_rss_mb"] = max(r["peak_tree_mb"] for r in rs)
            row["ratio"] = row["scanpy_seconds"] / row["cellray_seconds"]
            row["ratio_warm"] = row["scanpy_warm_seconds"] / row["cellray_warm_seconds"]
            row["same_hvg_set"] = same
            results["datasets"][name] = row
            print(
                f"{name}: cellray {row['cellray_seconds']:.2f} s, warm {row['cellray_warm_seconds']:.2f} s "
                f"(+{row['cellray_setup_seconds']:.1f} s start-up: imports, Ray if used), "
                f"peak RSS {row['cellray_peak_rss_mb']:,.0f} MB incl. Ray | scanpy {row['scanpy_seconds']:.2f} s, "
                f"warm {row['scanpy_warm_seconds']:.2f} s "
                f"(+{row['scanpy_setup_seconds']:.1f} s to load the matrix), peak RSS "
                f"{row['scanpy_peak_rss_mb']:,.0f} MB "
                f"-> {row['ratio']:.2f}x (warm {row['ratio_warm']:.2f}x); same HVG set: {same}",
                flush=True,
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results["load_average_1min"] = os.getloadavg()[0]
    print(json.dumps(results))


if __name__ == "__main__":
    main()
