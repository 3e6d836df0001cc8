"""Training throughput per model: steps/s, cells/s and the data-wait fraction of each step, on CPU (and GPU if any).

    python bench/train.py [--quick] [--steps N] [--batch-size 1024] [--models vae,...] [--workers 1,2]

Data: a synthetic store (20,000 cells x 2,000 genes, ~100 non-zeros/cell; 5,000 x 1,000 with --quick), batches of
1,024 cells (the data-wait goal: < 5% for the VAE with 2 workers, Ray reader actors, on this 2-core machine).
For each model (vae on raw counts; transformer on normalize+log1p+binning+mask; probe on counts):
- cellray: `engine.train.driver.pretrain` on Ray Train with the Loader's reader actors: 1 worker and 2 DDP workers
  (gloo); with --quick one in-process run (resources.workers: 0, loader threads). Figures are medians over
  the reports after the first (warm-up), each report covering `report_every` steps.
- peer: the same model, optimizer and batch size in a plain torch loop over batches already in memory
  (no loader at all): the ceiling a data loader can reach. ratio = cellray steps/s / in-memory steps/s.
  Both use one torch intra-op thread per process (what Ray gives a worker with fractional CPUs).
On a GPU machine the same runs use gpus_per_worker: 1 with bf16 autocast, 1 worker by default (goal: data-wait
< 1% of step time at batch 1,024), and the in-memory loop runs on the GPU too, its batches already on the device.
Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

BATCH = 1024
MODELS = {
    "vae": ({"n_latent": 10, "n_hidden": 128}, []),
    "transformer": (
        {"max_len": 64, "d_model": 64, "n_heads": 4, "n_layers": 2},
        [{"normalize_total": {"target_sum": 1e4}}, "log1p", {"binning": {"n_bins": 51}}, {"mask": {"fraction": 0.15}}],
    ),
    "probe": ({"label_key": "cell_type", "n_hidden": 64}, []),
}


def spec_for(store: Path, out: Path, model: str, steps: int, workers: int, gpu: bool):
    from jobs.spec import parse_spec

    config, transforms = MODELS[model]
    return parse_spec(
        {
            "kind": "pretrain",
            "name": out.name,
            "data": {"store": str(store), "batch_size": BATCH, "transforms": transforms, "obs_keys": ["cell_type"]},
            "model": {"name": model, "config": config},
            "train": {
                "max_steps": steps,
                "lr": 1e-3,
                "checkpoint_every": steps,
                "report_every": max(1, steps // 6),
                "output": str(out),
            },
            "resources": {
                "workers": workers,
                "cpus_per_worker": 0.5,
                "gpus_per_worker": 1 if gpu else 0,
                "readers_per_worker": 1 if workers else 0,
                "cpus_per_reader": 0.5,
            },
        }
    )


def cellray_run(store: Path, work: Path, model: str, steps: int, workers: int, gpu: bool) -> dict:
    from engine.train.driver import pretrain

    out = work / f"{model}-w{workers}-{int(time.time() * 1e3)}"
    t0 = time.perf_counter()
    h = pretrain(spec_for(store, out, model, steps, workers, gpu)).history
    wall = time.perf_counter() - t0
    h = h[1:] or h  # the first report includes compilation and warm-up
    world = max(1, workers)
    cps = statistics.median(m["cells_per_s"] for m in h)
    return {
        "steps_per_s": cps / (BATCH * world),
        "cells_per_s": cps,
        "data_wait_frac": statistics.median(m["data_wait_frac"] for m in h),
        "wall_s": wall,
    }


def in_memory_run(store: Path, model: str, steps: int, gpu: bool) -> dict:
    """The same model and optimizer over batches already in memory (on the GPU, if any): no loader in the loop."""
    import torch

    import models
    from engine.loading.loader import Loader
    from engine.loading.sampler import SamplerConfig
    from engine.train.data import open_run_data

    spec = spec_for(store, Path("unused"), model, steps, 0, False)
    config = open_run_data(spec).model_config
    _, transforms = MODELS[model]
    with Loader(
        store, SamplerConfig(batch_size=BATCH), transforms=transforms or None, mode="local", obs_keys=("cell_type",)
    ) as loader:
        batches = [b for _, b in zip(range(20), loader)]
    device = torch.device("cuda" if gpu else "cpu")
    batches = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in b.items()} for b in batches]
    torch.manual_seed(0)
    m = models.build(model, config).to(device)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3, fused=gpu)
    times = []
    for i in range(steps):
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=gpu):
            out = m.loss(batches[i % len(batches)], step=i)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if gpu:
            torch.cuda.synchronize()  # the step on the GPU, not only its launches
        times.append(time.perf_counter() - t0)
    per_step = statistics.median(times[min(3, len(times) - 1) :])
    return {"steps_per_s": 1 / per_step, "cells_per_s": BATCH / per_step}


def main() -> None:
    global BATCH
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small store, in-process training only (< 1 min)")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=BATCH)
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of " + ",".join(MODELS))
    ap.add_argument("--workers", default=None, help="worker counts (default 1,2; on one GPU 1; 0: in-process)")
    args = ap.parse_args()
    BATCH = args.batch_size
    import logging
    import warnings

    import torch

    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.WARNING)
    from engine.runtime import ray_session
    from engine.store.ingest import IngestConfig, ingest
    from engine.store.synthetic import synthetic_counts

    gpu = torch.cuda.is_available()
    # One intra-op thread everywhere: Ray gives each fractional-CPU worker OMP_NUM_THREADS=1, and on 2 busy
    # cores a 2-thread torch step is ~10x slower than a 1-thread one, which would flatter whichever side has fewer.
    torch.set_num_threads(1)
    if not gpu:
        print("no GPU on this machine: CPU figures only (the GPU goal, data-wait < 1%, needs a GPU run)")
    n_cells, n_genes = (5_000, 1_000) if args.quick else (20_000, 2_000)
    steps = args.steps or (24 if args.quick else 60)
    worker_counts = [0] if args.quick else [1] if gpu and torch.cuda.device_count() < 2 else [1, 2]
    if args.workers:
        worker_counts = [int(w) for w in args.workers.split(",")]
    chosen = [m for m in args.models.split(",") if m]
    unknown = sorted(set(chosen) - set(MODELS))
    if unknown:
        raise SystemExit(f"--models: unknown {unknown}; choose from {list(MODELS)}")
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="cellray-bench-train-") as tmp, ray_session():
        work = Path(tmp)
        synthetic_counts(n_cells, n_genes, nnz_per_cell=100, seed=0).write_h5ad(work / "in.h5ad")
        store = work / "bench.store"
        ingest([work / "in.h5ad"], store, IngestConfig(shard_cells=5000, obs_keys=("cell_type",)))
        print(f"store: {n_cells} cells x {n_genes} genes, batch {BATCH}, {steps} steps per run")
        for model in chosen:
            peer = in_memory_run(store, model, steps, gpu)
            results[model] = {"in_memory_steps_per_s": peer["steps_per_s"]}
            print(
                f"{model:12s} in-memory torch loop       {peer['steps_per_s']:7.2f} steps/s  "
                f"{peer['cells_per_s']:9.0f} cells/s",
                flush=True,
            )
            for w in worker_counts:
                r = cellray_run(store, work, model, steps, w, gpu)
                label = "in-process" if w == 0 else f"{w} worker{'s' if w > 1 else ''}"
                key = f"w{w}"
                results[model].update(
                    {
                        f"{key}_steps_per_s": r["steps_per_s"],
                        f"{key}_cells_per_s": r["cells_per_s"],
                        f"{key}_data_wait_frac": r["data_wait_frac"],
                    }
                )
                ratio = r["steps_per_s"] / peer["steps_per_s"]
                print(
                    f"{model:12s} cellray {label:18s} {r['steps_per_s']:7.2f} steps/s  {r['cells_per_s']:9.0f} "
                    "cells/s  "
                    f"data-wait {100 * r['data_wait_frac']:4.1f}%  ratio vs in-memory {ratio:.2f} (per worker)  wall "
                    f"{r['wall_s']:.0f} s",
                    flush=True,
                )
                results[model][f"{key}_ratio_vs_in_memory"] = ratio
    flat = {f"{m}_{k}": round(v, 4) for m, d in results.items() for k, v in d.items()}
    print(json.dumps({"device": "cuda" if gpu else "cpu", "batch_size": BATCH, "steps": steps, **flat}))


if __name__ == "__main__":
    main()
