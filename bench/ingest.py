"""Ingest throughput and memory: cellray vs annbatch's DatasetCollection.add_adatas, same inputs, same run.

    python bench/ingest.py [--quick] [--repeats N]

Inputs: the real Kang PBMC pair (13,999 cells x 14,053 genes) when ../shared/data/fetch_real.sh has fetched
them, plus pairs of synthetic h5ad files (2,000 genes, ~100 non-zeros/cell): 2 x 50k cells and 2 x 150k cells, to
show how peak memory grows with the input (2 x 10k with --quick).
Both tools shuffle across inputs and write sharded zarr. Each tool runs as its own process; we time it from
outside (Ray start-up included for cellray) and sample the peak RSS of its whole process tree.
Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.procs import ROOT, median, peer_python, run_measured  # noqa: E402


def make_inputs(work: Path, quick: bool) -> dict[str, list[Path]]:
    from engine.store.synthetic import synthetic_counts

    sizes = {"synthetic": 10_000} if quick else {"synthetic": 50_000, "synthetic_x3": 150_000}
    sets = {}
    for name, n in sizes.items():
        sets[name] = []
        for i in range(2):
            p = work / f"{name}{i}.h5ad"
            synthetic_counts(n, 2_000, nnz_per_cell=100, seed=i, dataset=f"{name}{i}").write_h5ad(p)
            sets[name].append(p)
    data = Path.home() / ".cache" / "cellray-data"
    kang = [data / "kang_ctrl.h5ad", data / "kang_stim.h5ad"]
    if all(p.exists() for p in kang) and not quick:
        sets["kang"] = kang
    return sets


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=None)
    args = ap.parse_args()
    repeats = args.repeats or (1 if args.quick else 3)
    peer = peer_python()
    work = Path(tempfile.mkdtemp(prefix="cellray-bench-ingest-"))
    cellray = str(ROOT / ".venv" / "bin" / "cellray") if (ROOT / ".venv" / "bin" / "cellray").exists() else "cellray"
    results = {}
    try:
        for name, inputs in make_inputs(work, args.quick).items():
            import anndata as ad

            n_cells = sum(ad.read_h5ad(p, backed="r").n_obs for p in inputs)
            rows = {"cellray": [], "annbatch": []}
            for _ in range(repeats):
                out = work / f"{name}.store"
                rows["cellray"].append(
                    run_measured([cellray, "ingest", *map(str, inputs), "--out", str(out), "--overwrite"])
                )
                shutil.rmtree(out, ignore_errors=True)
                if peer:
                    out = work / f"{name}.annbatch.zarr"
                    rows["annbatch"].append(
                        run_measured([peer, str(ROOT / "bench/peers/annbatch_ingest.py"), str(out), *map(str, inputs)])
                    )
                    shutil.rmtree(out, ignore_errors=True)
            res = {"n_cells": n_cells}
            for tool, runs in rows.items():
                if runs:
                    res[f"{tool}_cells_per_s"] = n_cells / median([x["seconds"] for x in runs])
                    res[f"{tool}_peak_rss_mb"] = median([x["peak_tree_mb"] for x in runs])
                    res[f"{tool}_peak_process_rss_mb"] = median([x["peak_process_mb"] for x in runs])
            results[name] = res
            print(f"{name:>10}: {n_cells:,} cells, {repeats} run(s), medians")
            for tool in rows:
                if f"{tool}_cells_per_s" in res:
                    print(
                        f"  {tool:>8}  {res[f'{tool}_cells_per_s']:>10,.0f} cells/s   peak RSS "
                        f"{res[f'{tool}_peak_rss_mb']:>7,.0f} MB (tree)"
                        f"  {res[f'{tool}_peak_process_rss_mb']:>7,.0f} MB (largest process)"
                    )
            if "annbatch_cells_per_s" in res:
                print(
                    f"  ratio cellray/annbatch: speed {res['cellray_cells_per_s'] / res['annbatch_cells_per_s']:.2f}x, "
                    f"peak RSS {res['cellray_peak_rss_mb'] / res['annbatch_peak_rss_mb']:.2f}x"
                )
            else:
                print("  annbatch: not measured (no Python >= 3.12 peers venv; run `make peers`)")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    main_set = results.get("kang", results["synthetic"])
    summary = {k: round(v, 1) for k, v in main_set.items() if k.endswith(("cells_per_s", "rss_mb"))}
    summary["dataset"] = "kang" if "kang" in results else "synthetic"
    summary["all"] = {k: {kk: round(vv, 1) for kk, vv in v.items()} for k, v in results.items()}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
