"""Loader throughput: cellray (in-process threads and Ray reader actors) vs annbatch vs anndata backed h5ad.

    python bench/loader.py [--quick] [--repeats N] [--rounds N] [--readme]     the peer comparison
    python bench/loader.py --scaling [--readme]                                 CPU per cell vs store size and shards
    python bench/loader.py --multinode                                          3 ranks on 3 nodes vs on 1 node
    python bench/loader.py --profile STORE [STORE ...]                          one reader thread, profiled
    python bench/loader.py --s3 [--quick] [--readme]                            from a bucket (bench/s3bench.py)
    python bench/loader.py --mixing [--rounds N] [--readme]                     3 stores mixed 0.5/0.3/0.2
    python bench/loader.py --read-ahead [--rounds N] [--readme]                 the Loader's read-ahead, 2-4 buffers
    python bench/loader.py --per-call [--rounds N] [--readme]                   Ray mode, 2-16 buffers per actor call
    python bench/loader.py --prefetch [--rounds N] [--readme]                   the batch gather, rows prefetched or not
    python bench/loader.py --idle-ray [--rounds N] [--readme]                   in-process reading beside an idle Ray
    python bench/loader.py --threads [--quick] [--readme]                       reader threads vs processes

Same bytes for everyone: each dataset is ingested once into a cellray store (default --shard-size unless said);
annbatch's `Loader` (zarrs codec pipeline on, `chunk_size` = cellray's block size, `preload_nchunks` = cellray's
buffer in blocks) reads the very same shard arrays through anndata's sparse_dataset; anndata backed mode reads the
input h5ad with sorted random indices. Random order, batches of 4,096 cells, CSR output; then normalize_total(1e4) +
log1p + densify (annbatch gets the same steps in numpy/scipy). Each figure is the median over several samples
(samples of whole epochs, at least 2M cells: SAMPLE_CELLS) after a warm-up. Every loader is timed in a fresh
process with nothing of the bench's own running beside it: ingest starts and stops its own Ray, and Ray mode
starts its own in its process (`measure_loader`); `--idle-ray` measures what an idle Ray beside a loader costs.

Datasets: (a) synthetic 200k cells x 2,000 genes, ~100 non-zeros/cell, one shard of 200k cells (50k with --quick);
(b) synthetic 20k genes, ~1,500 non-zeros/cell (Tahoe-like; 40k cells); (c) the real Kang PBMC pair; (d) synthetic
640k cells x 2,000 genes in 64 shards. (b)-(d) are skipped with --quick.

Columns: `cpu` is CPU microseconds per cell of everything that loads: the loading process (all its threads) for
cellray local mode and annbatch; the consumer, its reader actors and the raylet for Ray mode. `verify` is what
checking each chunk's crc32c costs a reader: 1 - its CPU with checks off / on, each buffer read both ways back to
back in one reader thread (see `verify_cost`);
`decoded` is elements decompressed per element delivered; `decode 1c` the rate at which one core only decompresses
every chunk of the store once, `of lim` cellray's share of it. The loaders take turns (`--rounds`), so load from
other processes hits each alike; the CPU columns are the steadier figures on a shared machine.

--scaling: cellray local mode alone, CSR, over stores of 10k to 2M cells at the default --shard-size and a 2M-cell
store cut into 1 to 64 shards: CPU per cell must not grow with the store (no per-block cost that grows with it).

Last line: one JSON object (the default case, (a) with CSR output, plus `min_ratio_vs_annbatch` over every row).
--readme rewrites the table between the `<!-- bench:loader -->` (or `<!-- bench:loader-scaling -->`) markers of
README.md with this run's figures.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.procs import ROOT, median, peer_python, speed_probe  # noqa: E402

OUT = ROOT / "bench" / "out" / "loader"
BATCH = 4096
SAMPLE_CELLS = 2_000_000  # cells (whole epochs) per timed sample of the loader table, for every loader (compare)
TRANSFORMS = [{"normalize_total": {"target_sum": 1.0e4}}, "log1p", "densify"]
README = ROOT / "README.md"


def real_kang() -> list[Path] | None:
    for d in (Path(os.environ.get("CELLRAY_DATA", Path.home() / ".cache" / "cellray-data")), Path("/tmp/cellray-data")):
        files = [d / "kang_ctrl.h5ad", d / "kang_stim.h5ad"]
        if all(f.exists() for f in files):
            return files
    return None


def synthetic_input(name: str, n_cells: int, n_genes: int, nnz: int, seed: int = 0) -> Path:
    """A synthetic h5ad under bench/out/loader, made once."""
    path = OUT / f"{name}.h5ad"
    if not path.exists():
        from engine.store.synthetic import synthetic_counts

        OUT.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.h5ad")
        synthetic_counts(n_cells, n_genes, nnz_per_cell=nnz, seed=seed, dataset=name).write_h5ad(tmp)
        tmp.rename(path)
    return path


def make_store(name: str, inputs: list[Path], chunk_elements: int, shard_cells: int | None = None) -> Path:
    """The cellray store of `inputs`, ingested once (the default --shard-size unless shard_cells is given)."""
    from engine.store.format import FORMAT_VERSION, Store
    from engine.store.ingest import IngestConfig, ingest

    store = OUT / f"{name}-c{chunk_elements}.store"
    # a store of an older format lacks its checks (v2: chunk placement), so it would measure less than a new one
    if not store.exists() or Store.open(store).manifest.version < FORMAT_VERSION:
        obs_keys = () if name == "c_kang" else ("cell_type",)  # the Kang files carry no cell types
        cfg = IngestConfig(obs_keys=obs_keys, overwrite=True, chunk_elements=chunk_elements)
        if shard_cells:
            cfg = cfg.model_copy(update={"shard_cells": shard_cells})
        ingest(inputs, store, cfg)
    return store


def prepare(name: str, n_cells: int, n_genes: int, nnz: int, chunk_elements: int, shard_cells: int | None = None):
    """The dataset's input h5ad(s) and its cellray store, built once and kept under bench/out/loader."""
    if name == "c_kang":
        inputs = real_kang()
    else:
        inputs = [synthetic_input(name, n_cells, n_genes, nnz)]
    return make_store(name, inputs, chunk_elements, shard_cells), inputs


# ------------------------------------------------------------------------------------------------ measuring


def time_cellray(store: Path, mode: str, epochs: int, **kw) -> dict:
    """{"rates": cells/s per sample, "cpu": CPU s per cell per sample, "decoded": elements decoded / used}, from a
    fresh process (`measure_loader`), as annbatch's are."""
    return in_child("--measure-loader", {"store": str(store), "mode": mode, "epochs": epochs, **kw})


def measure_loader(store: str, mode: str, epochs: int, **kw) -> dict:
    """The child of `time_cellray`. No other Ray runs while a loader is timed (the parent starts none; ingest starts
    and stops its own): an idle embedded Ray, its services waking on these two cores, slows a reading process
    (`--idle-ray` measures it). Ray mode starts its own here, as a script of a user's would, and stops it after."""
    if mode == "local":
        return _time_loader(Path(store), mode, epochs, **kw)
    from engine.runtime import ray_session

    with ray_session(num_cpus=2):
        return _time_loader(Path(store), mode, epochs, **kw)


def _ray_processes(loader) -> list:
    """The processes that do a Ray-mode loader's work: this one, its reader actors, and this node's raylet."""
    import psutil

    procs = [psutil.Process()]
    procs += [psutil.Process(r.pid) for r in loader.reader_processes()]
    procs += [p for p in psutil.Process().children(recursive=True) if p.name() == "raylet"]
    return procs


def _cpu_seconds(procs) -> float:
    total = 0.0
    for p in procs:
        t = p.cpu_times()
        total += t.user + t.system
    return total


