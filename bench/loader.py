"""Loader throughput: cellray (in-process threads and Ray reader actors) vs annbatch vs anndata backed h5ad.

    python bench/loader.py [--quick] [--repeats N] [--block-size C] [--buffer-blocks N]

Same bytes for everyone: each dataset is ingested once into a cellray store; annbatch's `Loader` (zarrs codec
pipeline on, `chunk_size` = cellray's block size, `preload_nchunks` = cellray's buffer in blocks) reads the very
same shard arrays through anndata's sparse_dataset; anndata backed mode reads the input h5ad with sorted random
indices. Random order, batches of 4,096 cells, CSR output; then normalize_total(1e4) + log1p + densify (annbatch
gets the same steps in numpy/scipy). Each figure is the median cells/s over several epochs (groups of epochs of
>= 100k cells for small datasets) after a warm-up. The decode limit is the rate at which one core only decompresses
every chunk of the store once.

Datasets: (a) synthetic 200k cells x 2,000 genes, ~100 non-zeros/cell (50k with --quick); (b) synthetic 20k
genes, ~1,500 non-zeros/cell (Tahoe-like; 40k cells); (c) the real Kang PBMC pair. (b) and (c) are skipped
with --quick. The loaders take turns (`--rounds`), so load from other processes hits each alike; the CPU
column (CPU time of the loading process per cell, all threads) is the steadier figure on a shared machine.
Last line: one JSON object for the default case, (a) with CSR output.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.procs import ROOT, median, peer_python  # noqa: E402

OUT = ROOT / "bench" / "out" / "loader"
BATCH = 4096
TRANSFORMS = [{"normalize_total": {"target_sum": 1.0e4}}, "log1p", "densify"]


def real_kang() -> list[Path] | None:
    for d in (Path(os.environ.get("CELLRAY_DATA", Path.home() / ".cache" / "cellray-data")), Path("/tmp/cellray-data")):
        files = [d / "kang_ctrl.h5ad", d / "kang_stim.h5ad"]
        if all(f.exists() for f in files):
            return files
    return None


def prepare(name: str, n_cells: int, n_genes: int, nnz: int, chunk_elements: int) -> tuple[Path, list[Path]]:
    """The dataset's input h5ad(s) and its cellray store, built once and kept under bench/out/loader."""
    from engine.store.ingest import IngestConfig, ingest

    OUT.mkdir(parents=True, exist_ok=True)
    store = OUT / f"{name}-c{chunk_elements}.store"
    if name == "c_kang":
        inputs = real_kang()
    else:
        inputs = [OUT / f"{name}.h5ad"]
        if not inputs[0].exists():
            from engine.store.synthetic import synthetic_counts

            tmp = inputs[0].with_suffix(".tmp.h5ad")
            synthetic_counts(n_cells, n_genes, nnz_per_cell=nnz, seed=0, dataset=name).write_h5ad(tmp)
            tmp.rename(inputs[0])
    if not store.exists():
        ingest(inputs, store, IngestConfig(obs_keys=("cell_type",), overwrite=True, chunk_elements=chunk_elements))
    return store, inputs


def time_cellray(store: Path, mode: str, epochs: int, **kw) -> tuple[list[float], list[float]]:
    """cells/s per epoch, and CPU seconds per cell of the loading process (all its threads; local mode only).

    Local mode runs in a fresh process, as annbatch does: Ray's own threads in this process would otherwise
    share its CPU time and GIL."""
    if mode == "local":
        cmd = [sys.executable, __file__, "--measure-local", str(store), json.dumps({"epochs": epochs, **kw})]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"cellray local run failed:\n{out.stderr[-3000:]}")
        res = json.loads(out.stdout.strip().splitlines()[-1])
        return res["cells_per_s"], res["cpu_s_per_cell"]
    return _time_loader(store, mode, epochs, **kw)


def _time_loader(store: Path, mode: str, epochs: int, group: int = 1, **kw) -> tuple[list[float], list[float]]:
    from engine.loading.loader import Loader

    loader = Loader(store, BATCH, mode=mode, **kw)
    rates, cpu = [], []
    try:
        for epoch in range(epochs + 1):  # the first sample warms up (numba cache, torch import, file opens)
            t0, c0, cells = time.perf_counter(), time.process_time(), 0
            for batch in (b for _ in range(group) for b in loader):
                cells += batch["X"].shape[0]
            if epoch:
                rates.append(cells / (time.perf_counter() - t0))
                cpu.append((time.process_time() - c0) / cells)
    finally:
        loader.close()
    return rates, cpu


