"""Shuffle quality: how mixed a categorical obs key is within the Loader's batches, against truly random batches.

    python bench/shuffle.py [--batch-size 512] [--epochs 3] [--readme]

The worst case for a block shuffle: a real store whose cells lie *sorted* by the key (ingested without the ingest
shuffle, input after input, label after label). Its batches are cut from buffers of `buffer_blocks` blocks of
contiguous cells, so a block holds one label and a batch at most as many labels as its buffer has blocks; a truly
random batch draws its cells independently. The figure is the mean Shannon entropy (bits) of the key within a batch,
over every batch of `--epochs` epochs, over the mean for random batches of the same size (cells permuted freely),
for block sizes from one compressed chunk upward and the Loader's default (`auto_block_size`), twice: with the
default `buffer_blocks` (16: a larger block makes a larger buffer) and with a buffer of fixed size (as many cells as
the default block's buffer: a larger block means fewer blocks per buffer).

Dataset: the real Kang PBMC pair (../shared/data/fetch_real.sh; 13,999 cells x 14,053 genes). Its obs is empty but
for the input (`condition`: ctrl / stim, 2 labels), so the cells also get a `cluster` label: k-means (10 clusters) on
the PCA of log-normalised counts of the 2,000 most variable genes, a stand-in for cell types (PBMC clusters are
cell types). The store is sorted by cluster, then by condition within it.

Last line: one JSON object ({"rows": [...], "default_block": ..., ...}). --readme rewrites the table between the
`<!-- bench:shuffle -->` markers of README.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.loader import OUT, machine_note, real_kang, write_readme  # noqa: E402

KEYS = ("cluster", "condition")
BUFFER_BLOCKS = 16  # SamplerConfig's default


def batch_entropy(codes: np.ndarray) -> float:
    """Shannon entropy (bits) of the labels of one batch (code -1, missing, is a label of its own)."""
    _, counts = np.unique(codes, return_counts=True)
    p = counts / counts.sum()
    return float(-(p * np.log2(p)).sum())


def mean_batch_entropy(batches: list[np.ndarray]) -> float:
    return float(np.mean([batch_entropy(b) for b in batches]))


def random_batch_entropy(codes: np.ndarray, batch_size: int, repeats: int = 8, seed: int = 0) -> float:
    """Mean entropy of truly random batches: all cells permuted, cut into full batches, `repeats` times."""
    rng = np.random.default_rng(seed)
    n = len(codes) // batch_size * batch_size
    out = []
    for _ in range(repeats):
        perm = rng.permutation(codes)[:n].reshape(-1, batch_size)
        out.extend(batch_entropy(b) for b in perm)
    return float(np.mean(out))


def loader_entropies(
    store, keys, batch_size: int, block_size: int, buffer_blocks: int, epochs: int
) -> dict[str, float]:
    """Mean entropy of each key within the Loader's batches, over `epochs` epochs."""
    from engine.loading.loader import Loader
    from engine.loading.sampler import SamplerConfig

    plan = SamplerConfig(batch_size=batch_size, block_size=block_size, buffer_blocks=buffer_blocks)
    batches: dict[str, list[np.ndarray]] = {k: [] for k in keys}
    with Loader(store, plan, mode="local", output="csr", obs_keys=tuple(keys)) as loader:
        for e in range(epochs):
            loader.set_epoch(e)
            for b in loader:
                for k in keys:
                    batches[k].append(b[k].numpy())
    return {k: mean_batch_entropy(v) for k, v in batches.items()}


