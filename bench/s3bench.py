"""Loader throughput from a bucket: `python bench/loader.py --s3 [--quick] [--readme]` runs this.

The dataset (a) store (200k cells x 2k genes, one shard; 50k with --quick) is uploaded to a local S3 endpoint
(moto's server behind bench/s3proxy.py, on 127.0.0.1) and read by the in-process loader (batches of 4,096, random
order, CSR) from: local disk; the bucket with a cold node cache, with no added latency and with 20 ms added to every
request by the proxy; the bucket again in epoch 2 (the cache holds what epoch 1 fetched); and annbatch reading the
same bucket (zarr-python's FsspecStore over s3fs, in the peers venv). Each cold epoch runs with a fresh cache dir.
Requests and bytes per 1,000 cells are counted by the proxy (the server's side); read amplification is bytes fetched
in a cold epoch / the compressed bytes of the store's X. Each figure is a median over `--repeats` epochs.

The client choice: the same 512 random chunk ranges of the shard file fetched with obstore (`get_ranges`, what
cellray uses) and with s3fs (`cat_ranges`, what zarr's FsspecStore uses), 20 ms per request.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.procs import ROOT, median, peer_python  # noqa: E402
from bench.s3proxy import S3Endpoint  # noqa: E402

BUCKET = "cellray-bench"
KEY = "cellray-bench-key"
DELAY_S = 0.020
BATCH = 4096


def _env(endpoint: S3Endpoint) -> dict[str, str]:
    return {
        "AWS_ENDPOINT_URL": endpoint.url,
        "AWS_ACCESS_KEY_ID": KEY,
        "AWS_SECRET_ACCESS_KEY": "cellray-bench-secret",
        "AWS_REGION": "us-east-1",
        "AWS_ALLOW_HTTP": "true",
    }


def upload_store(store: Path, uri: str) -> None:
    """The local store's files under `uri`, committed the way cellray commits a store (root zarr.json last)."""
    from engine.objects import commit_tree, location, object_lock, prepare_prefix

    dest = location(uri)
    with object_lock(dest):
        prepare_prefix(dest, "zarr.json", overwrite=True)
        commit_tree(store, dest, "zarr.json")


def measure_child(store: str, options: dict) -> dict:
    """In a fresh process: cells/s of `epochs` epochs from `store` (after a warm-up), each right after an epoch of
    the same store on local disk (`options["local"]`), so both see the same machine load; `cold` gives each bucket
    epoch a new cache dir."""
    from engine.loading.loader import Loader
    from engine.loading.sampler import SamplerConfig
    from engine.objects import TRAFFIC

    plan = SamplerConfig(batch_size=BATCH, block_size=options["block_size"], buffer_blocks=options["buffer_blocks"])
    local = Loader(options["local"], plan, mode="local", output="csr")
    rates, local_rates, requests, loader = [], [], 0, None
    group = 1 if options["cold"] else options["group"]  # warm: groups of epochs, so a sample is not ~0.1 s

    def timed(ld, n: int) -> tuple[float, int]:
        t0, cells = time.perf_counter(), 0
        for batch in (b for _ in range(n) for b in ld):
            cells += batch["X"].shape[0]
        return cells / (time.perf_counter() - t0), cells

    for epoch in range(options["epochs"] + 1):  # the first warms up (numba, imports; the cache when not cold)
        if options["cold"] or loader is None:
            if loader is not None:
                loader.close()
            os.environ["CELLRAY_CACHE_DIR"] = tempfile.mkdtemp(prefix="cellray-bench-cache-")
            loader = Loader(store, plan, mode="local", output="csr")
        r0 = TRAFFIC["get_requests"]
        rate, cells = timed(loader, group if epoch else 1)
        if epoch:
            rates.append(rate)
            requests += TRAFFIC["get_requests"] - r0
            local_rates.append(timed(local, options["group"])[0])
    loader.close()
    local.close()
    return {"rates": rates, "local_rates": local_rates, "cells": cells, "requests_after_warmup": requests}


