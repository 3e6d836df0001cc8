"""`kind: sleep`: holds its resources for a while, printing a line a second (smoke-tests a cluster and the queue).
It imports neither torch nor the engine's stages, so it starts in a fraction of a second."""

from __future__ import annotations

import time
from typing import Literal

from pydantic import Field

from engine.errors import SpecError
from engine.progress import Progress
from jobs.kinds.base import JobConfig, JobResources, Kind, Summary, key_values


class SleepJob(JobConfig):
    kind: Literal["sleep"] = "sleep"
    name: str = Field("sleep", min_length=1)
    seconds: float = Field(1.0, ge=0)
    fail: str | None = None  # end with this error (exit 2) instead of success: a job that fails on its own
    resources: JobResources = Field(default_factory=JobResources)


def run(spec: SleepJob, address: str | None, progress: Progress) -> Summary:
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


KIND = Kind(
    name="sleep",
    config=SleepJob,
    bundles=lambda spec: [spec.resources.bundle()],
    driver=lambda spec: spec.resources.bundle(),
    paths=(),
    preemptible=False,
    resumes="a rerun sleeps again",
    run=run,
    check=lambda spec: f"sleep job {spec.name!r}",
    describe=key_values,
)
