"""`kind: embed` (and `cellray embed`): embeddings of every cell by inference actors (engine.infer). Preemptible: a
rerun keeps the committed parts and computes the rest."""

from __future__ import annotations

from engine.infer.config import EmbedConfig
from engine.progress import Progress
from jobs.kinds.base import NONE, Bundle, Kind, Summary
from jobs.kinds.metrics import eval_report, infer_progress


def workers(spec: EmbedConfig) -> int:
    return max(spec.resources.workers, 1)  # 0 ("as many as fit") is one under the scheduler: demand is fixed


def bundles(spec: EmbedConfig) -> list[Bundle]:
    r = spec.resources
    return [{"CPU": r.cpus_per_worker, "GPU": r.gpus_per_worker, "memory": 0.0} for _ in range(workers(spec))]


def run(spec: EmbedConfig, address: str | None, progress: Progress) -> Summary:
    import contextlib

    from engine.infer.embed import run_embed
    from engine.runtime import ray_session

    if spec.evaluate is not None:  # a label or batch key the store lacks fails now, not after the embedding
        check_evaluate(spec)
    # attached to a cluster: one connection for the embedding and its evaluation, whose gauges go out through it
    # (without an address the embedded Ray ends with the command: nobody would see them)
    with contextlib.nullcontext() if address is None else ray_session(address):
        res = run_embed(spec, address=address, progress=infer_progress(progress, spec.name))
        summary = {
            "job": spec.name, "out": str(res.out), "cells": res.n_cells, "dims": res.dim, "step": res.step,
            "parts": res.parts, "parts_run": res.parts_run, "cells_per_s": res.cells_per_s, "seconds": res.seconds,
            "predicts": res.predicts,
        }  # fmt: skip
        if spec.evaluate is not None:
            summary["evaluation"] = evaluate(spec, res.out)
    return summary


def check_evaluate(spec: EmbedConfig) -> None:
    from engine.errors import SpecError
    from engine.store.format import Store

    columns = list(Store.open(spec.store).manifest.obs_schema)
    for field in ("label_key", "batch_key"):
        key = getattr(spec.evaluate, field)
        if key is not None and key not in columns:
            raise SpecError(f"{spec.where(f'evaluate.{field}')}: {key!r} is not an obs column of {spec.store}; "
                            f"it has {columns}")  # fmt: skip


def evaluate(spec: EmbedConfig, out) -> dict:
    """Score the finished output (engine.infer.evaluate), write OUT.eval.json beside it, report the headline."""
    import json

    from engine.atomic import write_text_atomically
    from engine.infer.evaluate import evaluate_embedding, report_path

    report = evaluate_embedding(out, spec.evaluate, store=spec.store)
    path = report_path(out)
    write_text_atomically(path, json.dumps(report, indent=1))
    eval_report(spec.name, report["headline"])
    return {"report": str(path), **report["headline"]}


def check(spec: EmbedConfig) -> str:
    from engine.infer.embed import plan_embed

    plan_embed(spec)
    return f"embed job {spec.name!r}"


def describe(s: Summary) -> list[str]:
    from engine.infer.predict import OBSM_KEY

    pred = f", predictions of {s['predicts']!r} in obs['cellray_pred']" if s["predicts"] else ""
    lines = [
        f"{s['out']}: {s['cells']} cells x {s['dims']} dims in obsm['{OBSM_KEY}']{pred} (checkpoint step {s['step']}; "
        f"{s['parts_run']} of {s['parts']} parts this run, {s['cells_per_s']:.0f} cells/s, {s['seconds']:.0f} s in all)"
    ]
    if "evaluation" in s:
        e = s["evaluation"]
        num = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
        vs = lambda r: f" ({r:.2f}x HVG-PCA-50)" if r is not None else ""  # noqa: E731
        lines.append(
            f"scIB {e['scib_is'].lower()} {num(e['scib'])}{vs(e['scib_vs_baseline'])}, kNN accuracy "
            f"{num(e['knn'])}{vs(e['knn_vs_baseline'])}: {e['report']}"
        )
    return lines


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