def _time_loader(
    store: Path, mode: str, epochs: int, group: int = 1, block_size: int | None = None, buffer_blocks: int = 16, **kw
) -> dict:
    from engine.loading.loader import Loader
    from engine.loading.sampler import SamplerConfig

    plan = SamplerConfig(batch_size=BATCH, block_size=block_size, buffer_blocks=buffer_blocks)
    loader = Loader(store, plan, mode=mode, **kw)
    rates, cpu, procs = [], [], None
    try:
        for epoch in range(epochs + 1):  # the first sample warms up (numba cache, torch import, file opens)
            if epoch and procs is None:
                procs = _ray_processes(loader) if mode == "ray" else []
            c0 = _cpu_seconds(procs) if procs else time.process_time()
            t0, cells = time.perf_counter(), 0
            for batch in (b for _ in range(group) for b in loader):
                cells += batch["X"].shape[0]
            if epoch:
                rates.append(cells / (time.perf_counter() - t0))
                cpu.append(((_cpu_seconds(procs) if procs else time.process_time()) - c0) / cells)
        stats = loader.decode_stats() if mode == "local" else {}
    finally:
        loader.close()
    decoded = stats["decoded"] / stats["used"] if stats.get("used") else None
    return {"rates": rates, "cpu": cpu, "decoded": decoded}


def time_annbatch(
    peer: str, store: Path, block: int, buffer_blocks: int, epochs: int, transforms: bool, group: int = 1
) -> dict:
    cmd = [peer, str(ROOT / "bench/peers/annbatch_loader.py"), str(store), "--batch-size", str(BATCH),
           "--chunk-size", str(block), "--preload-nchunks", str(buffer_blocks), "--epochs", str(epochs),
           "--group", str(group)]  # fmt: skip
    if transforms:
        cmd.append("--transforms")
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"annbatch run failed:\n{out.stderr[-3000:]}")
    res = json.loads(out.stdout.strip().splitlines()[-1])
    return {"rates": res["cells_per_s"], "cpu": res["cpu_s_per_cell"]}


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


def buffer_plans(store: Path, block: int, buffer_blocks: int, min_cells: int) -> list:
    """The loader's read plans (CSR, in-process) over as many epochs as hold `min_cells` cells."""
    from engine.loading.loader import Loader
    from engine.loading.sampler import SamplerConfig

    plan = SamplerConfig(batch_size=BATCH, block_size=block, buffer_blocks=buffer_blocks)
    with Loader(store, plan, mode="local", output="csr") as loader:
        plans, cells, epoch = [], 0, 0
        while cells < min_cells:
            for j in range(loader.sampler.n_buffers):
                plans.append(loader.sampler.buffer(epoch, j))
                cells += plans[-1].n_cells
            epoch += 1
    return plans


def placement_cost(store: Path, block: int, buffer_blocks: int, rounds: int = 3, min_cells: int = 200_000) -> dict:
    """What binding chunks to their place (format v3) costs a reader: 1 - CPU with the check off / CPU with it on.
    The check runs once per file, when a reader maps it, and readers keep their files mapped; here every buffer is
    read by a fresh reader, so every file it touches is mapped and checked again (the worst case). On and off back to
    back, the order alternating, as in `verify_cost` (thread CPU time, summed over `rounds` passes)."""
    import threading

    import engine.store.chunkfile as chunks
    from engine.loading.readers import BufferReader
    from engine.store.format import Store

    plans = buffer_plans(store, block, buffer_blocks, min_cells)
    opened = Store.open(store)
    cpu = {True: 0.0, False: 0.0}

    def run() -> None:
        try:
            warm = BufferReader(Store(opened.path, opened.manifest, opened.root), None, "csr")
            warm.read(plans[0])  # the process's first read loads the kernels (~1 s): timed, it went to one side
            warm.close()
            for r in range(rounds):
                for i, plan in enumerate(plans):
                    for flag in (True, False) if (i + r) % 2 else (False, True):
                        reader = BufferReader(Store(opened.path, opened.manifest, opened.root), None, "csr")
                        chunks.VERIFY_PLACEMENT = flag
                        t0 = time.thread_time()
                        reader.read(plan)
                        cpu[flag] += time.thread_time() - t0
                        reader.close()
        finally:
            chunks.VERIFY_PLACEMENT = True

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    return {"cost": 1 - cpu[False] / cpu[True], "cpu_on_s": cpu[True], "cpu_off_s": cpu[False]}


