"""`kind: pretrain`: Ray Train DDP workers with their reader actors (engine.train). Preemptible: a rerun resumes from
the newest complete checkpoint under train.output, at the next unseen batch."""

from __future__ import annotations

import os
from typing import Any

from engine.progress import Progress
from engine.train.config import PretrainConfig, WorkerRange
from jobs.kinds.base import NONE, WORKERS_ENV, Bundle, Kind, Summary
from jobs.kinds.metrics import WorldReporter, train_reporter


def bundles(spec: PretrainConfig) -> list[Bundle]:
    """One bundle per Ray Train worker with its reader actors (readers run on their trainer's node)."""
    r = spec.resources
    worker = {**r.per_worker(), "memory": 0.0}
    return [dict(worker) for _ in range(max(r.max_workers, 1))]  # workers: 0 runs the loop in the driver


def driver(spec: PretrainConfig) -> Bundle:
    r = spec.resources
    if r.max_workers == 0:  # the training loop runs in the driver
        return {"CPU": r.cpus_per_worker, "GPU": r.gpus_per_worker, "memory": 0.0}
    return dict(NONE)  # the workers and readers reserve their own


def sizes(spec: PretrainConfig) -> tuple[int, int] | None:
    r = spec.resources
    return (r.min_workers, r.max_workers) if r.elastic else None


def admitted_size(spec: PretrainConfig) -> PretrainConfig:
    """An elastic spec run by the scheduler: at most the workers it was admitted with (`WORKERS_ENV`); Ray Train
    still shrinks it toward its minimum when a node is lost."""
    n = int(os.environ.get(WORKERS_ENV) or 0)
    r = spec.resources
    if not r.elastic or not n:
        return spec
    workers = WorkerRange(min=min(r.min_workers, n), max=n)
    return spec.model_copy(update={"resources": r.model_copy(update={"workers": workers})})


def run(spec: PretrainConfig, address: str | None, progress: Progress) -> Summary:
    from engine.train.driver import pretrain

    spec = admitted_size(spec)
    report, world = train_reporter(spec.name, spec.train.max_steps), WorldReporter(spec.name)

    def on_report(m: dict[str, Any]) -> None:
        report(m)
        world(m)

    result = pretrain(spec, address=address, progress=progress, on_report=on_report)
    h = result.history
    if h:  # the final state once more: an attempt resumed at its last step reports nothing of its own
        report(h[-1])

    def median(key: str) -> float | None:
        return sorted(m[key] for m in h)[len(h) // 2] if h else None

    curve = result.output / "loss.png"
    return {
        "job": spec.name,
        "output": str(result.output),
        "checkpoint": str(result.checkpoint) if result.checkpoint else None,
        "steps": h[-1]["step"] if h else 0,
        "loss_first": h[0]["loss"] if h else None,
        "loss_last": h[-1]["loss"] if h else None,
        "val_loss": next((m["val_loss"] for m in reversed(h) if "val_loss" in m), None),
        "cells_per_s": median("cells_per_s"),  # median over reports
        "data_wait_frac": median("data_wait_frac"),
        "loss_curve": str(curve) if curve.exists() else None,
        "world_sizes": sorted({int(m["world_size"]) for m in h if "world_size" in m}),
        "resizes": world.resizes,
    }


def check(spec: PretrainConfig) -> str:
    from engine.train.data import open_run_data

    open_run_data(spec)
    r = spec.resources
    workers = f"{r.min_workers}-{r.max_workers} (elastic)" if r.elastic else str(r.workers)
    return f"{spec.model.name}, {workers} workers, {spec.train.max_steps} steps"


def describe(s: Summary) -> list[str]:
    val = f" (validation {_fmt(s['val_loss'])})" if s["val_loss"] is not None else ""
    lines = [
        f"{s['job']}: {s['steps']} steps, loss {_fmt(s['loss_first'])} -> {_fmt(s['loss_last'])}{val}, "
        f"{_fmt(s['cells_per_s'], '.0f')} cells/s, data wait {_fmt(100 * (s['data_wait_frac'] or 0), '.0f')}%",
        f"checkpoint: {s['checkpoint']}",
    ]
    if s["loss_curve"]:
        lines.append(f"loss curve: {s['loss_curve']}")
    return lines


def _fmt(v: Any, f: str = ".4g") -> str:
    return "n/a" if v is None else format(v, f)


KIND = Kind(
    name="pretrain",
    config=PretrainConfig,
    bundles=bundles,
    driver=driver,
    paths=("data.store", "data.sources.store", "train.output", "debug.trace_dir"),
    preemptible=True,
    resumes="from the newest complete checkpoint under train.output, at the next unseen batch",
    run=run,
    check=check,
    describe=describe,
    sizes=sizes,
)
