"""`kind: ingest`: `cellray ingest` as a job, inputs into a new store, in a placement group of the job's CPUs. Not
preemptible: a stopped ingest leaves nothing at `out`, and a rerun starts over."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from engine.errors import SpecError
from engine.objects import store_path
from engine.progress import Progress
from engine.store.ingest import IngestConfig
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


class IngestJob(JobConfig):
    """`cellray ingest` as a job: `inputs` (h5ad / AnnData zarr) into a new store at `out`."""

    kind: Literal["ingest"] = "ingest"
    name: str = Field("ingest", min_length=1)
    inputs: list[str] = Field(min_length=1)
    out: str
    ingest: IngestConfig = Field(default_factory=IngestConfig)  # vocab, obs_keys, shard_cells, ... (not executor)
    resources: JobResources = Field(default_factory=JobResources)


def write(spec: IngestJob) -> Summary:
    """The job's body, run inside its placement group: its Ray tasks stay within it."""
    from engine.store.ingest import ingest

    store = ingest(spec.inputs, spec.out, spec.ingest.model_copy(update={"address": None})).store
    return {"job": spec.name, "store": str(store.path), "cells": store.n_cells, "shards": store.n_shards}


def run(spec: IngestJob, address: str | None, progress: Progress) -> Summary:
    return run_in_placement_group(spec, spec.resources, address, write)


def check(spec: IngestJob) -> str:
    missing = [p for p in spec.inputs if not Path(p).exists()]
    if missing:
        raise SpecError(f"{spec.where('inputs')}: no such input(s) {missing}")
    store_path(spec.out)  # a URI cellray cannot serve is refused before the job runs
    return f"ingest job {spec.name!r}: {len(spec.inputs)} input(s) -> {spec.out}"


KIND = Kind(
    name="ingest",
    config=IngestJob,
    bundles=lambda spec: group_bundles(spec.resources),
    driver=lambda spec: dict(NONE),  # the placement group holds the job's CPUs
    paths=("inputs", "out"),
    preemptible=False,
    resumes="a rerun starts over (an interrupted ingest leaves nothing at out)",
    run=run,
    check=check,
    describe=key_values,
)