def time_annbatch(
    peer: str, store: Path, block: int, buffer_blocks: int, epochs: int, transforms: bool, group: int = 1
) -> tuple[list[float], list[float]]:
    cmd = [peer, str(ROOT / "bench/peers/annbatch_loader.py"), str(store), "--batch-size", str(BATCH),
           "--chunk-size", str(block), "--preload-nchunks", str(buffer_blocks), "--epochs", str(epochs),
           "--group", str(group)]  # fmt: skip
    if transforms:
        cmd.append("--transforms")
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"annbatch run failed:\n{out.stderr[-3000:]}")
    res = json.loads(out.stdout.strip().splitlines()[-1])
    return res["cells_per_s"], res["cpu_s_per_cell"]


def time_h5ad(inputs: list[Path], repeats: int, batches: int = 12) -> list[float]:
    """anndata backed mode: batches of sorted random indices, as a map-style Dataset would read them."""
    import anndata as ad
    import numpy as np

    files = [ad.read_h5ad(p, backed="r") for p in inputs]
    sizes = np.array([f.n_obs for f in files])
    rng = np.random.default_rng(0)
    rates = []
    for _ in range(repeats + 1):
        t0, cells = time.perf_counter(), 0
        for _ in range(batches):
            which = rng.choice(len(files), p=sizes / sizes.sum())
            idx = np.sort(rng.choice(sizes[which], size=min(BATCH, sizes[which]), replace=False))
            cells += files[which].X[idx].shape[0]
        rates.append(cells / (time.perf_counter() - t0))
    return rates[1:]


