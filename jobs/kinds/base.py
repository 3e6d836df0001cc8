"""What every job kind shares: the config base, resources, the `Kind` record, and running inside a placement group.

A kind module (jobs/kinds/<name>.py) ends with `KIND = Kind(...)`: its config class (the pydantic member of the spec
union), its demand (one bundle of resources per process group), whether it may be preempted and how it resumes, and
`run(spec, address, progress) -> summary`, which `cellray run SPEC` and a scheduled job both call.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from pydantic import Field

from engine.config import Config, Section
from engine.errors import SpecError, cellray_cause
from engine.progress import Progress

# Set by the scheduler in a scheduled job's environment (jobs/scheduler/actor.py): its cellray id and attempt.
JOB_ID_ENV = "CELLRAY_JOB_ID"
ATTEMPT_ENV = "CELLRAY_ATTEMPT"
WORKERS_ENV = "CELLRAY_WORKERS"  # an elastic job's workers for this attempt, as the scheduler admitted it

Bundle = dict[str, float]  # {"CPU": ..., "GPU": ..., "memory": bytes}
NONE: Bundle = {"CPU": 0.0, "GPU": 0.0, "memory": 0.0}


def job_tag(name: str) -> str:
    """How dashboard series name a job: its cellray id when the scheduler runs it, else the spec's name."""
    return os.environ.get(JOB_ID_ENV) or name


class JobResources(Section):
    error: ClassVar[type[Exception]] = SpecError

    cpus: float = Field(1.0, gt=0)
    gpus: float = Field(0.0, ge=0)
    memory_gb: float = Field(0.0, ge=0)  # Ray's `memory` resource, reserved for the job (0: none)

    def bundle(self) -> Bundle:
        return {"CPU": self.cpus, "GPU": self.gpus, "memory": self.memory_gb * 2**30}


class JobConfig(Config):
    """Base of the configs cellray's jobs wing defines itself (stats, ingest, sleep)."""

    error: ClassVar[type[Exception]] = SpecError
    source: str | None = Field(None, exclude=True)  # the YAML file, for error messages

    def where(self, field: str) -> str:
        return f"{self.source or 'spec'}: {field}"


Summary = dict[str, Any]


@dataclass(frozen=True)
class Kind:
    """What cellray knows of one kind of job (see the module docstring)."""

    name: str
    config: type[Config]
    bundles: Callable[[Any], list[Bundle]]  # every process group's resources: one bundle per worker
    driver: Callable[[Any], Bundle]  # what the entrypoint process itself reserves (Ray Jobs entrypoint_*)
    paths: tuple[str, ...]  # dotted fields holding local paths, made absolute at submit
    preemptible: bool  # stopping it loses no work: a rerun resumes
    resumes: str  # how a stopped or lost job continues (README, `cellray job status`)
    run: Callable[[Any, str | None, Progress], Summary]  # run it now (embedded Ray, or the cluster at address)
    check: Callable[[Any], str]  # validate its data without running it: a one-line description
    describe: Callable[[Summary], list[str]]  # the summary as lines for a terminal
    sizes: Callable[[Any], tuple[int, int] | None] = lambda spec: None  # elastic: (min, max) workers, one bundle each


def group_bundles(resources: JobResources) -> list[Bundle]:
    """The placement group `run_in_placement_group` reserves: one CPU per bundle; GPUs and memory on the first."""
    bundles = [{"CPU": 1.0, "GPU": 0.0, "memory": 0.0} for _ in range(max(1, int(resources.cpus)))]
    bundles[0].update(GPU=resources.gpus, memory=resources.memory_gb * 2**30)
    return bundles


def run_in_placement_group(
    spec: Any, resources: JobResources, address: str | None, body: Callable[[Any], Summary]
) -> Summary:
    """body(spec) in a Ray task inside a placement group of the job's CPUs, every task it starts held inside it
    (capture_child_tasks): the job uses what the scheduler admitted and no more."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from engine.runtime import ray_session

    with ray_session(address):
        reserve = [{k: v for k, v in b.items() if v > 0} for b in group_bundles(resources)]
        group = placement_group(reserve, strategy="PACK")
        try:
            if not group.wait(timeout_seconds=120):
                raise SpecError(f"{spec.where('resources')}: {reserve} could not be reserved within 120 s")
            task = ray.remote(num_cpus=0, max_retries=0)(body).options(
                scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_capture_child_tasks=True)
            )
            try:
                return ray.get(task.remote(spec))
            except ray.exceptions.RayTaskError as e:
                cause = cellray_cause(e)
                if cause is not None:
                    raise cause from None
                raise
        finally:
            remove_placement_group(group)


def key_values(summary: Summary) -> list[str]:
    """A summary as one line of `key value` pairs (kinds without a line of their own)."""
    return ["  ".join(f"{k} {v}" for k, v in summary.items())]