def _run_child(store: str, env: dict, **options) -> dict:
    cmd = [sys.executable, __file__, "--measure", store, json.dumps(options)]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **env})
    if out.returncode != 0:
        raise RuntimeError(f"loader run failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _annbatch(peer: str, uri: str, env: dict, block: int, buffer_blocks: int, epochs: int) -> dict:
    cmd = [peer, str(ROOT / "bench/peers/annbatch_loader.py"), uri, "--batch-size", str(BATCH),
           "--chunk-size", str(block), "--preload-nchunks", str(buffer_blocks), "--epochs", str(epochs)]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **env})
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1][:200] if out.stderr.strip() else "failed"}
    return {"rates": json.loads(out.stdout.strip().splitlines()[-1])["cells_per_s"]}


def client_choice(endpoint: S3Endpoint, uri: str, peer: str | None, n: int = 512) -> dict:
    """Seconds to fetch the same n random chunk ranges of the store's data file with obstore and with s3fs."""
    import numpy as np

    from engine import objects
    from engine.store.format import Store

    store = Store.open(uri)
    obj = store.array_path(0, "data") / "c" / "0"
    size = objects.head(obj)["size"]
    rng = np.random.default_rng(0)
    starts = np.sort(rng.choice(size - 40_000, n, replace=False))
    ends = starts + 30_000
    out = {"ranges": n}
    t0 = time.perf_counter()
    objects.read_ranges(obj, starts.tolist(), ends.tolist())
    out["obstore_s"] = time.perf_counter() - t0
    if peer:
        code = (
            "import sys, json, time, s3fs; s, e = json.loads(sys.argv[2]); fs = s3fs.S3FileSystem();"
            " t0 = time.perf_counter(); fs.cat_ranges([sys.argv[1]] * len(s), s, e); print(time.perf_counter() - t0)"
        )
        res = subprocess.run([peer, "-c", code, str(obj), json.dumps([starts.tolist(), ends.tolist()])],
                             capture_output=True, text=True, env={**os.environ, **_env(endpoint)})  # fmt: skip
        out["s3fs_s"] = float(res.stdout.strip().splitlines()[-1]) if res.returncode == 0 else None
    return out


