"""`kind: stats`: `cellray stats` as a job, gene statistics (and HVGs) written into the store, in a placement group of
the job's CPUs. Not preemptible: a stopped job leaves the old statistics, and a rerun computes them again."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from engine.preprocess.stats import StatsConfig
from engine.progress import Progress
from jobs.kinds.base import (
    NONE,
    JobConfig,
    JobResources,
    Kind,
    Summary,
    group_bundles,
    key_values,
    run_in_placement_group,
)


class StatsJob(JobConfig):
    """`cellray stats` as a job: statistics (and HVGs) of `store`, written into it."""

    kind: Literal["stats"] = "stats"
    name: str = Field("stats", min_length=1)
    store: str
    stats: StatsConfig = Field(default_factory=StatsConfig)  # hvg, flavor, batch_key, ... (not executor/address)
    export: str | None = None  # also write the per-gene table (.csv / .parquet)
    resources: JobResources = Field(default_factory=JobResources)


def compute(spec: StatsJob) -> Summary:
    """The job's body, run inside its placement group: its Ray tasks stay within it."""
    from engine.preprocess.stats import compute_stats, export_table

    stats = compute_stats(spec.store, spec.stats.model_copy(update={"address": None}))
    out = {"job": spec.name, "stats": stats.where, "cells": stats.n_cells, "genes": len(stats.genes)}
    if spec.export:
        out["export"] = str(export_table(stats, spec.export))
    return out


def run(spec: StatsJob, address: str | None, progress: Progress) -> Summary:
    return run_in_placement_group(spec, spec.resources, address, compute)


def check(spec: StatsJob) -> str:
    from engine.store.format import Store

    store = Store.open(spec.store)
    return f"stats job {spec.name!r}: {store.n_cells:,} cells x {store.n_genes:,} genes"


KIND = Kind(
    name="stats",
    config=StatsJob,
    bundles=lambda spec: group_bundles(spec.resources),
    driver=lambda spec: dict(NONE),  # the placement group holds the job's CPUs
    paths=("store", "export"),
    preemptible=False,
    resumes="a rerun computes the statistics again (an interrupted run leaves the old ones)",
    run=run,
    check=check,
    describe=key_values,
)
