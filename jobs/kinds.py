"""Job kinds: one pydantic union keyed on `kind`, each kind with its total demand, its entrypoint and its run.

    kind: pretrain   engine.train.config.PretrainConfig   Ray Train DDP workers + their reader actors
    kind: embed      engine.infer.config.EmbedConfig      inference actors over the store's shards
    kind: stats      jobs.stage_jobs.StatsJob             gene statistics of a store (engine.preprocess.stats)
    kind: ingest     jobs.stage_jobs.IngestJob            h5ad / AnnData zarr files -> a store (engine.store.ingest)
    kind: sleep      SleepJob                             holds its resources for a while (cluster and queue checks)

`JobSpec` is their pydantic union, discriminated by `kind`; `KINDS[kind].config` is one kind's class.

The scheduler admits a job only when its whole demand (every worker's CPUs, GPUs and memory, readers included)
is free at once, and runs its entrypoint, `python -m jobs.cli run SPEC --address auto`, as a Ray Job. Relative
paths in a spec are resolved against the submitting directory at submit time, since a job runs elsewhere.
"""

from __future__ import annotations

import importlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal, Union

from pydantic import Field

from engine.config import Config, Section
from engine.errors import SpecError
from jobs.scheduler.actor import entrypoint  # noqa: F401  (every kind's entrypoint: `cellray run SPEC`)

if TYPE_CHECKING:
    from engine.infer.config import EmbedConfig
    from engine.train.config import PretrainConfig
    from jobs.stage_jobs import IngestJob, StatsJob

log = logging.getLogger(__name__)


class JobResources(Section):
    error: ClassVar[type[Exception]] = SpecError

    cpus: float = Field(1.0, gt=0)
    gpus: float = Field(0.0, ge=0)
    memory_gb: float = Field(0.0, ge=0)  # Ray's `memory` resource, reserved for the job (0: none)


class _JobConfig(Config):
    error: ClassVar[type[Exception]] = SpecError
    source: str | None = Field(None, exclude=True)  # the YAML file, for error messages

    def where(self, field: str) -> str:
        return f"{self.source or 'spec'}: {field}"


class SleepJob(_JobConfig):
    """Holds `resources` for `seconds`, printing a line a second: smoke-tests a cluster and the queue."""

    kind: Literal["sleep"] = "sleep"
    name: str = Field("sleep", min_length=1)
    seconds: float = Field(1.0, ge=0)
    fail: str | None = None  # end with this error (exit 2) instead of success: a job that fails on its own
    resources: JobResources = Field(default_factory=JobResources)


@dataclass(frozen=True)
class Kind:
    """What the scheduler knows of a kind of job. Its config class is imported when first needed, so running a
    light job (`kind: sleep`) does not import torch and the engine's stages."""

    config_path: str  # "module:Class"
    bundles: Callable[[Any], list[dict[str, float]]]  # every process group's resources: one bundle per worker
    driver: Callable[[Any], dict[str, float]]  # what the entrypoint process itself reserves (Ray Jobs entrypoint_*)
    paths: tuple[str, ...]  # dotted fields holding local paths, resolved at submit
    preemptible: bool  # stopping it loses no work: a rerun resumes (checkpoints, committed parts)

    @property
    def config(self) -> type[Config]:
        module, name = self.config_path.split(":")
        return getattr(importlib.import_module(module), name)


NONE = {"CPU": 0.0, "GPU": 0.0, "memory": 0.0}


def _resources(r: JobResources) -> dict[str, float]:
    return {"CPU": r.cpus, "GPU": r.gpus, "memory": r.memory_gb * 2**30}


def pretrain_bundles(spec: PretrainConfig) -> list[dict[str, float]]:
    """One bundle per Ray Train worker with its reader actors (readers run on their trainer's node)."""
    r = spec.resources
    worker = {
        "CPU": r.cpus_per_worker + r.readers_per_worker * r.cpus_per_reader,
        "GPU": r.gpus_per_worker,
        "memory": 0.0,
    }
    return [dict(worker) for _ in range(max(r.workers, 1))]  # workers: 0 runs the loop in the driver


def pretrain_driver(spec: PretrainConfig) -> dict[str, float]:
    r = spec.resources
    if r.workers == 0:  # the training loop runs in the driver
        return {"CPU": r.cpus_per_worker, "GPU": r.gpus_per_worker, "memory": 0.0}
    return dict(NONE)  # the workers and readers reserve their own


def embed_workers(spec: EmbedConfig) -> int:
    return max(spec.resources.workers, 1)  # 0 ("as many as fit") is one under the scheduler: demand is fixed


def embed_bundles(spec: EmbedConfig) -> list[dict[str, float]]:
    r = spec.resources
    return [{"CPU": r.cpus_per_worker, "GPU": r.gpus_per_worker, "memory": 0.0} for _ in range(embed_workers(spec))]