def decode_limit(store: Path, passes: int = 3) -> float:
    """Cells/s when one core does nothing but decompress each chunk of X/data and X/indices once (best pass)."""
    from engine.loading.chunks import ArrayReader, decompress
    from engine.store.format import Store

    s = Store.open(store)
    raws = []
    for shard in s.manifest.shards:
        for name in ("data", "indices"):
            r = ArrayReader.open(s.path / shard.path / "X" / name)
            raws += [(r.layout.codec, raw) for raw in r.compressed_chunks()]
            r.close()
    best = float("inf")
    for _ in range(passes):
        t0 = time.perf_counter()
        for codec, raw in raws:
            decompress(codec, raw)
        best = min(best, time.perf_counter() - t0)
    return s.n_cells / best


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--measure-local":  # the child process of time_cellray
        kw = json.loads(sys.argv[3])
        rates, cpu = _time_loader(Path(sys.argv[2]), "local", kw.pop("epochs"), **kw)
        print(json.dumps({"cells_per_s": rates, "cpu_s_per_cell": cpu}))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=None, help="timed epochs per loader and round (median reported)")
    ap.add_argument("--rounds", type=int, default=None, help="rounds of all loaders in turn (evens out a busy machine)")
    ap.add_argument("--block-size", type=int, default=None, help="cells per block (default: the Loader's, ~one chunk)")
    ap.add_argument("--buffer-blocks", type=int, default=None, help="blocks per shuffle buffer (default: the Loader's)")
    ap.add_argument("--chunk-elements", type=int, default=None, help="store chunk size (default: the store's default)")
    ap.add_argument("--no-ray", action="store_true", help="skip the Ray reader-actor mode")
    ap.add_argument("--no-transforms", action="store_true", help="skip the normalize+log1p+densify case")
    args = ap.parse_args()
    repeats = args.repeats or 3
    rounds = args.rounds or 2
    peer = peer_python()
    if peer is None:
        print("note: annbatch not measured (no Python >= 3.12 peers venv; run `make peers`)")

    import inspect

    from engine.loading.loader import Loader
    from engine.runtime import init_ray
    from engine.store.format import DEFAULT_CHUNK_ELEMENTS, Store

    chunk_elements = args.chunk_elements or DEFAULT_CHUNK_ELEMENTS
    defaults = inspect.signature(Loader).parameters
    init_ray(num_cpus=2)
    n_a = 50_000 if args.quick else 200_000
    datasets = [(f"a_synth_{n_a // 1000}k", n_a, 2_000, 100)]
    if not args.quick:
        datasets.append(("b_tahoe_like_40k", 40_000, 20_000, 1_500))
        if real_kang():
            datasets.append(("c_kang", 0, 0, 0))
    rows, default_case = [], None
    for name, n_cells, n_genes, nnz in datasets:
        store, inputs = prepare(name, n_cells, n_genes, nnz, chunk_elements)
        probe = Loader(store, BATCH, mode="local", block_size=args.block_size)
        block = probe.config.block_size
        # a buffer holds at least one batch (cellray rounds it up; annbatch refuses less): same count for both
        buffer_blocks = max(args.buffer_blocks or defaults["buffer_blocks"].default, -(-BATCH // block))
        probe.close()
        # small datasets: time groups of epochs of at least ~100k cells, so per-epoch start-up does not dominate
        group = max(1, -(-100_000 // Store.open(store).n_cells))
        kw = dict(block_size=block, buffer_blocks=buffer_blocks, group=group)
        cases = [("csr", dict(output="csr"), False)]
        if name.startswith("a_") and not args.no_transforms:
            cases.append(("norm+log1p+dense", dict(output="dense", transforms=TRANSFORMS), True))
        limit = decode_limit(store)
        for label, opts, with_t in cases:
            got = {k: [] for k in ("cellray_local", "cellray_cpu", "cellray_ray", "annbatch", "annbatch_cpu")}
            for _ in range(rounds):  # all loaders in turn, so a load spike from elsewhere hits each alike
                rate, cpu = time_cellray(store, "local", repeats, **kw, **opts)
                got["cellray_local"] += rate
                got["cellray_cpu"] += cpu
                if not args.no_ray:
                    got["cellray_ray"] += time_cellray(store, "ray", repeats, **kw, **opts)[0]
                if peer:
                    rate, cpu = time_annbatch(peer, store, block, buffer_blocks, repeats, with_t, group)
                    got["annbatch"] += rate
                    got["annbatch_cpu"] += cpu
            r = {
                "dataset": name,
                "case": label,
                "block": block,
                "buffer_blocks": buffer_blocks,
                "chunk_elements": chunk_elements,
                "epochs_per_sample": group,
            }
            r.update({k: (median(v) if v else None) for k, v in got.items()})
            r["h5ad"] = median(time_h5ad(inputs, 2)) if not with_t else None
            r["decode_limit"] = limit
            rows.append(r)
            if default_case is None:
                default_case = r

    def fmt(v):
        return "-" if v is None else f"{v / 1e3:,.0f}k"

    def us(v):
        return "-" if v is None else f"{v * 1e6:.2f}"

    print(
        f"\nrandom-order batches of {BATCH} cells; cells/s, median of {rounds} x {repeats} epochs (h5ad: 2 x 12 "
        "batches);"
    )
    print("cpu: CPU microseconds per cell of the loading process (all threads); decode 1c: one core only decompressing")
    print(
        f"{'dataset':<18}{'case':<18}{'block x buf':>12}{'cellray':>9}{'(ray)':>8}{'annbatch':>9}{'h5ad':>7}"
        f"{'vs annb':>8}{'vs h5ad':>8}{'cpu cr':>7}{'cpu ab':>7}{'decode 1c':>10}{'of lim':>7}"
    )
    for r in rows:
        best = r["cellray_local"]
        vs_a = f"{best / r['annbatch']:.2f}x" if r["annbatch"] else "-"
        vs_h = f"{best / r['h5ad']:.0f}x" if r["h5ad"] else "-"
        print(
            f"{r['dataset']:<18}{r['case']:<18}{str(r['block']) + ' x ' + str(r['buffer_blocks']):>12}{fmt(best):>9}"
            f"{fmt(r['cellray_ray']):>8}{fmt(r['annbatch']):>9}{fmt(r['h5ad']):>7}{vs_a:>8}{vs_h:>8}"
            f"{us(r['cellray_cpu']):>7}{us(r['annbatch_cpu']):>7}{fmt(r['decode_limit']):>10}"
            f"{best / r['decode_limit']:>7.0%}"
        )
    d = default_case
    summary = {
        "bench": "loader",
        "dataset": d["dataset"],
        "batch_size": BATCH,
        "block_size": d["block"],
        "buffer_blocks": d["buffer_blocks"],
        "chunk_elements": chunk_elements,
        "cellray_cells_per_s": round(d["cellray_local"]),
        "cellray_ray_cells_per_s": None if d["cellray_ray"] is None else round(d["cellray_ray"]),
        "annbatch_cells_per_s": None if d["annbatch"] is None else round(d["annbatch"]),
        "h5ad_cells_per_s": None if d["h5ad"] is None else round(d["h5ad"]),
        "ratio_vs_annbatch": None if not d["annbatch"] else round(d["cellray_local"] / d["annbatch"], 2),
        "cpu_ratio_vs_annbatch": None if not d["annbatch_cpu"] else round(d["annbatch_cpu"] / d["cellray_cpu"], 2),
        "decode_limit_cells_per_s": round(d["decode_limit"]),
        "rows": rows,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
