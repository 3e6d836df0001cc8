"""Fused normalize_total + log1p + densify: cellray's kernel vs scanpy vs plain scipy/numpy, same batch, same run.

    python bench/kernels.py [--quick] [--repeats N]

A batch of 4,096 cells with ~2,000 non-zeros per cell (store dtypes: uint16 counts, uint16/uint32 gene indices)
over 20,000 and 60,000 genes (20,000 only with --quick). Each contender turns the CSR batch into a dense float32
(cells x genes) matrix of log1p(normalize_total(x, 1e4)):
- cellray: `Pipeline([normalize_total, log1p, densify])`, into a fresh array each call, and into a reused
  buffer (`pipe(block, cells, out=buf)`: no page faults for the 0.3-1 GB output);
- scanpy: `sc.pp.normalize_total` + `sc.pp.log1p` on a copy of the batch, then `.toarray()`;
- scipy/numpy: divide `data` by the repeated size factors, `np.log1p`, `.toarray()`.
Two scenarios: all genes densified, and 2,000 selected genes (normalize_total + log1p + select_genes + densify;
scanpy and scipy subset columns after log1p). Single thread (numba set to 1 thread) and all cores; contenders
take turns in each repeat; median of repeats after one warm-up call.
"CSR GB/s per core" counts the input bytes (data + indices + indptr) per second per thread.
Then log1p alone on a million normalized counts (counts 1-999 over size factors of libraries of 100 to 100k): the
kernels' `log1p32` (through log, Goldberg's correction) against libm's float64 log1p, both in a numba loop, and
numpy's float32 `np.log1p` over the array (the peer); ns a value, median of repeats, and how many results differ
from libm's rounded to float32.
Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.procs import median, normalized_counts  # noqa: E402

N_CELLS = 4096
NNZ_PER_CELL = 2000
N_HVG = 2000  # the second scenario keeps this many genes (select_genes: hvg), as a model's loader does


def make_batch(n_genes: int, seed: int = 0):
    """A CSR batch with exactly NNZ_PER_CELL distinct genes per cell (power-law gene popularity), uint16 counts."""
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, n_genes + 1) ** 0.6
    weights /= weights.sum()
    rows = []
    for _ in range(N_CELLS):  # choice without replacement per cell keeps nnz exact
        rows.append(np.sort(rng.choice(n_genes, NNZ_PER_CELL, replace=False, p=weights)))
    indices = np.concatenate(rows).astype(np.uint16 if n_genes <= 1 << 16 else np.uint32)
    indptr = np.arange(0, (N_CELLS + 1) * NNZ_PER_CELL, NNZ_PER_CELL, dtype=np.int64)
    data = (1 + rng.poisson(rng.gamma(0.7, 2.0, len(indices)))).astype(np.uint16)
    return (
        indptr,
        indices,
        data,
        sp.csr_matrix((data.astype(np.float32), indices.astype(np.int32), indptr), shape=(N_CELLS, n_genes)),
    )


def timed(fns: dict, repeats: int) -> dict[str, float]:
    """Median seconds of each contender; they take turns within each repeat, so a load change on this shared
    machine hits all of them alike."""
    for fn in fns.values():
        fn()  # warm-up (compilation, first allocations)
    ts: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            ts[k].append(time.perf_counter() - t0)
    return {k: median(v) for k, v in ts.items()}


def log1p_timing(repeats: int) -> dict:
    """log1p32 vs libm's log1p (numba loops) vs numpy's float32 log1p, on the same million values."""
    import numba

    from engine.preprocess import kernels

    @numba.njit
    def with_log1p32(v, out):
        for i in range(v.size):
            out[i] = kernels.log1p32(v[i])

    @numba.njit
    def with_libm(v, out):
        for i in range(v.size):
            out[i] = np.float32(np.log1p(np.float64(v[i])))

    v = normalized_counts()
    out = {name: np.empty_like(v) for name in ("log1p32", "libm", "numpy")}
    secs = timed(
        {
            "log1p32": lambda: with_log1p32(v, out["log1p32"]),
            "libm": lambda: with_libm(v, out["libm"]),
            "numpy": lambda: np.log1p(v, out=out["numpy"]),
        },
        repeats,
    )
    ns = {k: t / v.size * 1e9 for k, t in secs.items()}
    differ = int((out["log1p32"] != out["libm"]).sum())
    print(
        f"log1p of 1M normalized counts: log1p32 {ns['log1p32']:.2f} ns, libm log1p {ns['libm']:.2f} ns "
        f"({ns['libm'] / ns['log1p32']:.1f}x), numpy float32 {ns['numpy']:.2f} ns; {differ} of 1M differ from libm's",
        flush=True,
    )
    return {"ns_per_value": ns, "differ_from_libm": differ}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=None)
    args = ap.parse_args()
    repeats = args.repeats or (3 if args.quick else 7)

    import anndata as ad
    import numba
    import scanpy as sc

    from engine.preprocess import kernels
    from engine.preprocess.transforms import Pipeline
    from engine.store.format import CSRBlock

    all_threads = numba.config.NUMBA_NUM_THREADS
    thread_counts = sorted({1, all_threads})
    results: dict = {"n_cells": N_CELLS, "nnz_per_cell": NNZ_PER_CELL, "threads": thread_counts, "by_genes": {}}
    for n_genes in [20_000] if args.quick else [20_000, 60_000]:
        indptr, indices, data, X = make_batch(n_genes)
        block = CSRBlock(indptr, indices, data, n_genes)
        in_bytes = indptr.nbytes + indices.nbytes + data.nbytes
        cells = np.arange(N_CELLS)
        hvg = np.sort(np.random.default_rng(1).choice(n_genes, N_HVG, replace=False))
        gene_map = np.full(n_genes, -1, dtype=np.int64)
        gene_map[hvg] = np.arange(N_HVG)
        z = np.zeros(0)
        for scenario, cols in (("all_genes", None), (f"hvg{N_HVG}", hvg)):
            n_out = n_genes if cols is None else N_HVG
            pipe = Pipeline.from_spec([{"normalize_total": {"target_sum": 1e4}}, "log1p", "densify"])
            buf = np.empty((N_CELLS, n_out), dtype=np.float32)

            def cellray_fresh():
                if cols is None:
                    return pipe(block, cells)["X"]
                # select_genes after log1p: the kernel with the HVG map (Pipeline does this given a store)
                out = np.zeros((N_CELLS, n_out), dtype=np.float32)
                return kernels.transform_dense(
                    indptr, indices, data, gene_map, True, False, True, 1e4, True, False, z, z, 0.0, True, out, True
                )

            def cellray_reused():
                if cols is None:
                    return pipe(block, cells, out=buf)["X"]
                return kernels.transform_dense(
                    indptr, indices, data, gene_map, True, False, True, 1e4, True, False, z, z, 0.0, True, buf, False
                )

            def scanpy_run():
                a = ad.AnnData(X=X.copy())
                sc.pp.normalize_total(a, target_sum=1e4)
                sc.pp.log1p(a)
                return (a.X if cols is None else a[:, cols].X).toarray()

            def scipy_run():
                lib = np.asarray(X.sum(axis=1)).ravel()
                factor = np.where(lib == 0, 1, lib / 1e4).astype(np.float32)
                Y = X.copy()
                Y.data = np.log1p(Y.data / np.repeat(factor, np.diff(Y.indptr)))
                return (Y if cols is None else Y[:, cols]).toarray()

            # same numbers from every contender (scanpy is the reference)
            ref = scanpy_run()
            assert np.abs(cellray_fresh() - ref).max() <= 1e-5 and np.abs(cellray_reused() - ref).max() <= 1e-5
            assert np.abs(scipy_run() - ref).max() <= 1e-5
            del ref
            row: dict = {"input_mb": in_bytes / 1e6, "output_mb": buf.nbytes / 1e6}
            for t in thread_counts:
                with kernels.num_threads(t):
                    secs = timed(
                        {
                            "cellray": cellray_fresh,
                            "cellray_reused_buffer": cellray_reused,
                            "scanpy": scanpy_run,
                            "scipy": scipy_run,
                        },
                        repeats,
                    )
                r = {f"{k}_cells_per_s": N_CELLS / v for k, v in secs.items()}
                r["cellray_csr_gb_per_s_per_core"] = in_bytes / secs["cellray"] / 1e9 / t
                r["cellray_reused_buffer_csr_gb_per_s_per_core"] = in_bytes / secs["cellray_reused_buffer"] / 1e9 / t
                r["ratio_vs_scanpy"] = secs["scanpy"] / secs["cellray"]
                r["ratio_vs_scipy"] = secs["scipy"] / secs["cellray"]
                row[f"threads_{t}"] = r
                print(
                    f"{n_genes:>6} genes -> {scenario:<9} {t} thread(s): cellray {N_CELLS / secs['cellray']:>9,.0f} "
                    "cells/s "
                    f"(reused buffer {N_CELLS / secs['cellray_reused_buffer']:>9,.0f}; "
                    f"{r['cellray_csr_gb_per_s_per_core']:.2f} / "
                    f"{r['cellray_reused_buffer_csr_gb_per_s_per_core']:.2f} GB/s/core of CSR)  "
                    f"scanpy {N_CELLS / secs['scanpy']:>8,.0f}  scipy {N_CELLS / secs['scipy']:>8,.0f}  "
                    f"-> {r['ratio_vs_scanpy']:.1f}x scanpy, {r['ratio_vs_scipy']:.1f}x scipy",
                    flush=True,
                )
            results["by_genes"][f"{n_genes}_{scenario}"] = row
            del buf
        del X
    results["log1p"] = log1p_timing(repeats)
    results["load_average_1min"] = os.getloadavg()[0]  # this machine is shared: context for the numbers
    print(json.dumps(results))


if __name__ == "__main__":
    main()