def group_bundles(spec: StatsJob | IngestJob) -> list[dict[str, float]]:
    """The placement group run_in_group reserves: one CPU per bundle; GPUs and memory on the first."""
    r = spec.resources
    bundles = [{"CPU": 1.0, "GPU": 0.0, "memory": 0.0} for _ in range(max(1, int(r.cpus)))]
    bundles[0].update(GPU=r.gpus, memory=r.memory_gb * 2**30)
    return bundles


KINDS: dict[str, Kind] = {
    "pretrain": Kind(
        "engine.train.config:PretrainConfig",
        pretrain_bundles,
        pretrain_driver,
        ("data.store", "train.output", "debug.trace_dir"),
        preemptible=True,
    ),
    "embed": Kind(
        "engine.infer.config:EmbedConfig",
        embed_bundles,
        lambda s: dict(NONE),
        ("checkpoint", "store", "out"),
        preemptible=True,
    ),
    # stats and ingest run inside a placement group of their CPUs (jobs/stage_jobs.py): the driver reserves nothing
    "stats": Kind(
        "jobs.stage_jobs:StatsJob", group_bundles, lambda s: dict(NONE), ("store", "export"), preemptible=False
    ),
    "ingest": Kind(
        "jobs.stage_jobs:IngestJob", group_bundles, lambda s: dict(NONE), ("inputs", "out"), preemptible=False
    ),
    "sleep": Kind(
        "jobs.kinds:SleepJob",
        lambda s: [_resources(s.resources)],
        lambda s: _resources(s.resources),
        (),
        preemptible=False,
    ),
}


def __getattr__(name: str) -> Any:
    """`JobSpec`: the pydantic union of every kind, keyed on `kind` (built on first use: it imports them all)."""
    if name == "JobSpec":
        configs = tuple(k.config for k in KINDS.values())
        return Annotated[Union[configs], Field(discriminator="kind")]  # noqa: UP007
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def bundles(spec: Any) -> list[dict[str, float]]:
    return [{k: float(v) for k, v in b.items()} for b in KINDS[spec.kind].bundles(spec)]


def demand(spec: Any) -> dict[str, float]:
    """The whole job's resources: the sum of its bundles (the driver's share is one of them or nothing)."""
    out = dict(NONE)
    for b in bundles(spec):
        out = {r: out[r] + b.get(r, 0.0) for r in out}
    return out


def resolve_paths(spec: Any, base: str | Path) -> Any:
    """A copy of `spec` whose local relative paths are absolute (relative to `base`); URIs are kept."""
    base = Path(base)

    def fix(value: Any) -> Any:
        if value is None:
            return None
        if isinstance(value, list):
            return [fix(v) for v in value]
        text = str(value)
        return text if "://" in text or Path(text).is_absolute() else str((base / text).resolve())

    data = spec.model_dump(mode="json")
    for dotted in KINDS[spec.kind].paths:
        *parents, last = dotted.split(".")
        node = data
        for p in parents:
            node = node[p]
        node[last] = fix(node.get(last))
    return type(spec).parse(data, spec.source or "spec").model_copy(update={"source": spec.source})


# ------------------------------------------------------------------------------------------------ running


def run_kind(spec: Any, address: str | None = None, progress: Callable | None = None) -> dict[str, Any]:
    """Run a non-pretrain job spec (`cellray run` dispatches pretrain itself); returns a short summary."""
    from jobs.scheduler.metrics import job_progress

    if spec.kind == "sleep":
        return run_sleep(spec)
    if spec.kind == "embed":
        from engine.infer.embed import run_embed  # the code path of `cellray embed`

        res = run_embed(spec, address=address, progress=job_progress(progress, spec.name))
        return {
            "job": spec.name, "out": str(res.out), "cells": res.n_cells, "dims": res.dim, "step": res.step,
            "parts": res.parts, "parts_run": res.parts_run,
        }  # fmt: skip
    if spec.kind in ("stats", "ingest"):
        from jobs.stage_jobs import run_in_group

        return run_in_group(spec, address)
    raise SpecError(f"{spec.where('kind')}: no runner for kind {spec.kind!r}")


def run_sleep(spec: SleepJob) -> dict[str, Any]:
    t0 = time.monotonic()
    tick = 0
    while (left := spec.seconds - (time.monotonic() - t0)) > 0:
        print(
            f"{spec.name}: holding {spec.resources.cpus:g} CPUs, {spec.resources.gpus:g} GPUs; "
            f"tick {tick}, {left:.1f} s left",
            flush=True,
        )
        time.sleep(min(1.0, left))
        tick += 1
    if spec.fail:
        raise SpecError(f"{spec.where('fail')}: {spec.fail}")
    return {"job": spec.name, "seconds": round(time.monotonic() - t0, 3)}