def placement(args: argparse.Namespace) -> None:
    """`--placement`: `placement_cost` on dataset (a) (one shard) and (d) (64 shards: many files per buffer)."""
    from engine.loading.loader import Loader
    from engine.loading.sampler import SamplerConfig
    from engine.store.format import DEFAULT_CHUNK_ELEMENTS

    n_a = 50_000 if args.quick else 200_000
    for name, n_cells, shard_cells in ((f"a_synth_{n_a // 1000}k", n_a, None), ("d_synth_640k_64shards", 640_000,
                                                                                 10_000)):  # fmt: skip
        store, _ = prepare(name, n_cells, 2_000, 100, args.chunk_elements or DEFAULT_CHUNK_ELEMENTS, shard_cells)
        with Loader(store, SamplerConfig(batch_size=BATCH, block_size=args.block_size), mode="local") as probe:
            block = probe.config.block_size
            buffer_blocks = max(probe.config.buffer_blocks, -(-BATCH // block))
        got = placement_cost(store, block, buffer_blocks)
        print(json.dumps({"bench": "loader-placement", "store": name, **{k: round(v, 4) for k, v in got.items()}}))


def verify_cost(store: Path, block: int, buffer_blocks: int, rounds: int = 3, min_cells: int = 200_000) -> dict:
    """What checking chunk checksums costs a reader, reading the loader's buffers in one reader thread:
    - "cost": 1 - CPU with checks off / CPU with checks on. Each buffer is read with checks on and off back to back,
      the order alternating from buffer to buffer, so load from other processes and cache warmth hit both alike
      (thread CPU time, summed over `rounds` passes). The checks run inside the decode kernel
      (`engine.store.chunk_kernel`), so this pairing is the one measure of them."""
    import threading

    import engine.store.chunkfile as chunks
    from engine.loading.readers import BufferReader

    plans = buffer_plans(store, block, buffer_blocks, min_cells)
    reader = BufferReader(store, None, "csr")
    cpu = {True: 0.0, False: 0.0}

    def run() -> None:
        reader.read(plans[0])
        try:
            for r in range(rounds):
                for i, plan in enumerate(plans):
                    for flag in (True, False) if (i + r) % 2 else (False, True):
                        chunks.VERIFY_CHECKSUMS = flag
                        t0 = time.thread_time()
                        reader.read(plan)
                        cpu[flag] += time.thread_time() - t0
        finally:
            chunks.VERIFY_CHECKSUMS = True

    thread = threading.Thread(target=run)  # a reader thread, as in local mode (blosc runs single-threaded there)
    thread.start()
    thread.join()
    reader.close()
    return {"cost": 1 - cpu[False] / cpu[True]}


def decode_limit(store: Path, passes: int = 3) -> float:
    """Cells/s when one core does nothing but decompress each chunk of X/data and X/indices once (best pass): the
    same decoder call as the reader (`engine.store.chunk_kernel`, a file's chunks per call, checksums not checked),
    into one reused buffer."""
    import numpy as np

    from engine.store import chunk_kernel
    from engine.store.chunkfile import ArrayReader
    from engine.store.format import Store

    s = Store.open(store)
    calls = []  # per file: (its map, kept alive; its chunks' addresses, sizes, checksum tails, decoded bytes)
    for shard in range(s.n_shards):
        for name in ("data", "indices"):
            r = ArrayReader.open(Path(s.where(shard, name)))
            lay = r.layout
            for file_id in range(-(-lay.n_chunks * lay.chunk_elems // lay.file_elems)):
                f = r.mapped_file(file_id)
                n = min(len(f.offsets), lay.n_chunks - file_id * (lay.file_elems // lay.chunk_elems))
                tail = np.full(n, 4 if lay.checksum else 0)
                calls.append((f, f.src[:n], f.size[:n], tail, np.full(n, lay.chunk_elems * lay.dtype.itemsize)))
    dest = np.empty(max(int(cb.sum()) for *_, cb in calls), dtype=np.uint8)
    calls = [(*c, dest.ctypes.data + np.cumsum(c[-1]).astype(np.uint64) - c[-1].astype(np.uint64)) for c in calls]
    best = float("inf")
    for _ in range(passes):
        t0 = time.perf_counter()
        for _f, src, size, tail, chunk_bytes, places in calls:
            if chunk_kernel.decode_blosc_at(src, size, tail, places, chunk_bytes, False) >= 0:
                raise RuntimeError(f"{store}: a chunk did not decode")
        best = min(best, time.perf_counter() - t0)
    return s.n_cells / best


# ------------------------------------------------------------------------------------------------ tables


def fmt_rate(v) -> str:
    return "-" if v is None else f"{v / 1e3:,.0f}k"


def fmt_us(v) -> str:
    return "-" if v is None else f"{v * 1e6:.2f}"


def ratio(a, b, digits: int = 2) -> float | None:
    return None if not a or not b else round(a / b, digits)


def compare_rows_markdown(rows: list[dict]) -> list[str]:
    head = (
        "| dataset | shards x cells | case | block x buffer | cellray | cellray (Ray actors) | annbatch | "
        "h5ad backed | vs annbatch | cpu µs/cell cellray / Ray / annbatch | verify | decoded | of lim |"
    )
    out = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        out.append(
            f"| {r['label']} | {r['shards']} x {r['cells_per_shard']:,} | {r['case']} | {r['block']} x "
            f"{r['buffer_blocks']} | {fmt_rate(r['cellray_local'])} | {fmt_rate(r['cellray_ray'])} | "
            f"{fmt_rate(r['annbatch'])} | {fmt_rate(r['h5ad'])} | "
            f"{'-' if r['ratio_vs_annbatch'] is None else str(r['ratio_vs_annbatch']) + 'x'} | "
            f"{fmt_us(r['cellray_cpu'])} / {fmt_us(r['cellray_ray_cpu'])} / {fmt_us(r['annbatch_cpu'])} | "
            f"{'-' if r['verify_cost'] is None else format(r['verify_cost'], '.1%')} | "
            f"{'-' if r['decoded'] is None else format(r['decoded'], '.2f') + 'x'} | "
            f"{r['cellray_local'] / r['decode_limit']:.0%} |"
        )
    return out


def write_readme(marker: str, lines: list[str], note: str) -> None:
    """Replace the text between `<!-- bench:MARKER -->` and `<!-- /bench:MARKER -->` in README.md."""
    text = README.read_text()
    start, end = f"<!-- bench:{marker} -->", f"<!-- /bench:{marker} -->"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    if not pattern.search(text):
        print(f"note: README.md has no {start} ... {end} markers; table not written")
        return
    block = "\n".join([start, note, "", *lines, end])
    README.write_text(pattern.sub(lambda _: block, text))
    print(f"README.md: table {marker} rewritten")


PROBE_AT_START: float | None = None  # `speed_probe()` when the run began (`main`)


def machine_note() -> str:
    """The README table's comment: the date, the machine, its load and its speed (`speed_probe`) at the start and
    the end of the run."""
    import platform

    import psutil

    load = os.getloadavg()[0]
    probe = f"{PROBE_AT_START:.2f} / " if PROBE_AT_START is not None else ""
    return (
        f"<!-- {time.strftime('%Y-%m-%d')}, {psutil.cpu_count()} cores, "
        f"{psutil.virtual_memory().total / 2**30:.0f} GiB, {platform.machine()}, load average {load:.1f} at the end "
        f"of the run, speed probe {probe}{speed_probe():.2f} ns (start / end; usual: 0.34) -->"
    )


# ------------------------------------------------------------------------------------------------ runs


def compare(args, peer: str | None) -> None:
    from engine.loading.loader import Loader
    from engine.loading.sampler import SamplerConfig
    from engine.store.format import DEFAULT_CHUNK_ELEMENTS, Store

    repeats, rounds = args.repeats or 3, args.rounds or 2
    chunk_elements = args.chunk_elements or DEFAULT_CHUNK_ELEMENTS
    n_a = 50_000 if args.quick else 200_000
    # (name, label, cells, genes, nnz per cell, cells per shard or None for the default --shard-size)
    datasets = [(f"a_synth_{n_a // 1000}k", f"(a) synthetic {n_a // 1000}k x 2k", n_a, 2_000, 100, None)]
    if not args.quick:
        datasets.append(("b_tahoe_like_40k", "(b) Tahoe-like 40k x 20k", 40_000, 20_000, 1_500, None))
        if real_kang():
            datasets.append(("c_kang", "(c) Kang", 0, 0, 0, None))
        datasets.append(("d_synth_640k_64shards", "(d) synthetic 640k x 2k, 64 shards", 640_000, 2_000, 100, 10_000))
    prepared = [prepare(name, n_cells, n_genes, nnz, chunk_elements, shard_cells)
                for name, _, n_cells, n_genes, nnz, shard_cells in datasets]  # fmt: skip
    rows = []
    for (name, label, *_), (store, inputs) in zip(datasets, prepared):
        s = Store.open(store)
        probe = Loader(store, SamplerConfig(batch_size=BATCH, block_size=args.block_size), mode="local")
        block = probe.config.block_size
        # a buffer holds at least one batch (cellray rounds it up; annbatch refuses less): same count for both
        default_blocks = SamplerConfig.model_fields["buffer_blocks"].default
        buffer_blocks = max(args.buffer_blocks or default_blocks, -(-BATCH // block))
        probe.close()
        # a sample is whole epochs of at least SAMPLE_CELLS, for every loader: an epoch of (a) takes cellray ~25 ms,
        # where a stall of a few ms (Ray's own processes wake on this machine's two cores) moved one sample 20-30%;
        # and Ray mode's batches come a call at a time (8 buffers, 131k cells of (a)), so a sample spans many calls
        group = max(1, -(-SAMPLE_CELLS // s.n_cells))
        kw = dict(block_size=block, buffer_blocks=buffer_blocks, group=group)
        cases = [("CSR", dict(output="csr"), False)]
        if name.startswith("a_") and not args.no_transforms:
            cases.append(("normalize+log1p+dense", dict(output="dense", transforms=TRANSFORMS), True))
        limit = decode_limit(store)
        checks = verify_cost(store, block, buffer_blocks)  # what checksums cost the CSR reads
        for label_case, opts, with_t in cases:
            got: dict[str, list] = {k: [] for k in ("local", "local_cpu", "ray", "ray_cpu", "annbatch",
                                                     "annbatch_cpu", "decoded")}  # fmt: skip
            for _ in range(rounds):  # all loaders in turn, so a load spike from elsewhere hits each alike
                res = time_cellray(store, "local", repeats, **kw, **opts)
                got["local"] += res["rates"]
                got["local_cpu"] += res["cpu"]
                got["decoded"].append(res["decoded"])
                if not args.no_ray:
                    res = time_cellray(store, "ray", repeats, **kw, **opts)
                    got["ray"] += res["rates"]
                    got["ray_cpu"] += res["cpu"]
                if peer:
                    res = time_annbatch(peer, store, block, buffer_blocks, repeats, with_t, group)
                    got["annbatch"] += res["rates"]
                    got["annbatch_cpu"] += res["cpu"]
            m = {k: (median(v) if v and None not in v else None) for k, v in got.items()}
            rows.append(
                {
                    "dataset": name,
                    "label": label,
                    "case": label_case,
                    "shards": s.n_shards,
                    "cells_per_shard": max(i.n_cells for i in s.manifest.shards),
                    "block": block,
                    "buffer_blocks": buffer_blocks,
                    "chunk_elements": chunk_elements,
                    "epochs_per_sample": group,
                    "cellray_local": m["local"],
                    "cellray_cpu": m["local_cpu"],
                    "cellray_ray": m["ray"],
                    "cellray_ray_cpu": m["ray_cpu"],
                    "annbatch": m["annbatch"],
                    "annbatch_cpu": m["annbatch_cpu"],
                    "h5ad": median(time_h5ad(inputs, 2)) if not with_t else None,
                    "decode_limit": limit,
                    "decoded": m["decoded"],
                    "verify_cost": None if with_t else round(checks["cost"], 4),
                    "ratio_vs_annbatch": ratio(m["local"], m["annbatch"]),
                    "cpu_ratio_vs_annbatch": ratio(m["annbatch_cpu"], m["local_cpu"]),
                    "ray_vs_local": ratio(m["ray"], m["local"]),
                    "ray_cpu_vs_local": ratio(m["ray_cpu"], m["local_cpu"]),
                }
            )

    print(
        f"\nrandom-order batches of {BATCH} cells; cells/s, median of {rounds} x {repeats} epochs (h5ad: 2 x 12 "
        "batches); cpu: CPU µs per cell (local: the loading process; Ray: consumer + readers + raylet)"
    )
    print(
        f"{'dataset':<24}{'shards':>7}{'case':>7}{'block x buf':>12}{'cellray':>9}{'(ray)':>8}{'annbatch':>9}"
        f"{'h5ad':>7}{'vs annb':>8}{'cpu cr':>7}{'ray':>6}{'ab':>6}{'verify':>7}{'decoded':>8}{'decode 1c':>10}"
        f"{'of lim':>7}"
    )
    for r in rows:
        print(
            f"{r['dataset'][:23]:<24}{r['shards']:>7}{r['case'][:6]:>7}"
            f"{str(r['block']) + ' x ' + str(r['buffer_blocks']):>12}{fmt_rate(r['cellray_local']):>9}"
            f"{fmt_rate(r['cellray_ray']):>8}{fmt_rate(r['annbatch']):>9}{fmt_rate(r['h5ad']):>7}"
            f"{'-' if r['ratio_vs_annbatch'] is None else str(r['ratio_vs_annbatch']) + 'x':>8}"
            f"{fmt_us(r['cellray_cpu']):>7}{fmt_us(r['cellray_ray_cpu']):>6}{fmt_us(r['annbatch_cpu']):>6}"
            f"{'-' if r['verify_cost'] is None else format(r['verify_cost'], '.1%'):>7}"
            f"{'-' if r['decoded'] is None else format(r['decoded'], '.2f') + 'x':>8}"
            f"{fmt_rate(r['decode_limit']):>10}{r['cellray_local'] / r['decode_limit']:>7.0%}"
        )
    table = compare_rows_markdown(rows)
    print("\n" + "\n".join(table))
    if args.readme:
        write_readme("loader", table, machine_note())
    d = rows[0]
    ratios = [(r["ratio_vs_annbatch"], f"{r['dataset']} {r['case']}") for r in rows if r["ratio_vs_annbatch"]]
    verify = [r["verify_cost"] for r in rows if r["verify_cost"] is not None]
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
        "ratio_vs_annbatch": d["ratio_vs_annbatch"],
        "cpu_ratio_vs_annbatch": d["cpu_ratio_vs_annbatch"],
        "ray_vs_local": d["ray_vs_local"],
        "ray_cpu_vs_local": d["ray_cpu_vs_local"],
        "verify_cost": d["verify_cost"],
        "max_verify_cost": max(verify) if verify else None,
        "decode_limit_cells_per_s": round(d["decode_limit"]),
        "min_ratio_vs_annbatch": min(ratios)[0] if ratios else None,
        "min_ratio_case": min(ratios)[1] if ratios else None,
        "load_average": round(os.getloadavg()[0], 1),
        "rows": rows,
    }
    print(json.dumps(summary))


def scaling(args) -> None:
    """CPU per cell over store size (default --shard-size) and over shard count (one 2M-cell input)."""
    from engine.store.format import DEFAULT_CHUNK_ELEMENTS, Store

    repeats, rounds = args.repeats or 3, args.rounds or 2
    chunk_elements = args.chunk_elements or DEFAULT_CHUNK_ELEMENTS
    # inputs: 500k-cell parts (2M = 4 parts), plus small ones; same genes, so they ingest into one vocabulary
    parts = [synthetic_input(f"scale_part{i}_500k", 500_000, 2_000, 100, seed=10 + i) for i in range(4)]
    small = {n: synthetic_input(f"scale_{n // 1000}k", n, 2_000, 100, seed=1) for n in (10_000, 50_000, 200_000)}
    stores = []  # (axis, store)
    for n in (10_000, 50_000, 200_000):
        stores.append(("cells", make_store(f"scale_{n // 1000}k", [small[n]], chunk_elements)))
    stores.append(("cells", make_store("scale_1000k", parts[:2], chunk_elements)))
    stores.append(("cells", make_store("scale_2000k", parts, chunk_elements)))
    for n_shards in (1, 8, 64):
        stores.append(("shards", make_store(f"scale_2000k_{n_shards}shards", parts, chunk_elements,
                                            shard_cells=-(-2_000_000 // n_shards))))  # fmt: skip
    # rounds outermost, every store in turn: a slow spell of the machine hits each store alike, not one store's samples
    samples: dict[Path, dict[str, list]] = {store: {"rates": [], "cpu": []} for _, store in stores}
    for _ in range(rounds):
        for _, store in stores:
            group = max(1, -(-400_000 // Store.open(store).n_cells))  # samples of >= 400k cells
            r = time_cellray(store, "local", repeats, output="csr", block_size=args.block_size, group=group)
            samples[store]["rates"] += r["rates"]
            samples[store]["cpu"] += r["cpu"]
    rows = []
    for axis, store in stores:
        s = Store.open(store)
        res = samples[store]
        rows.append(
            {
                "axis": axis,
                "store": store.name,
                "cells": s.n_cells,
                "shards": s.n_shards,
                "cells_per_shard": max(i.n_cells for i in s.manifest.shards),
                "cells_per_s": median(res["rates"]),
                "cpu_s_per_cell": median(res["cpu"]),
            }
        )
        print(f"{store.name:<32}{s.n_cells:>10,}{s.n_shards:>5}{fmt_us(rows[-1]['cpu_s_per_cell']):>7} µs/cell"
              f"{fmt_rate(rows[-1]['cells_per_s']):>9} cells/s", flush=True)  # fmt: skip
    base = min(r["cpu_s_per_cell"] for r in rows)
    lines = [
        "| store | cells | shards x cells per shard | CPU µs/cell | cells/s | CPU vs the cheapest |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        what = "default --shard-size" if r["axis"] == "cells" else f"{r['shards']} shards"
        lines.append(
            f"| {what} | {r['cells']:,} | {r['shards']} x {r['cells_per_shard']:,} | {fmt_us(r['cpu_s_per_cell'])} | "
            f"{fmt_rate(r['cells_per_s'])} | {r['cpu_s_per_cell'] / base:.2f}x |"
        )
    print("\n" + "\n".join(lines))
    if args.readme:
        write_readme("loader-scaling", lines, machine_note())
    spread = max(r["cpu_s_per_cell"] for r in rows) / base
    print(json.dumps({"bench": "loader-scaling", "max_cpu_per_cell_vs_min": round(spread, 3),
                      "load_average": round(os.getloadavg()[0], 1), "rows": rows}))  # fmt: skip


MULTINODE_DRIVER = r"""
import json, sys, time
import psutil, ray
from ray.cluster_utils import Cluster

store, n_nodes, world, epochs = sys.argv[1], int(sys.argv[2]), 3, int(sys.argv[3])
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
try:
    per_node = [[r for r in range(world) if r % n_nodes == k] for k in range(n_nodes)]
    for ranks in per_node:
        cluster.add_node(num_cpus=len(ranks), resources={f"rank{r}": 1 for r in ranks})
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="ERROR")

    @ray.remote(num_cpus=0.25)
    class Rank:
        def run(self, rank):
            from engine.loading.loader import Loader

            from engine.loading.readers import ReadOptions
            from engine.loading.sampler import SamplerConfig

            loader = Loader(store, SamplerConfig(batch_size=4096), rank=rank, world_size=world, mode="ray",
                            output="csr", reading=ReadOptions(readers=1, cpus_per_reader=0.5))
            for _ in loader:  # warm-up: readers started, caches and numba loaded
                pass
            readers = loader.reader_processes()
            procs = [psutil.Process()] + [psutil.Process(r.pid) for r in readers]
            cpu0 = sum(sum(p.cpu_times()[:2]) for p in procs)
            cells = sum(b["X"].shape[0] for _ in range(epochs) for b in loader)
            cpu = sum(sum(p.cpu_times()[:2]) for p in procs) - cpu0
            same = [r.node_id == ray.get_runtime_context().get_node_id() for r in readers]
            loader.close()
            return {"cells": cells, "cpu": cpu, "readers_on_rank_node": all(same)}

    ranks = [Rank.options(resources={f"rank{r}": 0.01}).remote() for r in range(world)]
    out = ray.get([a.run.remote(r) for r, a in enumerate(ranks)])
    print(json.dumps({"cpu_s_per_cell": sum(o["cpu"] for o in out) / sum(o["cells"] for o in out),
                      "readers_on_rank_node": all(o["readers_on_rank_node"] for o in out)}))
finally:
    ray.shutdown()
    cluster.shutdown()
"""


def profile(stores: list[str], top: int = int(os.environ.get("PROFILE_TOP", 8))) -> None:
    """CPU per cell of one reader thread (`BufferReader.read`, CSR, the Loader's default block and buffer) over two
    epochs of each store, and where it goes (cProfile, by own time). Stores: paths, or names under bench/out/loader
    (built by the default run and `--scaling`). Shows what a store's size costs per call: the README's L3 note."""
    import cProfile
    import pstats
    import threading

    from engine.loading.loader import Loader
    from engine.loading.readers import BufferReader
    from engine.loading.sampler import SamplerConfig

    rows = []
    for name in stores:
        path = Path(name) if Path(name).exists() else OUT / name
        loader = Loader(path, SamplerConfig(batch_size=BATCH), mode="local", output="csr")
        plans = [loader.sampler.buffer(e, j) for e in range(2) for j in range(loader.sampler.n_buffers)]
        reader = BufferReader(loader.store, None, "csr")
        result: dict = {}

        def run(reader: BufferReader, plans: list, result: dict) -> None:
            reader.read(plans[0])  # warm: files mapped, indptr cached
            prof = cProfile.Profile()
            t0 = time.thread_time()
            prof.enable()
            cells = sum(p.n_cells for p in plans if reader.read(p) is not None)
            prof.disable()
            result["cpu_us_per_cell"] = (time.thread_time() - t0) / cells * 1e6
            stats = pstats.Stats(prof).stats  # (file, line, function) -> (calls, ncalls, own time, cumulative, ...)
            total = sum(v[2] for v in stats.values())
            ranked = sorted(stats.items(), key=lambda kv: -kv[1][2])[:top]
            result["own_time_share"] = {f"{k[2]} ({Path(k[0]).name})": round(v[2] / total, 3) for k, v in ranked}

        thread = threading.Thread(target=run, args=(reader, plans, result))  # a reader thread, as in local mode
        thread.start()
        thread.join()
        reader.close()
        loader.close()
        cells = loader.store.n_cells
        print(f"{path.name}: {cells:,} cells, {loader.store.n_shards} shards: {result['cpu_us_per_cell']:.2f} µs/cell")
        for fn, share in result["own_time_share"].items():
            print(f"    {share:6.1%}  {fn}")
        rows.append({"store": path.name, "cells": cells, "shards": loader.store.n_shards, **result})
    print(json.dumps({"bench": "loader-profile", "rows": rows}))


def from_bucket(args) -> None:
    """--s3: dataset (a) read from a local S3 endpoint (bench/s3bench.py)."""
    from bench import s3bench
    from engine.loading.loader import Loader
    from engine.loading.sampler import SamplerConfig
    from engine.store.format import DEFAULT_CHUNK_ELEMENTS

    n_a = 50_000 if args.quick else 200_000
    store, _ = prepare(f"a_synth_{n_a // 1000}k", n_a, 2_000, 100, args.chunk_elements or DEFAULT_CHUNK_ELEMENTS)
    with Loader(store, SamplerConfig(batch_size=BATCH, block_size=args.block_size), mode="local") as probe:
        block, buffer_blocks = (
            probe.config.block_size,
            max(probe.config.buffer_blocks, -(-BATCH // probe.config.block_size)),
        )
    result = s3bench.run(args, store, block, buffer_blocks, f"(a) synthetic {n_a // 1000}k x 2k")
    lines = s3bench.table(result)
    print("\n".join(lines))
    print(json.dumps(result))
    if args.readme:
        write_readme("loader-s3", lines, machine_note())


def measure_reads(store: Path, threads: int, block: int, buffer_blocks: int, seconds: float, start: float) -> dict:
    """`threads` threads of this process, sharing one `BufferReader` as the Loader's threads do, each reading
    buffers (CSR) in turn for `seconds` from wall-clock time `start`: cells/s and cores used. Reads only: no
    consumer, no hand-over."""
    import threading

    from engine.loading.readers import BufferReader

    plans = buffer_plans(store, block, buffer_blocks, min_cells=1)  # one epoch
    reader = BufferReader(store, None, "csr")
    cells = [0] * threads

    def work(i: int) -> None:
        j, until = i, start + seconds
        while time.time() < until:
            plan = plans[j % len(plans)]
            reader.read(plan)
            cells[i] += plan.n_cells
            j += threads

    reader.read(plans[0])  # warm: files mapped, kernels loaded
    time.sleep(max(0.0, start - time.time()))
    t0, c0 = time.perf_counter(), time.process_time()
    pool = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    wall = time.perf_counter() - t0
    reader.close()
    return {"cells_per_s": sum(cells) / wall, "cores": (time.process_time() - c0) / wall}


def thread_scaling(args) -> None:
    """--threads: reader threads against reader processes on dataset (a), reads only, for blocks of 256, 1,024 (the
    default) and 4,096 cells at the default buffer's cells: one thread; two threads of one process (the Loader's
    local mode); two processes of one thread each (what Ray's reader actors are). Two threads short of two processes
    is time spent waiting for each other, the GIL above all."""
    from engine.store.format import DEFAULT_CHUNK_ELEMENTS

    n_a = 50_000 if args.quick else 200_000
    store, _ = prepare(f"a_synth_{n_a // 1000}k", n_a, 2_000, 100, args.chunk_elements or DEFAULT_CHUNK_ELEMENTS)
    seconds = 3.0 if args.quick else 8.0

    def run(threads: int, processes: int, block: int, buffer_blocks: int) -> dict:
        start = time.time() + 8.0  # every process imported and warm before the clock starts
        kw = json.dumps({"threads": threads, "block": block, "buffer_blocks": buffer_blocks, "seconds": seconds,
                         "start": start})  # fmt: skip
        procs = [subprocess.Popen([sys.executable, __file__, "--measure-reads", str(store), kw],
                                  stdout=subprocess.PIPE, text=True) for _ in range(processes)]  # fmt: skip
        outs = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
        return {k: sum(o[k] for o in outs) for k in ("cells_per_s", "cores")}

    rows = []
    for block, buffer_blocks in ((256, 64), (1024, 16), (4096, 4)):
        one, threads, processes = (
            run(1, 1, block, buffer_blocks),
            run(2, 1, block, buffer_blocks),
            run(1, 2, block, buffer_blocks),
        )
        rows.append({"block": block, "buffer_blocks": buffer_blocks, "one": one, "threads": threads,
                     "processes": processes})  # fmt: skip
    lines = [
        "| block x buffer | 1 thread | 2 threads, 1 process | 2 processes x 1 thread | threads vs 1 | processes vs 1 |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        base = r["one"]["cells_per_s"]
        cell = [f"{fmt_rate(r[k]['cells_per_s'])} ({r[k]['cores']:.2f} cores)" for k in ("one", "threads", "processes")]
        lines.append(f"| {r['block']} x {r['buffer_blocks']}{' (default)' if r['block'] == 1024 else ''} | "
                     f"{' | '.join(cell)} | {r['threads']['cells_per_s'] / base:.2f}x | "
                     f"{r['processes']['cells_per_s'] / base:.2f}x |")  # fmt: skip
    print("\n".join(lines))
    print(json.dumps({"bench": "loader-threads", "rows": rows}))
    if args.readme:
        write_readme("loader-threads", lines, machine_note())


def multinode(args) -> None:
    """3 ranks in Ray mode on a 3-node `ray.cluster_utils.Cluster` (all on this host) vs the same 3 ranks on one
    node: total CPU per cell of the ranks and their readers. Readers beside their rank make both the same work."""
    from engine.store.format import DEFAULT_CHUNK_ELEMENTS

    store, _ = prepare("a_synth_200k", 200_000, 2_000, 100, args.chunk_elements or DEFAULT_CHUNK_ELEMENTS)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    got: dict[int, list[float]] = {1: [], 3: []}
    for _ in range(args.rounds or 2):
        for n_nodes in (1, 3):
            out = subprocess.run([sys.executable, "-c", MULTINODE_DRIVER, str(store), str(n_nodes),
                                  str(args.repeats or 3)], capture_output=True, text=True, env=env)  # fmt: skip
            if out.returncode != 0:
                raise RuntimeError(f"multi-node run failed:\n{out.stderr[-3000:]}")
            res = json.loads(out.stdout.strip().splitlines()[-1])
            assert res["readers_on_rank_node"], "a reader actor ran off its rank's node"
            got[n_nodes].append(res["cpu_s_per_cell"])
    one, three = median(got[1]), median(got[3])
    print(f"3 ranks, Ray readers, (a): CPU {fmt_us(one)} µs/cell on 1 node, {fmt_us(three)} on 3 nodes "
          f"({three / one:.2f}x)")  # fmt: skip
    print(json.dumps({"bench": "loader-multinode", "cpu_s_per_cell_1_node": one, "cpu_s_per_cell_3_nodes": three,
                      "ratio": round(three / one, 3), "load_average": round(os.getloadavg()[0], 1)}))  # fmt: skip


def timed_read(loader, want: int | None = None, keep=None, cpu=time.process_time) -> tuple[float, float]:
    """Whole epochs of a Loader until at least `want` cells (None: one epoch): (cells/s, CPU µs per cell by `cpu()`,
    seconds: this process's by default). `keep(batch)` sees each batch. Each epoch ends where the Loader keeps what
    it read ahead for the next: a sample stopped mid-epoch would start the next one cold and leave its reads ahead
    running into another loader's sample."""
    t0, c0, cells = time.perf_counter(), cpu(), 0
    while cells < (want or 1):
        for batch in loader:
            cells += batch["X"].shape[0]
            if keep is not None:
                keep(batch)
    return cells / (time.perf_counter() - t0), (cpu() - c0) / cells * 1e6


def in_child(flag: str, kw: dict) -> dict:
    """A measurement run in a fresh process of this script (`main` dispatches `flag`): its last line, as JSON."""
    out = subprocess.run([sys.executable, __file__, flag, json.dumps(kw)], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{flag} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def sample_stores(args) -> dict[str, Path]:
    """The four datasets of --read-ahead, --per-call and --prefetch (Kang where its files are), built once: name ->
    store."""
    from engine.store.format import DEFAULT_CHUNK_ELEMENTS

    chunk = args.chunk_elements or DEFAULT_CHUNK_ELEMENTS
    specs = [("a_synth_200k", 200_000, 2_000, 100, None), ("b_tahoe_like_40k", 40_000, 20_000, 1_500, None),
             ("c_kang", 0, 0, 0, None), ("d_synth_640k_64shards", 640_000, 2_000, 100, 10_000)]  # fmt: skip
    return {name: prepare(name, n, g, nnz, chunk, sc)[0] for name, n, g, nnz, sc in specs
            if name != "c_kang" or real_kang()}  # fmt: skip


# ------------------------------------------------------------------------------------------------ per call

PER_CALL = (2, 4, 8, 16)  # buffers per reader-actor call; the default is 1-8, by read_ahead_bytes_per_reader


def per_call(args) -> None:
    """--per-call: the Loader in Ray mode (2 reader actors, CSR, default plan) with 2, 4, 8 and 16 buffers per actor
    call (each with its default read-ahead, two calls per actor), taking turns, on each dataset: cells/s and CPU per
    cell of the consumer, its actors and the raylet, medians of the rounds (samples as --read-ahead's)."""
    from engine.loading.loader import Loader
    from engine.loading.readers import ReadOptions
    from engine.loading.sampler import SamplerConfig

    rows = {}
    for name, store in sample_stores(args).items():
        want = READ_AHEAD_CELLS[name]
        samples: dict[int, list[tuple[float, float]]] = {b: [] for b in PER_CALL}
        for _ in range(args.rounds or 3):
            for b in PER_CALL:  # one Loader at a time: 2 actors of 0.5 CPU each, on a Ray of 2 CPUs
                loader = Loader(store, SamplerConfig(batch_size=BATCH), mode="ray", output="csr",
                                reading=ReadOptions(buffers_per_call=b))  # fmt: skip
                try:
                    timed_read(loader, want // 4)  # warm: actors started, files mapped, read-ahead full
                    procs = _ray_processes(loader)
                    samples[b].append(timed_read(loader, want, cpu=lambda procs=procs: _cpu_seconds(procs)))
                finally:
                    loader.close()
        probe = Loader(store, SamplerConfig(batch_size=BATCH), mode="ray", output="csr")  # the default's choice
        rows[name] = {"default": probe.reading.buffers_per_call,
                      "read_ahead_mb": probe.prefetch * BATCH * probe.bytes_per_cell() / 2**20}  # fmt: skip
        probe.close()
        rows[name].update({str(b): {"cells_per_s": median([x[0] for x in v]), "cpu_us": median([x[1] for x in v])}
                           for b, v in samples.items()})  # fmt: skip
    lines = [
        "| dataset | " + " | ".join(f"{b} per call" for b in PER_CALL) + " | 8 vs 2 | default (read-ahead) |",
        "|---|" + "---|" * (len(PER_CALL) + 2),
    ]
    for name, r in rows.items():
        cells = [f"{fmt_rate(r[str(b)]['cells_per_s'])} ({r[str(b)]['cpu_us']:.2f} µs)" for b in PER_CALL]
        gain = r["8"]["cells_per_s"] / r["2"]["cells_per_s"]
        default = f"{r['default']} ({r['read_ahead_mb']:,.0f} MB)"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {gain:.2f}x | {default} |")
    print("\n".join(lines))
    if args.readme:
        write_readme("loader-per-call", lines, machine_note())
    print(json.dumps({"bench": "loader-per-call", "rows": rows}))


# ------------------------------------------------------------------------------------------------ read-ahead

READ_AHEAD = (2, 3, 4)  # buffers read ahead of the consumer; the default with 2 reader threads is 4
# cells a sample (whole epochs, ~1 s each): a sample that stopped mid-epoch would leave its reads ahead running into
# the next loader's sample, and start cold itself
READ_AHEAD_CELLS = {"a_synth_200k": 8_000_000, "b_tahoe_like_40k": 1_200_000, "c_kang": 1_600_000,
                    "d_synth_640k_64shards": 7_680_000}  # fmt: skip


def read_ahead(args) -> None:
    """--read-ahead: the Loader (local mode, 2 reader threads, CSR) with 2, 3 and 4 buffers read ahead of its
    consumer, on each dataset, taking turns in one fresh process: cells/s and CPU per cell, medians of the rounds."""
    kw = {"stores": {name: str(store) for name, store in sample_stores(args).items()}, "rounds": args.rounds or 5}
    r = in_child("--measure-read-ahead", kw)
    lines = [
        "| dataset | "
        + " | ".join(f"{n} buffers ahead" for n in READ_AHEAD)
        + " | 3 vs 2 | 4 vs 3 | readers idle "
        + " / ".join(map(str, READ_AHEAD))
        + " |",
        "|---|" + "---|" * (len(READ_AHEAD) + 3),
    ]
    for name, rows in r.items():
        cells = [f"{fmt_rate(rows[str(n)]['cells_per_s'])} ({rows[str(n)]['cpu_us']:.2f} µs)" for n in READ_AHEAD]
        rates = [rows[str(n)]["cells_per_s"] for n in READ_AHEAD]
        ratios = [f"{b / a:.2f}x" for a, b in zip(rates, rates[1:])]
        idle = " / ".join(f"{rows[str(n)]['idle']:.1%}" for n in READ_AHEAD)
        lines.append(f"| {name} | " + " | ".join([*cells, *ratios, idle]) + " |")
    print("\n".join(lines))
    if args.readme:
        write_readme("loader-read-ahead", lines, machine_note())
    print(json.dumps({"bench": "loader-read-ahead", "rows": r}))


def measure_read_ahead(kw: dict) -> dict:
    """The child of `read_ahead`: per dataset, rounds of each read-ahead in turn (the first round warms up)."""
    from engine.loading.loader import Loader
    from engine.loading.readers import ReadOptions
    from engine.loading.sampler import SamplerConfig

    out = {}
    for name, store in kw["stores"].items():
        plan = SamplerConfig(batch_size=BATCH)
        k = Loader(store, plan, mode="local").config.buffer_batches
        loaders = {n: Loader(store, plan, mode="local", output="csr", reading=ReadOptions(readers=2, prefetch=n * k))
                   for n in READ_AHEAD}  # fmt: skip
        want = READ_AHEAD_CELLS[name]
        samples: dict[int, list[tuple[float, float, float]]] = {n: [] for n in READ_AHEAD}
        for r in range(kw["rounds"] + 1):
            for n, loader in loaders.items():
                busy, t0 = loader.stats()["reader_busy_s"], time.perf_counter()
                rate, cpu = timed_read(loader, want)
                # the share of the 2 threads' time not reading: waiting for the read-ahead to make room
                idle = 1.0 - (loader.stats()["reader_busy_s"] - busy) / (2 * (time.perf_counter() - t0))
                if r:
                    samples[n].append((rate, cpu, idle))
        for loader in loaders.values():
            loader.close()
        out[name] = {str(n): {key: median([x[i] for x in v]) for i, key in enumerate(("cells_per_s", "cpu_us", "idle"))}
                     for n, v in samples.items()}  # fmt: skip
    return out


# ------------------------------------------------------------------------------------------------ idle Ray

IDLE_RAY_STORES = ("a_synth_200k", "d_synth_640k_64shards")


def idle_ray(args) -> None:
    """--idle-ray: what an idle embedded Ray (started by this process, dashboard on, having served a Ray-mode Loader
    for two epochs: what the loader table's parent kept until 2026-12-05) costs the in-process Loader beside it (2
    reader threads, CSR, default plan): on (a) and (d), samples as the loader table's (a fresh process, whole epochs
    of at least SAMPLE_CELLS) with no Ray running and beside the idle one, taking turns; cells/s and CPU per cell,
    medians of the rounds."""
    import contextlib

    from engine.runtime import ray_session
    from engine.store.format import Store

    stores = {name: store for name, store in sample_stores(args).items() if name in IDLE_RAY_STORES}
    samples: dict[tuple[str, bool], list[tuple[float, float]]] = {(n, i): [] for n in stores for i in (False, True)}
    for r in range(args.rounds or 3):
        for name, store in stores.items():
            group = max(1, -(-SAMPLE_CELLS // Store.open(store).n_cells))
            for idle in (False, True) if r % 2 else (True, False):
                with ray_session(num_cpus=2) if idle else contextlib.nullcontext():
                    if idle:  # the Ray has served a Ray-mode Loader first, as the old table's parent's had
                        _time_loader(store, "ray", 1, output="csr")
                    res = time_cellray(store, "local", 3, output="csr", group=group)
                samples[(name, idle)] += list(zip(res["rates"], res["cpu"]))
    lines = [
        "| dataset | no Ray running | an idle Ray beside | idle vs none | CPU µs/cell, none / idle |",
        "|---|---:|---:|---:|---|",
    ]
    rows = {}
    for name in stores:
        none, idle = ([median([x[k] for x in samples[(name, i)]]) for k in (0, 1)] for i in (False, True))
        rows[name] = {"none": {"cells_per_s": none[0], "cpu_us": none[1] * 1e6},
                      "idle": {"cells_per_s": idle[0], "cpu_us": idle[1] * 1e6}}  # fmt: skip
        lines.append(
            f"| {name} | {fmt_rate(none[0])} | {fmt_rate(idle[0])} | {idle[0] / none[0]:.2f}x | "
            f"{none[1] * 1e6:.3f} / {idle[1] * 1e6:.3f} |"
        )
    print("\n".join(lines))
    if args.readme:
        write_readme("loader-idle-ray", lines, machine_note())
    print(json.dumps({"bench": "loader-idle-ray", "rows": rows}))


# ------------------------------------------------------------------------------------------------ prefetch


def prefetch(args) -> None:
    """--prefetch: the Loader (local mode, 2 reader threads, default plan) gathering each batch with its rows asked
    for `engine.store.csr.PREFETCH_ROWS` rows ahead (the default) and not at all (0), CSR and dense output, taking
    turns in one fresh process on each dataset: cells/s and CPU per cell, medians of the rounds (CSR samples as
    --read-ahead's, dense samples a quarter of them: a dense row of (b) is 80 KB)."""
    kw = {"stores": {name: str(store) for name, store in sample_stores(args).items()}, "rounds": args.rounds or 5}
    r = in_child("--measure-prefetch", kw)
    lines = [
        f"| dataset | output | rows asked ahead ({r['ahead']}) | not asked | cells/s | CPU per cell |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for name, outputs in r["rows"].items():
        for output, (on, off) in outputs.items():
            lines.append(
                f"| {name} | {output} | {fmt_rate(on['cells_per_s'])} ({on['cpu_us']:.3f} µs) | "
                f"{fmt_rate(off['cells_per_s'])} ({off['cpu_us']:.3f} µs) | "
                f"{on['cells_per_s'] / off['cells_per_s']:.2f}x | {on['cpu_us'] / off['cpu_us'] - 1:+.0%} |"
            )
    print("\n".join(lines))
    if args.readme:
        write_readme("loader-prefetch", lines, machine_note())
    print(json.dumps({"bench": "loader-prefetch", **r}))


def measure_prefetch(kw: dict) -> dict:
    """The child of `prefetch`: per dataset and output, one Loader, its samples taking turns between prefetching and
    not (the order alternating by round; the first round warms up). The switch is read at each gather, so only the
    few buffers a sample finds read ahead were gathered under the other one."""
    import engine.store.csr as csr
    from engine.loading.loader import Loader
    from engine.loading.sampler import SamplerConfig

    ahead = csr.PREFETCH_ROWS
    rows: dict = {}
    for name, store in kw["stores"].items():
        rows[name] = {}
        for output, want in (("csr", READ_AHEAD_CELLS[name]), ("dense", READ_AHEAD_CELLS[name] // 4)):
            samples: dict[int, list[tuple[float, float]]] = {ahead: [], 0: []}
            with Loader(store, SamplerConfig(batch_size=BATCH), mode="local", output=output) as loader:
                for r in range(kw["rounds"] + 1):
                    for setting in (ahead, 0) if r % 2 else (0, ahead):
                        csr.PREFETCH_ROWS = setting
                        got = timed_read(loader, want)
                        if r:
                            samples[setting].append(got)
            csr.PREFETCH_ROWS = ahead
            rows[name][output] = [
                {"cells_per_s": median([x[0] for x in samples[k]]), "cpu_us": median([x[1] for x in samples[k]])}
                for k in (ahead, 0)
            ]
    return {"ahead": ahead, "rows": rows}


# ------------------------------------------------------------------------------------------------ mixing

MIX_WEIGHTS = (0.5, 0.3, 0.2)
MIX_CELLS = (40_000, 60_000, 100_000)  # sizes unlike the weights: the first source repeats, the last is subsampled
MIX_EPOCH = 1_000_000


def mixing(args) -> None:
    """The mixing row: 3 stores mixed 0.5/0.3/0.2 (epochs of 1M cells) vs the plain Loader over one store of the
    same three inputs, and vs the same 3 stores unweighted (each cell once an epoch), CSR batches, local mode, in one
    fresh process taking turns; plus the realized weights."""
    chunk = args.chunk_elements or 16384
    inputs = [synthetic_input(f"mix{i}", n, 2000, 100, seed=i) for i, n in enumerate(MIX_CELLS)]
    stores = [make_store(f"mix{i}", [p], chunk) for i, p in enumerate(inputs)]
    combined = make_store("mix_all", inputs, chunk)
    kw = {"stores": [str(s) for s in stores], "combined": str(combined), "rounds": args.rounds or 3}
    r = in_child("--measure-mixing", kw)
    ratio_ = r["mixed"] / r["plain"]
    shares = ", ".join(f"{w:g}: {s:.4f}" for w, s in zip(MIX_WEIGHTS, r["shares"]))
    print(f"mixed {fmt_rate(r['mixed'])} cells/s vs one store {fmt_rate(r['plain'])} ({ratio_:.2f}x), vs the 3 stores "
          f"unweighted {fmt_rate(r['unweighted'])} ({r['mixed'] / r['unweighted']:.2f}x); realized weights per "
          f"{MIX_EPOCH:,} cells {shares} (max error {r['max_error']:.4f})")  # fmt: skip
    if args.readme:
        lines = [
            "| loader (CSR, batches of 4,096) | cells/s | vs one store | realized weights per 1M cells |",
            "|---|---:|---:|---|",
            f"| one store of the 3 inputs | {fmt_rate(r['plain'])} | 1.00x | |",
            f"| 3 stores, unweighted (each cell once an epoch) | {fmt_rate(r['unweighted'])} | "
            f"{r['unweighted'] / r['plain']:.2f}x | |",
            f"| 3 stores mixed 0.5 / 0.3 / 0.2 | {fmt_rate(r['mixed'])} | {ratio_:.2f}x | "
            + " / ".join(f"{s:.4f}" for s in r["shares"])
            + " |",
        ]
        write_readme("loader-mixing", lines, machine_note())
    print(json.dumps({"bench": "loader-mixing", **r, "ratio": round(ratio_, 3)}))


def measure_mixing(kw: dict) -> dict:
    """The child of `mixing`: each round, one 1M-cell epoch of the mix, then 1M cells of the plain Loader and of the
    unweighted mix."""
    import numpy as np

    from engine.loading.loader import Loader
    from engine.loading.mixing import Mix, Source
    from engine.loading.sampler import SamplerConfig

    plan = SamplerConfig(batch_size=BATCH)
    mix = Mix([Source(s, w) for s, w in zip(kw["stores"], MIX_WEIGHTS)], epoch_cells=MIX_EPOCH)
    loaders = {"mixed": Loader(mix, plan, mode="local", output="csr"),
               "plain": Loader(kw["combined"], plan, mode="local", output="csr"),
               "unweighted": Loader(mix.unweighted(), plan, mode="local", output="csr")}  # fmt: skip
    rates: dict[str, list[float]] = {k: [] for k in loaders}
    shares = []
    for r in range(kw["rounds"] + 1):  # round 0 warms up
        for name, loader in loaders.items():
            sources = []  # each cell's source, counted once the clock has stopped
            if name == "mixed":  # one epoch
                rate, _ = timed_read(loader, keep=lambda b, into=sources: into.append(b["source"].numpy().copy()))
            else:  # as many cells
                rate, _ = timed_read(loader, MIX_EPOCH)
            if r:
                rates[name].append(rate)
                if name == "mixed":
                    counts = np.bincount(np.concatenate(sources), minlength=len(MIX_WEIGHTS))
                    shares.append(counts / counts.sum())
    for loader in loaders.values():
        loader.close()
    share = np.median(np.array(shares), axis=0)
    return {**{k: median(v) for k, v in rates.items()}, "shares": share.tolist(),
            "max_error": float(np.abs(np.array(shares) - MIX_WEIGHTS).max())}  # fmt: skip


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--measure-read-ahead":  # the child process of read_ahead
        print(json.dumps(measure_read_ahead(json.loads(sys.argv[2]))))
        return
    if len(sys.argv) == 3 and sys.argv[1] == "--measure-prefetch":  # the child process of prefetch
        print(json.dumps(measure_prefetch(json.loads(sys.argv[2]))))
        return
    if len(sys.argv) == 3 and sys.argv[1] == "--measure-mixing":  # the child process of mixing
        print(json.dumps(measure_mixing(json.loads(sys.argv[2]))))
        return
    if len(sys.argv) == 4 and sys.argv[1] == "--measure-reads":  # the child process of thread_scaling
        print(json.dumps(measure_reads(Path(sys.argv[2]), **json.loads(sys.argv[3]))))
        return
    if len(sys.argv) == 3 and sys.argv[1] == "--measure-loader":  # the child process of time_cellray
        print(json.dumps(measure_loader(**json.loads(sys.argv[2]))))
        return
    global PROBE_AT_START
    PROBE_AT_START = speed_probe()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--scaling", action="store_true", help="CPU per cell over store size and shard count")
    ap.add_argument("--multinode", action="store_true", help="CPU per cell of 3 ranks on 3 nodes vs on one node")
    ap.add_argument("--repeats", type=int, default=None, help="timed epochs per loader and round (median reported)")
    ap.add_argument("--rounds", type=int, default=None, help="rounds of all loaders in turn (evens out a busy machine)")
    ap.add_argument("--block-size", type=int, default=None, help="cells per block (default: the Loader's, ~one chunk)")
    ap.add_argument("--buffer-blocks", type=int, default=None, help="blocks per shuffle buffer (default: the Loader's)")
    ap.add_argument("--chunk-elements", type=int, default=None, help="store chunk size (default: the store's default)")
    ap.add_argument("--no-ray", action="store_true", help="skip the Ray reader-actor mode")
    ap.add_argument("--no-transforms", action="store_true", help="skip the normalize+log1p+densify case")
    ap.add_argument("--readme", action="store_true", help="write this run's table into README.md")
    ap.add_argument("--profile", nargs="+", metavar="STORE", help="one reader thread's CPU per cell and its profile")
    ap.add_argument("--s3", action="store_true", help="dataset (a) from a local S3 endpoint vs disk vs annbatch")
    ap.add_argument("--mixing", action="store_true", help="3 stores mixed 0.5/0.3/0.2 vs one store, vs unweighted")
    ap.add_argument("--read-ahead", action="store_true", help="the Loader with 2, 3 and 4 buffers read ahead")
    ap.add_argument("--per-call", action="store_true", help="Ray mode with 2, 4, 8 and 16 buffers per actor call")
    ap.add_argument("--prefetch", action="store_true", help="the batch gather with rows asked ahead and without")
    ap.add_argument("--idle-ray", action="store_true", help="the in-process Loader with no Ray running vs an idle one")
    ap.add_argument("--placement", action="store_true", help="what the chunk-placement check costs a reader (a, d)")
    ap.add_argument("--threads", action="store_true", help="reader threads vs reader processes, reads only, on (a)")
    args = ap.parse_args()
    if args.placement:
        placement(args)
        return
    if args.threads:
        thread_scaling(args)
        return
    if args.read_ahead:
        read_ahead(args)
        return
    if args.prefetch:
        prefetch(args)
        return
    if args.idle_ray:
        idle_ray(args)
        return
    if args.profile:
        profile(args.profile)
        return

    if args.s3:
        from_bucket(args)
        return

    from engine.runtime import init_ray

    if args.multinode:
        multinode(args)
        return
    if args.mixing:
        mixing(args)
        return
    if args.per_call:
        init_ray(num_cpus=2)
        per_call(args)
        return
    if args.scaling:
        scaling(args)
        return
    peer = peer_python()
    if peer is None:
        print("note: annbatch not measured (no Python >= 3.12 peers venv; run `make peers`)")
    compare(args, peer)


if __name__ == "__main__":
    main()