def run(args, store: Path, block: int, buffer_blocks: int, label: str) -> dict:
    """Every figure of the --s3 comparison for one local store."""
    from engine import objects
    from engine.store.format import Store

    repeats = args.repeats or 3
    peer = peer_python()
    uri = f"s3://{BUCKET}/{store.name}"
    with S3Endpoint(access_key=KEY, bucket=BUCKET) as endpoint:
        env = _env(endpoint)
        os.environ.update(env)
        objects.reset_clients()
        upload_store(store, uri)
        s = Store.open(uri)
        x_bytes = sum(
            objects.head(o)["size"]
            for i in range(s.n_shards)
            for name in ("data", "indices", "indptr")
            for o in objects.list_objects(s.array_path(i, name))
        )
        res: dict = {"label": label, "n_cells": s.n_cells, "x_compressed_bytes": x_bytes}
        group = max(1, -(-400_000 // s.n_cells))
        plan = {"block_size": block, "buffer_blocks": buffer_blocks, "group": group}
        plan["local"] = str(store)
        for name, delay in (("bucket_cold", 0.0), ("bucket_cold_20ms", DELAY_S)):
            endpoint.set_delay(delay)
            endpoint.reset_counts()
            r = _run_child(uri, env, epochs=repeats, cold=True, **plan)
            epochs_fetched = repeats + 1  # every epoch, warm-up included, starts cold
            res[name], res[f"{name}_local"] = r["rates"], r["local_rates"]
            res[f"{name}_requests_per_1k"] = (
                (endpoint.counts["GET"] + endpoint.counts["HEAD"]) / epochs_fetched / r["cells"] * 1000
            )
            res[f"{name}_mb_per_1k"] = endpoint.counts["GET_bytes"] / epochs_fetched / r["cells"] * 1000 / 2**20
            res[f"{name}_amplification"] = endpoint.counts["GET_bytes"] / epochs_fetched / x_bytes
        endpoint.set_delay(DELAY_S)
        endpoint.reset_counts()
        cached = _run_child(uri, env, epochs=repeats, cold=False, **plan)
        res["bucket_cached_20ms"], res["bucket_cached_requests"] = cached["rates"], cached["requests_after_warmup"]
        res["bucket_cached_20ms_local"] = cached["local_rates"]
        res["local"] = res["bucket_cold_local"] + res["bucket_cold_20ms_local"] + res["bucket_cached_20ms_local"]
        res["annbatch_bucket_20ms"] = _annbatch(peer, uri, env, block, buffer_blocks, repeats) if peer else None
        endpoint.set_delay(0.0)
        res["annbatch_bucket"] = _annbatch(peer, uri, env, block, buffer_blocks, repeats) if peer else None
        endpoint.set_delay(DELAY_S)
        res["clients"] = client_choice(endpoint, uri, peer)
    return res


def vs_annbatch(cellray_rates, annbatch) -> str:
    if not annbatch or "rates" not in annbatch:
        return "zarr FsspecStore + s3fs"
    return f"zarr FsspecStore + s3fs; cellray cold is {median(cellray_rates) / median(annbatch['rates']):.1f}x this"


def table(r: dict) -> list[str]:
    loc = median(r["local"])

    def row(name: str, rates, note: str = "", paired=None) -> str:
        if rates is None:
            return f"| {name} | - | - | {note} |"
        if isinstance(rates, dict):
            if "error" in rates:
                return f"| {name} | could not read the bucket | - | {rates['error']} |"
            rates = rates["rates"]
        m = median(rates)
        # vs the local-disk epochs run beside these ones (same process, same load), where there are such
        vs = median([a / b for a, b in zip(rates, paired)]) if paired else m / loc
        return f"| {name} | {m / 1e3:,.0f}k | {vs:.2f}x | {note} |"

    amp = "{:.2f} requests, {:.2f} MB per 1,000 cells; read amplification {:.2f}x"
    lines = [
        "| read from | cells/s | vs local disk | requests, bytes |",
        "|---|---|---|---|",
        row("local disk", r["local"]),
        row("bucket, cold cache", r["bucket_cold"], amp.format(r["bucket_cold_requests_per_1k"],
            r["bucket_cold_mb_per_1k"], r["bucket_cold_amplification"]), r["bucket_cold_local"]),
        row("bucket + 20 ms/request, cold cache", r["bucket_cold_20ms"], amp.format(
            r["bucket_cold_20ms_requests_per_1k"], r["bucket_cold_20ms_mb_per_1k"],
            r["bucket_cold_20ms_amplification"]), r["bucket_cold_20ms_local"]),
        row("bucket + 20 ms, epoch 2+ (node cache)", r["bucket_cached_20ms"],
            f"{r['bucket_cached_requests']} requests after the warm-up epoch", r["bucket_cached_20ms_local"]),
        row("annbatch, same bucket", r["annbatch_bucket"], vs_annbatch(r["bucket_cold"], r["annbatch_bucket"])),
        row("annbatch, same bucket + 20 ms", r["annbatch_bucket_20ms"],
            vs_annbatch(r["bucket_cold_20ms"], r["annbatch_bucket_20ms"])),
    ]  # fmt: skip
    c = r["clients"]
    s3fs = f"{c['s3fs_s']:.2f} s" if c.get("s3fs_s") else "not measured"
    lines += ["", f"Client choice, {c['ranges']} chunk ranges of one shard file at 20 ms/request: obstore "
              f"{c['obstore_s']:.2f} s, s3fs {s3fs}."]  # fmt: skip
    return lines


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--measure":
        print(json.dumps(measure_child(sys.argv[2], json.loads(sys.argv[3]))))
        return
    raise SystemExit("run through: python bench/loader.py --s3 [--quick] [--readme]")


if __name__ == "__main__":
    main()
