"""Embeddings and predictions of every cell of a store, written exactly once, resumably, as an AnnData.

`run_embed(EmbedConfig)` (what `cellray embed` and `kind: embed` specs run):

    driver: resolve the plan (checkpoint, gene and category mapping, transforms, layout, fingerprint)
        -> start one Embedder actor per GPU (gpus_per_worker > 0) or per CPU slot; each loads the model once
           (executor: local, or auto on a small store: one Embedder in this process, no Ray start-up)
        -> create the output skeleton (engine.infer.parts) unless a run with the same fingerprint left one
        -> hand the uncommitted parts to the actors, at most two in flight per actor
    actor, per part (engine.infer.embedder): read its cells, run the model, write, rename and commit the part
    driver: write uns['cellray'], rename the finished directory to OUT (or assemble OUT.h5ad from it)

The output is built as a hidden sibling `.OUT.parts` and renamed into place when complete. A rerun after any
failure (a lost actor, a killed driver) finds it, skips committed parts, removes orphans and redoes the rest; a
rerun whose checkpoint, store, transforms or layout differ is refused (or starts over with --overwrite). The
driver holds only the layout and small records: its memory does not grow with the store.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

import models
from engine.atomic import replace_atomically, writer_lock
from engine.errors import CellrayError, InferError, cellray_cause
from engine.infer.config import EmbedConfig
from engine.infer.embedder import Embedder, Plan, Run, inference_transforms, needs_stats
from engine.infer.parts import Layout, PartsOutput, finished_output, is_embed_output
from engine.infer.predict import OBSM_KEY, PRED_KEY, PRED_PROB_KEY, Head
from engine.infer.vocab import GeneMap, category_maps, map_genes
from engine.objects import ObjectPath, cache_dir, store_path, tree_writer
from engine.progress import Progress, silent
from engine.runtime import LOCAL_MAX_BYTES, ray_session
from engine.store.format import Store
from engine.train.checkpoint import MODEL_FILE, gene_fingerprint, latest_checkpoint, read_meta

log = logging.getLogger(__name__)

__all__ = ["OBSM_KEY", "EmbedResult", "Embedder", "embed", "plan_embed", "run_embed"]

MAX_PART_CELLS = 131_072  # default cap on a part (one store shard): 256 MB of outputs at 512 dims
IN_FLIGHT_PER_ACTOR = 2  # an actor computes one part while it writes the one before


@dataclass
class EmbedResult:
    out: Path
    n_cells: int
    dim: int
    checkpoint: Path
    step: int
    parts: int = 0  # parts of the output
    parts_run: int = 0  # parts this run computed (the rest were committed by an earlier run)
    seconds: float = 0.0  # the whole call, Ray and actor start-up included
    cells_run: int = 0  # cells of the parts this run computed
    parts_seconds: float = 0.0  # from the first part's start to the last commit
    predicts: str | None = None  # the obs column a classifier head predicts

    @property
    def cells_per_s(self) -> float:
        """Throughput of the parts this run computed (start-up excluded)."""
        return self.cells_run / self.parts_seconds if self.parts_seconds > 0 else 0.0


# ------------------------------------------------------------------------------------------------- driver


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _bind_transforms(transforms: list, meta: dict, store: Store, genes: GeneMap) -> str | None:
    """The store the transforms bind to: the training store when it is still there (its statistics are the
    model's), else the inference store if it has the training vocabulary, else only the vocabulary (None)."""
    train_path = (meta.get("vocabulary") or {}).get("store")
    if train_path and store_path(train_path).exists():
        try:
            train = Store.open(train_path)
            if gene_fingerprint([str(g) for g in train.gene_ids]) == genes.fingerprint:
                return str(train.path)
        except CellrayError:
            pass
    if genes.index is None:
        elsewhere = train_path and str(store_path(train_path).resolve()) != str(store.path.resolve())
        if transforms and needs_stats(transforms) and elsewhere:
            log.warning(
                "the training store %s is gone: the transforms use the statistics of %s", train_path, store.path
            )
        return str(store.path.resolve())
    if transforms and needs_stats(transforms):
        raise InferError(
            f"{store.path}: the checkpoint's transforms need its training store's statistics, and {train_path} is gone "
            "(or changed); embed a store with the training vocabulary, or restore the training store"
        )
    return None


def _stats_digest(store: str | None) -> str | None:
    if store is None:
        return None
    meta = store_path(store) / "stats" / "zarr.json"
    return hashlib.sha256(meta.read_bytes()).hexdigest()[:16] if meta.exists() else None


def _part_cells(config: EmbedConfig, store: Store) -> int:
    if config.part_cells:
        return min(config.part_cells, store.n_cells)
    first = store.manifest.shards[0].n_cells if store.n_shards else store.n_cells
    return max(1, min(first, MAX_PART_CELLS))


def _staging(out: Path | ObjectPath) -> Path:
    """Where the parts are written: beside OUT, or for an OUT in a bucket under this node's cache dir (a rerun on
    the same node resumes; the tree is uploaded when complete)."""
    if isinstance(out, ObjectPath):
        return cache_dir() / "staging" / f"embed-{hashlib.sha256(str(out).encode()).hexdigest()[:12]}" / out.name
    return out.parent / f".{out.name}.parts"


def _actors(config: EmbedConfig, n_parts: int) -> tuple[int, dict[str, float]]:
    """How many actors, and each one's resources; refuses what the cluster cannot hold."""
    import ray

    r = config.resources
    total = ray.cluster_resources()
    if r.gpus_per_worker > 0:
        fit = int(total.get("GPU", 0) // r.gpus_per_worker)
        opts = {"num_cpus": r.cpus_per_worker, "num_gpus": r.gpus_per_worker}
    else:
        fit = int(total.get("CPU", 0) // r.cpus_per_worker)
        opts = {"num_cpus": r.cpus_per_worker}
    n = r.workers or min(fit, 8)
    if n > fit or fit == 0:
        what = f"{r.gpus_per_worker:g} GPUs" if r.gpus_per_worker > 0 else f"{r.cpus_per_worker:g} CPUs"
        raise InferError(
            f"{config.where('resources')}: {max(n, 1)} inference actors x {what} do not fit the cluster "
            f"({total.get('CPU', 0):g} CPUs, {total.get('GPU', 0):g} GPUs)"
        )
    return max(1, min(n, n_parts)), opts


@dataclass(frozen=True)
class Resolved:
    """What an embed run resolved before it writes anything: the checkpoint, the store, the actors' `Plan`, the
    output's layout and the fingerprint that ties committed parts to all of them."""

    out: Path | ObjectPath
    checkpoint: Path
    meta: dict[str, Any]
    store: Store
    plan: Plan
    layout: Layout
    components: dict[str, Any]
    fingerprint: str

    @property
    def step(self) -> int:
        return int(self.meta["step"])


def plan_embed(config: EmbedConfig) -> Resolved:
    """Check an embed config against its checkpoint and store, and resolve what the run will do (writes nothing)."""
    out = store_path(config.out)
    if out.suffix not in (".h5ad", ".zarr"):
        raise InferError(f"{out}: --out must end in .zarr (an AnnData zarr directory) or .h5ad")
    if isinstance(out, ObjectPath) and out.suffix != ".zarr":
        raise InferError(f"{out}: an output in a bucket must be OUT.zarr (an AnnData zarr, committed last)")
    ckpt = latest_checkpoint(config.checkpoint)
    meta = read_meta(ckpt)
    store = Store.open(config.store)
    if store.n_cells == 0:
        raise InferError(f"{store.path}: the store has no cells")
    where = str(store.path)
    genes = map_genes(store.gene_ids, meta, where, config.min_gene_overlap)
    transforms = inference_transforms(meta["data"].get("transforms") or [], meta.get("vocabulary"))
    model_cfg = models.make_config(meta["model"]["name"], meta["model"]["config"])
    labels = (model_cfg.label_key,) if getattr(model_cfg, "n_classes", 0) else ()
    categories = category_maps(meta, store.manifest.obs_schema, tuple(model_cfg.obs_keys()), where, labels)
    pipeline_store = _bind_transforms(transforms, meta, store, genes)
    plan = Plan(
        checkpoint=str(ckpt.resolve()),
        store=str(store.path.resolve()),
        transforms=transforms,
        pipeline_store=pipeline_store,
        genes=genes,
        categories=categories,
        out=str(_staging(out).resolve()),
        batch_size=config.batch_size,
        threads=max(1, int(config.resources.cpus_per_worker)),
        use_gpu=config.resources.gpus_per_worker > 0,
        fault_part=config.debug.fault_part,
        part_delay_s=config.debug.part_delay_s,
    )
    layout = Layout(store.n_cells, _part_cells(config, store))
    components = {
        "checkpoint": _sha256_file(ckpt / MODEL_FILE) + f"@{int(meta['step'])}",
        "store": _digest([[s.n_cells, s.checksum] for s in store.manifest.shards] + [store.n_genes]),
        "transforms": _digest(
            [transforms, _stats_digest(pipeline_store), genes.fingerprint, gene_fingerprint(store.gene_ids), categories]
        ),
        "layout": [layout.n_cells, layout.part_cells],
    }
    return Resolved(out, ckpt, meta, store, plan, layout, components, _digest(components))


def run_embed(config: EmbedConfig, address: str | None = None, progress: Progress | None = None) -> EmbedResult:
    """Embed every cell of `config.store` with `config.checkpoint`; write `config.out` (see the module doc)."""
    t0 = time.perf_counter()
    r = plan_embed(config)
    out = r.out
    result = EmbedResult(
        out=out, n_cells=r.store.n_cells, dim=0, checkpoint=r.checkpoint, step=r.step, parts=r.layout.n_parts
    )
    if out.exists() and config.overwrite and not is_embed_output(out):
        raise InferError(f"{out}: exists and is not an output of cellray embed: refusing to replace it")
    if out.exists() and not config.overwrite:
        done = finished_output(out)
        if done is not None and done["fingerprint"] == r.fingerprint:
            log.info("%s: already complete for this checkpoint, store and transforms", out)
            result.dim, result.predicts = done["dim"], done["predicts"]
            result.seconds = time.perf_counter() - t0
            return result
        raise InferError(f"{out}: already exists (pass --overwrite to replace it)")
    output = PartsOutput(r.plan.out)
    previous = output.read_run()
    if previous is not None and previous.get("fingerprint") != r.fingerprint and not config.overwrite:
        changed = [k for k, v in r.components.items() if previous.get("components", {}).get(k) != v]
        raise InferError(
            f"{out}: an unfinished run with another {' and '.join(changed) or 'fingerprint'} is in {output.root} "
            f"(fingerprint {previous.get('fingerprint')}, now {r.fingerprint}): pass --overwrite to start over"
        )
    res = config.resources
    local = config.executor == "local" or (
        config.executor == "auto"
        and address is None
        and not res.workers
        and not res.gpus_per_worker
        and r.store.x_bytes < LOCAL_MAX_BYTES
    )
    remote = isinstance(out, ObjectPath)
    with writer_lock(output.root if remote else out), contextlib.nullcontext() if local else ray_session(address):
        try:
            run = _embed_parts(config, r, output, local, progress or silent, result)
        except CellrayError:  # bad data or settings: nothing to resume, so a run that began the output removes it
            if (previous is None or config.overwrite) and _began_here(output, r.fingerprint):
                shutil.rmtree(output.root, ignore_errors=True)
            raise
        head = Head(**run["head"]) if run.get("head") else None
        output.finish({"cellray": _uns(r, head)})
        output.write_run({**run, "complete": True})
        if remote:  # uploaded with its root zarr.json last: the commit
            with tree_writer(out, "zarr.json", overwrite=True, replaceable=is_embed_output) as tree:
                os.rename(output.root, tree)
            shutil.rmtree(output.root.parent, ignore_errors=True)
        elif out.suffix == ".zarr":
            replace_atomically(output.root, out, overwrite=True, replaceable=is_embed_output)
        else:
            from engine.infer.h5ad import write_h5ad

            write_h5ad(output.root, out, overwrite=True)
            shutil.rmtree(output.root, ignore_errors=True)
    result.dim, result.predicts = int(run["widths"][OBSM_KEY]), head.label_key if head else None
    result.seconds = time.perf_counter() - t0
    log.info(
        "wrote %s: %d cells x %d dims, %d parts (%d this run), %.0f cells/s",
        out, result.n_cells, result.dim, result.parts, result.parts_run, result.cells_per_s,
    )  # fmt: skip
    return result


def _began_here(output: PartsOutput, fingerprint: str) -> bool:
    """Whether the unfinished output is this run's (no run record, or one of this fingerprint), not another's."""
    try:
        return (output.read_run() or {}).get("fingerprint") in (None, fingerprint)
    except CellrayError:  # an unreadable record: not ours to remove
        return False


def _embed_parts(
    config: EmbedConfig, r: Resolved, output: PartsOutput, local: bool, progress: Progress, result: EmbedResult
) -> dict[str, Any]:
    """Create the output (or take up the unfinished run of the same fingerprint) and compute every part not yet
    committed, on actors or in this process. Returns the run record; fills `result`'s counts and timings."""
    import ray

    where, layout, fingerprint = str(r.store.path), r.layout, r.fingerprint
    run = output.read_run()  # again, under the lock
    if run is not None and (run.get("fingerprint") != fingerprint or config.overwrite):
        if run.get("fingerprint") != fingerprint and not config.overwrite:
            raise InferError(f"{r.out}: another run changed {output.root} meanwhile; run again")
        run = None
    done = output.committed(fingerprint) if run is not None else {}
    todo = [k for k in range(layout.n_parts) if k not in done]
    actors = [] if local or not todo else _start_actors(config, r.plan, len(todo))
    embedder = Embedder(dataclasses.replace(r.plan, threads=0)) if local and (todo or run is None) else None
    try:
        if run is None:  # a fresh output: widths and head from the model, run by an actor on two cells
            widths, head = embedder.describe() if local else _get(actors[0].describe.remote(), where)
            run = {
                "fingerprint": fingerprint,
                "components": r.components,
                "rows": _create_skeleton(output, r.store, layout, widths, head),
                "n_parts": layout.n_parts,
                "widths": widths,
                "head": dataclasses.asdict(head) if head else None,
                "complete": False,
            }
            output.write_run(run)
        spec = Run(layout, fingerprint, tuple(run["rows"]))
        output.clean(todo, list(spec.rows))
        result.parts_run = len(todo)
        log.info(
            "%s: %d parts, %d committed earlier, %d to do %s",
            r.out, layout.n_parts, len(done), len(todo), "in this process" if local else f"on {len(actors)} actors",
        )  # fmt: skip
        if todo:
            run_parts = _run_parts_here if local else _run_parts
            records = run_parts(embedder if local else actors, spec, todo, len(done), progress, where)
            result.cells_run = sum(rec["rows"] for rec in records)
            result.parts_seconds = max(rec["committed"] for rec in records) - min(rec["started"] for rec in records)
    finally:
        for actor in actors:
            ray.kill(actor)
    if len(output.committed(fingerprint)) != layout.n_parts:
        raise InferError(f"{r.out}: some parts are not committed; run again to finish them")
    return run


def _start_actors(config: EmbedConfig, plan: Plan, n_parts: int) -> list:
    """The actor pool: one Embedder per GPU share (gpus_per_worker > 0) or per CPU slot, each loading the model
    once. Ray restarts a lost actor and retries its part (a part's write is idempotent)."""
    import ray

    n, opts = _actors(config, n_parts)
    actor_cls = ray.remote(max_restarts=3, max_task_retries=3, max_concurrency=IN_FLIGHT_PER_ACTOR)(Embedder)
    return [actor_cls.options(**opts).remote(plan, i) for i in range(n)]


def _run_parts(actors: list, run: Run, todo: list[int], n_done: int, progress: Progress, where: str) -> list[dict]:
    """Hand `todo` to the actors, at most IN_FLIGHT_PER_ACTOR each; report parts done/total and cells. Returns the
    commit records (small: a few numbers per part)."""
    import ray

    layout = run.layout
    queue = collections.deque(todo)
    pending: dict[Any, tuple[int, int]] = {}
    cells_todo = sum(layout.bounds(k)[1] - layout.bounds(k)[0] for k in todo)
    cells_done, t0, records = 0, time.perf_counter(), []
    progress("embed", n_done, layout.n_parts)
    progress("cells", 0, cells_todo)
    for i, actor in enumerate(actors):
        for _ in range(IN_FLIGHT_PER_ACTOR):
            if queue:
                part = queue.popleft()
                pending[actor.run_part.remote(part, run)] = (part, i)
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        part, i = pending.pop(ready[0])
        record = _get(ready[0], where, part)
        records.append({k: record[k] for k in ("rows", "started", "committed")})
        n_done += 1
        cells_done += int(record["rows"])
        progress("embed", n_done, layout.n_parts)
        progress("cells", cells_done, cells_todo)
        log.debug(
            "part %d committed (%d/%d), %.0f cells/s",
            part,
            n_done,
            layout.n_parts,
            cells_done / (time.perf_counter() - t0),
        )
        if queue:
            nxt = queue.popleft()
            pending[actors[i].run_part.remote(nxt, run)] = (nxt, i)
    return records


def _run_parts_here(
    embedder: Embedder, run: Run, todo: list[int], n_done: int, progress: Progress, where: str
) -> list[dict]:
    """The same parts, one after another in this process (executor: local)."""
    layout = run.layout
    cells_todo = sum(layout.bounds(k)[1] - layout.bounds(k)[0] for k in todo)
    cells_done, records = 0, []
    progress("embed", n_done, layout.n_parts)
    progress("cells", 0, cells_todo)
    for part in todo:
        record = embedder.run_part(part, run)
        records.append({k: record[k] for k in ("rows", "started", "committed")})
        cells_done += int(record["rows"])
        n_done += 1
        progress("embed", n_done, layout.n_parts)
        progress("cells", cells_done, cells_todo)
    return records


def _get(ref, where: str, part: int | None = None) -> Any:
    """ray.get, with a CellrayError raised in an actor re-raised as itself (one line for the user)."""
    import ray

    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as e:
        cause = cellray_cause(e)
        if cause is not None:
            raise cause from None
        raise InferError(f"{where}: part {part} failed: {e.cause!r}") from e
    except ray.exceptions.RayActorError as e:
        raise InferError(
            f"{where}: part {part}: the inference actor was lost and its restarts ran out ({type(e).__name__}); "
            "run again to resume (committed parts are kept)"
        ) from e


def _create_skeleton(
    output: PartsOutput, store: Store, layout: Layout, widths: dict[str, int], head: Head | None
) -> list[str]:
    """The output's arrays, empty: obs with the store's columns (unified categories) and the prediction
    columns, obsm with the model's outputs."""
    template = store.read_obs(0).iloc[:0].copy()
    for col, spec in store.manifest.obs_schema.items():
        if col in template and "categories" in spec:
            template[col] = pd.Categorical([], categories=spec["categories"])
    if head is not None:
        template[PRED_KEY] = pd.Categorical([], categories=head.categories)
        template[PRED_PROB_KEY] = np.zeros(0, dtype=np.float32)
    return output.create(layout, template, {k: (w, "float32") for k, w in widths.items()})


def _uns(r: Resolved, head: Head | None) -> dict[str, Any]:
    uns = {
        "model": r.meta["model"]["name"],
        "checkpoint": str(r.checkpoint.resolve()),
        "step": r.step,
        "store": str(r.store.path.resolve()),
        "vocabulary_fingerprint": r.plan.genes.fingerprint,
        "genes_missing": int(r.plan.genes.n_missing),
        "transforms": json.dumps(r.plan.transforms),
        "fingerprint": r.fingerprint,
        "components": {k: v if isinstance(v, str) else json.dumps(v) for k, v in r.components.items()},
        "parts": int(r.layout.n_parts),
        "part_cells": int(r.layout.part_cells),
    }
    if head is not None:
        uns["label_key"] = head.label_key
        uns["classes"] = head.classes
    return uns


def embed(
    checkpoint: str | os.PathLike,
    store: str | os.PathLike,
    out: str | os.PathLike,
    *,
    address: str | None = None,
    batch_size: int = 1024,
    num_actors: int | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
    **options: Any,
) -> EmbedResult:
    """Embed every cell of `store` with the model of `checkpoint` (a checkpoint dir or a run's output folder)
    into `out` (.zarr or .h5ad). `options`: further EmbedConfig fields (part_cells, min_gene_overlap, ...)."""
    resources = dict(options.pop("resources", {}))
    if num_actors:
        resources["workers"] = num_actors
    config = EmbedConfig(
        checkpoint=str(checkpoint),
        store=str(store),
        out=str(out),
        batch_size=batch_size,
        overwrite=overwrite,
        resources=resources,
        **options,
    )
    return run_embed(config, address=address, progress=progress)
