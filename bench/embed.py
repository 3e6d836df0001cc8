"""Inference throughput: `cellray embed` (actor pool, parts written and committed) vs the same model in a plain
torch loop over an in-memory matrix, and scaling from 1 to 2 workers.

    python bench/embed.py [--quick] [--repeats N]

Data: a synthetic store (200,000 cells x 2,000 genes, ~100 non-zeros/cell; 50,000 x 1,000 with --quick), ingested
once into bench/out/. Model: the demo's VAE (n_hidden 128, n_latent 16), trained for 2 steps (speed does not
depend on the weights).
- cellray: `engine.infer.embed.run_embed` with executor ray, 1 and then 2 workers (1 CPU and 1 torch thread
  each), batch 1024, one part per store shard. Steady cells/s = cells / (last commit - first part start), from
  the commit records; end-to-end cells/s also counts the actors' start-up and the model load.
- peer: the same model, torch threads and batch size in a plain loop over the store's counts already in memory as
  a scipy CSR matrix (`X[a:b].toarray()` -> torch -> `model.embed`), results gathered in a list: no reading, no
  writing. It runs in a 1-CPU Ray task, so it gets the same process priority as the actors (Ray starts workers at
  nice 15). ratio = cellray steady cells/s (1 worker) / plain loop cells/s (goal >= 0.8).
Medians over --repeats runs. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

OUT = Path(__file__).resolve().parent / "out" / "embed"
BATCH = 1024
MODEL = {"name": "vae", "config": {"n_latent": 16, "n_hidden": 128}}


def make_store(n_cells: int, n_genes: int, nnz: int) -> Path:
    from engine.store.ingest import IngestConfig, ingest
    from engine.store.synthetic import synthetic_counts

    store = OUT / f"synthetic-{n_cells}x{n_genes}.store"
    if not (store / "zarr.json").exists():
        OUT.mkdir(parents=True, exist_ok=True)
        h5ad = OUT / f"synthetic-{n_cells}x{n_genes}.h5ad"
        synthetic_counts(n_cells, n_genes, nnz_per_cell=nnz, seed=0).write_h5ad(h5ad)
        ingest(
            [h5ad],
            store,
            IngestConfig(
                shard_cells=max(10_000, n_cells // 8), obs_keys=("cell_type",), overwrite=True, executor="local"
            ),
        )
        h5ad.unlink()
    return store


def make_checkpoint(store: Path) -> Path:
    from engine.train.driver import pretrain
    from jobs.spec import parse_spec

    out = OUT / f"vae-{store.stem}"
    if not list(out.glob("checkpoint_*")):
        pretrain(
            parse_spec(
                {
                    "kind": "pretrain",
                    "name": "bench-embed",
                    "data": {"store": str(store), "batch_size": 256},
                    "model": MODEL,
                    "train": {"max_steps": 2, "checkpoint_every": 2, "output": str(out)},
                    "resources": {"workers": 0},
                }
            )
        )
    return out


def cellray_run(checkpoint: Path, store: Path, workers: int) -> dict:
    from engine.infer.config import EmbedConfig
    from engine.infer.embed import run_embed

    out = OUT / f"emb-w{workers}.zarr"
    config = EmbedConfig(
        checkpoint=str(checkpoint),
        store=str(store),
        out=str(out),
        batch_size=BATCH,
        overwrite=True,
        executor="ray",
        resources={"workers": workers, "cpus_per_worker": 1},
    )
    t0 = time.perf_counter()
    res = run_embed(config)
    wall = time.perf_counter() - t0
    return {
        "steady_cells_per_s": res.cells_per_s,  # first part's start to last commit (EmbedResult.parts_seconds)
        "end_to_end_cells_per_s": res.n_cells / wall,
        "wall_s": wall,
        "parts": res.parts,
    }


def plain_loop(checkpoint: Path, store: Path) -> dict:
    """The same model over the counts already in memory, in a Ray task with one CPU: a Ray worker process like the
    actors (Ray starts its workers at nice 15; on a busy shared machine a nice-0 driver would get more CPU)."""
    import ray

    return ray.get(ray.remote(num_cpus=1)(_plain_loop).remote(str(checkpoint), str(store)))


def _plain_loop(checkpoint: str, store: str) -> dict:
    import os

    import numpy as np
    import scipy.sparse as sp
    import torch

    from engine.store.format import Store
    from engine.train.checkpoint import load_checkpoint

    torch.set_num_threads(1)  # what one actor with 1 CPU gets
    st = Store.open(store)
    X = sp.vstack([st.read_csr(s).to_scipy() for s in range(st.n_shards)]).tocsr()
    model, _ = load_checkpoint(checkpoint)
    t0 = time.perf_counter()
    out = []
    with torch.inference_mode():
        for a in range(0, X.shape[0], BATCH):
            x = torch.from_numpy(X[a : a + BATCH].toarray().astype(np.float32))
            out.append(model.embed({"X": x}).numpy())
    emb = np.concatenate(out)
    seconds = time.perf_counter() - t0
    assert emb.shape[0] == st.n_cells
    return {"cells_per_s": st.n_cells / seconds, "seconds": seconds, "nice": os.nice(0)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    import logging

    import ray

    logging.basicConfig(level=logging.WARNING)
    n_cells, n_genes, nnz = (50_000, 1_000, 50) if args.quick else (200_000, 2_000, 100)
    repeats = 1 if args.quick else args.repeats
    store = make_store(n_cells, n_genes, nnz)
    checkpoint = make_checkpoint(store)
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    try:
        runs = {"plain": [], "w1": [], "w2": []}
        for _ in range(repeats):  # interleaved, so load on the shared machine hits each alike
            runs["plain"].append(plain_loop(checkpoint, store))
            runs["w1"].append(cellray_run(checkpoint, store, 1))
            runs["w2"].append(cellray_run(checkpoint, store, 2))
    finally:
        ray.shutdown()
    med = lambda rs, k: statistics.median(r[k] for r in rs)  # noqa: E731
    plain = med(runs["plain"], "cells_per_s")
    w1, w2 = med(runs["w1"], "steady_cells_per_s"), med(runs["w2"], "steady_cells_per_s")
    w1_e2e, w2_e2e = med(runs["w1"], "end_to_end_cells_per_s"), med(runs["w2"], "end_to_end_cells_per_s")
    print(
        f"store: {n_cells} cells x {n_genes} genes, ~{nnz} non-zeros/cell, {runs['w1'][0]['parts']} parts; "
        f"VAE 128/16; batch {BATCH}; median of {repeats}"
    )
    print(f"plain torch loop, in memory, 1 thread : {plain:10,.0f} cells/s")
    print(f"cellray embed, 1 worker (steady)      : {w1:10,.0f} cells/s  ({w1 / plain:.2f}x the plain loop)")
    print(f"cellray embed, 2 workers (steady)     : {w2:10,.0f} cells/s  ({w2 / w1:.2f}x 1 worker)")
    print(f"end to end (actor start-up, model load): 1 worker {w1_e2e:,.0f} cells/s, 2 workers {w2_e2e:,.0f} cells/s")
    print(
        json.dumps(
            {
                "bench": "embed",
                "cells": n_cells,
                "genes": n_genes,
                "repeats": repeats,
                "plain_cells_per_s": round(plain),
                "cellray_1w_cells_per_s": round(w1),
                "cellray_2w_cells_per_s": round(w2),
                "ratio_1w_vs_plain": round(w1 / plain, 3),
                "scaling_2w_vs_1w": round(w2 / w1, 3),
                "end_to_end_1w_cells_per_s": round(w1_e2e),
                "end_to_end_2w_cells_per_s": round(w2_e2e),
            }
        )
    )


if __name__ == "__main__":
    main()
