"""annbatch's Loader over a cellray store's shards (the same bytes cellray reads), run by bench/loader.py.

Runs in the peers venv (Python >= 3.12). Prints one JSON line: cells/s per epoch.
usage: annbatch_loader.py STORE --batch-size B --chunk-size C --preload-nchunks N --epochs E [--group G] [--transforms]
"""

import argparse
import json
import sys
import time

import anndata as ad
import numpy as np
import zarr


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("store")
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--chunk-size", type=int, default=512)
    p.add_argument("--preload-nchunks", type=int, default=32)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--transforms", action="store_true", help="normalize_total(1e4) + log1p + densify per batch")
    p.add_argument("--no-zarrs", action="store_true")
    p.add_argument("--group", type=int, default=1, help="epochs per timed sample (small datasets)")
    args = p.parse_args()
    if not args.no_zarrs:
        import zarrs  # noqa: F401

        zarr.config.set({"codec_pipeline.path": "zarrs.ZarrsCodecPipeline"})
    from annbatch import Loader

    root = zarr.open_group(args.store, mode="r")  # a directory, or s3://... (zarr's FsspecStore over s3fs)
    shards = [s["path"] for s in root.attrs["cellray"]["shards"]]
    datasets = [ad.io.sparse_dataset(zarr.open_group(f"{args.store.rstrip('/')}/{s}", mode="r")["X"]) for s in shards]
    loader = Loader(
        chunk_size=args.chunk_size,
        preload_nchunks=args.preload_nchunks,
        batch_size=args.batch_size,
        shuffle=True,
        drop_last=True,
        preload_to_gpu=False,
        rng=np.random.default_rng(0),
    ).add_datasets(datasets)
    rates, cpu = [], []
    for epoch in range(args.epochs + 1):  # epoch 0 warms up (imports, numba, first opens)
        t0, c0, cells = time.perf_counter(), time.process_time(), 0
        for batch in (b for _ in range(args.group) for b in loader):
            x = batch["X"]
            if args.transforms:
                x = x.astype(np.float32)
                lib = np.asarray(x.sum(axis=1)).ravel()
                x = x.multiply((1e4 / np.maximum(lib, 1e-12))[:, None]).tocsr()
                np.log1p(x.data, out=x.data)
                x = x.toarray()
            cells += x.shape[0]
        if epoch:
            rates.append(cells / (time.perf_counter() - t0))
            cpu.append((time.process_time() - c0) / cells)
    json.dump({"cells_per_s": rates, "cpu_s_per_cell": cpu, "n_cells": cells}, sys.stdout)
    print()


if __name__ == "__main__":
    main()
