"""`kind: embed` (and `cellray embed`): embeddings of every cell by inference actors (engine.infer). Preemptible: a
rerun keeps the committed parts and computes the rest."""

from __future__ import annotations

from engine.infer.config import EmbedConfig
from engine.progress import Progress
from jobs.kinds.base import NONE, Bundle, Kind, Summary
from jobs.kinds.metrics import infer_progress


def workers(spec: EmbedConfig) -> int:
    return max(spec.resources.workers, 1)  # 0 ("as many as fit") is one under the scheduler: demand is fixed


def bundles(spec: EmbedConfig) -> list[Bundle]:
    r = spec.resources
    return [{"CPU": r.cpus_per_worker, "GPU": r.gpus_per_worker, "memory": 0.0} for _ in range(workers(spec))]


def run(spec: EmbedConfig, address: str | None, progress: Progress) -> Summary:
    from engine.infer.embed import run_embed

    res = run_embed(spec, address=address, progress=infer_progress(progress, spec.name))
    return {
        "job": spec.name, "out": str(res.out), "cells": res.n_cells, "dims": res.dim, "step": res.step,
        "parts": res.parts, "parts_run": res.parts_run, "cells_per_s": res.cells_per_s, "seconds": res.seconds,
        "predicts": res.predicts,
    }  # fmt: skip


def check(spec: EmbedConfig) -> str:
    from engine.infer.embed import plan_embed

    plan_embed(spec)
    return f"embed job {spec.name!r}"


def describe(s: Summary) -> list[str]:
    from engine.infer.predict import OBSM_KEY

    pred = f", predictions of {s['predicts']!r} in obs['cellray_pred']" if s["predicts"] else ""
    return [
        f"{s['out']}: {s['cells']} cells x {s['dims']} dims in obsm['{OBSM_KEY}']{pred} (checkpoint step {s['step']}; "
        f"{s['parts_run']} of {s['parts']} parts this run, {s['cells_per_s']:.0f} cells/s, {s['seconds']:.0f} s in all)"
    ]


KIND = Kind(
    name="embed",
    config=EmbedConfig,
    bundles=bundles,
    driver=lambda spec: dict(NONE),
    paths=("checkpoint", "store", "out"),
    preemptible=True,
    resumes="keeps the parts an earlier attempt committed and computes the rest",
    run=run,
    check=check,
    describe=describe,
)