def sorted_kang_store() -> Path:
    """The Kang pair with a `cluster` label, sorted by (cluster, condition), ingested without the ingest shuffle."""
    store = OUT / "kang-sorted.store"
    if store.exists():
        return store
    import anndata as ad
    import scipy.sparse as sp
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA

    from engine.store.ingest import IngestConfig, ingest

    inputs = real_kang()
    if inputs is None:
        raise SystemExit("the Kang files are missing: run ../shared/data/fetch_real.sh first")
    parts = [ad.read_h5ad(p) for p in inputs]
    for a, p in zip(parts, inputs):
        a.obs["condition"] = p.stem.removeprefix("kang_")
    a = ad.concat(parts, index_unique="-")
    x = sp.csr_matrix(a.X, dtype=np.float32)
    x = sp.diags(1e4 / np.maximum(1.0, np.asarray(x.sum(axis=1)).ravel())) @ x
    x.data = np.log1p(x.data)
    mean = np.asarray(x.mean(axis=0)).ravel()
    var = np.asarray(x.multiply(x).mean(axis=0)).ravel() - mean**2
    top = np.argsort(-var)[:2000]
    pcs = PCA(30, random_state=0).fit_transform(x[:, top].toarray())
    a.obs["cluster"] = [f"c{c}" for c in KMeans(10, n_init=4, random_state=0).fit_predict(pcs)]
    order = np.lexsort((a.obs["condition"].to_numpy(), a.obs["cluster"].to_numpy()))
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / "kang-sorted.h5ad"
    a[order].copy().write_h5ad(path)
    ingest([path], store, IngestConfig(obs_keys=KEYS, shuffle=False, overwrite=True, executor="local"))
    return store


def run(args) -> dict:
    from engine.loading.sampler import auto_block_size
    from engine.store.format import Store

    path = sorted_kang_store()
    store = Store.open(path)
    m = store.manifest
    nnz = sum(s.nnz for s in m.shards)
    default = auto_block_size(m.n_cells, nnz, m.chunk_elements)
    chunk_cells = max(1, round(m.chunk_elements / (nnz / m.n_cells)))  # cells of one compressed chunk
    codes = {k: np.concatenate([store.obs_codes(s, k) for s in range(store.n_shards)]) for k in KEYS}
    random = {k: random_batch_entropy(codes[k], args.batch_size) for k in KEYS}
    blocks = sorted({chunk_cells * 2**i for i in range(8) if chunk_cells * 2**i <= 4096} | {default})
    buffer_cells = BUFFER_BLOCKS * default  # the default buffer, in cells
    rows = []
    for block in blocks:
        row = {"block": block, "chunks": block / chunk_cells, "default": block == default}
        # the default buffer (16 blocks: larger blocks, larger buffers), then a buffer of fixed size (as many cells
        # as the default's: larger blocks, fewer of them per buffer)
        for name, buffer_blocks in (("blocks16", BUFFER_BLOCKS), ("fixed", max(1, round(buffer_cells / block)))):
            got = loader_entropies(path, KEYS, args.batch_size, block, buffer_blocks, args.epochs)
            row.update({f"{name}_{k}_bits": got[k] for k in KEYS})
            row.update({f"{name}_{k}_ratio": got[k] / random[k] for k in KEYS})
        rows.append(row)
        mark = " default" if row["default"] else ""
        print(
            f"block {block:5d} cells ({block / chunk_cells:5.1f} chunks){mark}: x random, buffer of 16 blocks: "
            + ", ".join(f"{k} {row[f'blocks16_{k}_ratio']:.2f}" for k in KEYS)
            + f"; buffer of {buffer_cells} cells: "
            + ", ".join(f"{k} {row[f'fixed_{k}_ratio']:.2f}" for k in KEYS)
        )
    result = {
        "dataset": "kang sorted by cluster",
        "n_cells": m.n_cells,
        "batch_size": args.batch_size,
        "chunk_cells": chunk_cells,
        "default_block": default,
        "default_buffer_cells": buffer_cells,
        "random_bits": random,
        "rows": rows,
    }
    if args.readme:
        lines = [
            f"| block (cells) | chunks | buffer of 16 blocks: `cluster` | `condition` | buffer of {buffer_cells:,} "
            "cells: `cluster` | `condition` |",
            "|---:|---:|---:|---:|---:|---:|",
        ]
        for r in rows:
            mark = " (default)" if r["default"] else ""
            cells = [f"{r[f'{b}_{k}_ratio']:.2f}x" for b in ("blocks16", "fixed") for k in KEYS]
            lines.append(f"| {r['block']}{mark} | {r['chunks']:.1f} | " + " | ".join(cells) + " |")
        lines.append(
            f"| random batches | | 1.00x = {random['cluster']:.2f} bits | 1.00x = {random['condition']:.2f} bits "
            f"| 1.00x | 1.00x |"
        )
        write_readme("shuffle", lines, machine_note())
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--epochs", type=int, default=3, help="epochs per block size (each a new block order)")
    ap.add_argument("--readme", action="store_true", help="write the table into README.md")
    print(json.dumps(run(ap.parse_args())))


if __name__ == "__main__":
    main()
