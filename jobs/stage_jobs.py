"""The `stats` and `ingest` job kinds (jobs/kinds.py): `cellray stats` and `cellray ingest` as queued jobs.

Their configs are the engine's (StatsConfig, IngestConfig). They run inside a placement group of the job's CPUs,
so every Ray task they start stays within what the scheduler admitted.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from engine.errors import SpecError
from engine.preprocess.stats import StatsConfig
from engine.store.ingest import IngestConfig
from jobs.kinds import JobResources, _JobConfig, group_bundles


class StatsJob(_JobConfig):
    """`cellray stats` as a job: statistics (and HVGs) of `store`, written into it."""

    kind: Literal["stats"] = "stats"
    name: str = Field("stats", min_length=1)
    store: str
    stats: StatsConfig = Field(default_factory=StatsConfig)  # hvg, flavor, batch_key, ... (not executor/address)
    export: str | None = None  # also write the per-gene table (.csv / .parquet)
    resources: JobResources = Field(default_factory=JobResources)


class IngestJob(_JobConfig):
    """`cellray ingest` as a job: `inputs` (h5ad / AnnData zarr) into a new store at `out`."""

    kind: Literal["ingest"] = "ingest"
    name: str = Field("ingest", min_length=1)
    inputs: list[str] = Field(min_length=1)
    out: str
    ingest: IngestConfig = Field(
        default_factory=IngestConfig
    )  # vocab, obs_keys, shard_cells, ... (not executor/address)
    resources: JobResources = Field(default_factory=JobResources)


def _stage(spec: StatsJob | IngestJob) -> dict[str, Any]:
    """The stage's body, run in a task inside the job's placement group: its Ray tasks stay within it."""
    if spec.kind == "stats":
        from engine.preprocess.stats import compute_stats, export_table

        stats = compute_stats(spec.store, spec.stats.model_copy(update={"address": None}))
        out = {"job": spec.name, "stats": stats.where, "cells": stats.n_cells, "genes": len(stats.genes)}
        if spec.export:
            out["export"] = str(export_table(stats, spec.export))
        return out
    from engine.store.ingest import ingest

    store = ingest(spec.inputs, spec.out, spec.ingest.model_copy(update={"address": None}))
    return {"job": spec.name, "store": str(store.path), "cells": store.n_cells, "shards": store.n_shards}


def run_in_group(spec: StatsJob | IngestJob, address: str | None) -> dict[str, Any]:
    """Run stats / ingest with every Ray task they start held inside a placement group of the job's CPUs
    (capture_child_tasks), so the job uses what the scheduler admitted and no more."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from engine.errors import CellrayError
    from engine.runtime import ray_session

    with ray_session(address):
        reserve = [{k: v for k, v in b.items() if v > 0} for b in group_bundles(spec)]
        group = placement_group(reserve, strategy="PACK")
        try:
            if not group.wait(timeout_seconds=120):
                raise SpecError(f"{spec.where('resources')}: {reserve} could not be reserved within 120 s")
            body = ray.remote(num_cpus=0, max_retries=0)(_stage).options(
                scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_capture_child_tasks=True)
            )
            try:
                return ray.get(body.remote(spec))
            except ray.exceptions.RayTaskError as e:
                if isinstance(e.cause, CellrayError):
                    raise e.cause from None
                raise
        finally:
            remove_placement_group(group)
