"""Which compressor for X/data and X/indices: compression ratio and decode speed on real counts.

    python bench/codecs.py [--quick]

Reads the Kang PBMC counts (or synthetic data if absent), stores data (uint16) and CSR indices (uint16) with
each candidate, and times single-threaded decode of 64k-element chunks with numcodecs (the codec alone) and a
whole-array read through zarr-python (codec + zarr overhead). Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def load_counts(quick: bool):
    import anndata as ad

    p = Path.home() / ".cache" / "cellray-data" / "kang_ctrl.h5ad"
    if p.exists():
        a = ad.read_h5ad(p)
        name = "kang_ctrl"
    else:
        from engine.store.synthetic import synthetic_counts

        a = synthetic_counts(5000, 14000, 700)
        name = "synthetic"
    X = a.X[: 2000 if quick else None]
    return name, X.data.astype(np.uint16), X.indices.astype(np.uint16)


def main() -> None:
    import numcodecs
    import zarr
    from zarr.codecs import BloscCodec, ZstdCodec

    numcodecs.blosc.set_nthreads(1)
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    name, data, indices = load_counts(args.quick)
    chunk = 1 << 16
    candidates = {
        "blosc-lz4 bitshuffle": (
            numcodecs.Blosc("lz4", 5, numcodecs.Blosc.BITSHUFFLE),
            BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle"),
        ),
        "blosc-lz4 shuffle": (
            numcodecs.Blosc("lz4", 5, numcodecs.Blosc.SHUFFLE),
            BloscCodec(cname="lz4", clevel=5, shuffle="shuffle"),
        ),
        "blosc-zstd bitshuffle": (
            numcodecs.Blosc("zstd", 3, numcodecs.Blosc.BITSHUFFLE),
            BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle"),
        ),
        "zstd 3": (numcodecs.Zstd(3), ZstdCodec(level=3)),
    }
    rows = {}
    print(f"{name}: {len(data):,} non-zeros; decode of {chunk:,}-element chunks, one thread, median of 5")
    for label, (codec, zcodec) in candidates.items():
        row = {}
        for field, arr in (("data", data), ("indices", indices)):
            chunks = [arr[i : i + chunk] for i in range(0, len(arr), chunk)]
            enc = [codec.encode(c) for c in chunks]
            times = []
            for _ in range(5):
                t = time.perf_counter()
                for e in enc:
                    codec.decode(e)
                times.append(time.perf_counter() - t)
            z = zarr.create_array(
                zarr.storage.MemoryStore(),
                shape=arr.shape,
                dtype=arr.dtype,
                chunks=(chunk,),
                shards=(chunk * 64,),
                compressors=[zcodec],
            )
            z[:] = arr
            ztimes = []
            for _ in range(5):
                t = time.perf_counter()
                z[:]
                ztimes.append(time.perf_counter() - t)
            row[field] = {
                "ratio": arr.nbytes / sum(len(e) for e in enc),
                "decode_gb_s": arr.nbytes / statistics.median(times) / 1e9,
                "zarr_gb_s": arr.nbytes / statistics.median(ztimes) / 1e9,
            }
        rows[label] = row
        print(
            f"  {label:<22} data: x{row['data']['ratio']:.2f} {row['data']['decode_gb_s']:.2f} GB/s (zarr "
            f"{row['data']['zarr_gb_s']:.2f})"
            f"   indices: x{row['indices']['ratio']:.2f} {row['indices']['decode_gb_s']:.2f} GB/s (zarr "
            f"{row['indices']['zarr_gb_s']:.2f})"
        )
    print(
        json.dumps(
            {
                "dataset": name,
                "codecs": {
                    k: {f: {m: round(x, 3) for m, x in v.items()} for f, v in r.items()} for k, r in rows.items()
                },
            }
        )
    )


if __name__ == "__main__":
    main()
