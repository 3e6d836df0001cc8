"""cellray_* dashboard metrics (ray.util.metrics): the scheduler's queue, and the progress of running jobs.

Ray exports them on every node's metrics port with a `ray_` prefix (Counters also get `_total`), e.g.
`ray_cellray_jobs{state="QUEUED",kind="pretrain"}`; jobs/grafana/cellray.json charts them. Tags stay few: state,
kind and resource for the scheduler; the job id for the gauges of a running job (one series per running job).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

from jobs.scheduler.state import RESOURCES, STATES, JobRecord

JOB_ID_ENV = "CELLRAY_JOB_ID"  # set in a scheduled job's environment: its cellray id
QUEUE_WAIT_BOUNDARIES = [1, 5, 15, 60, 300, 900, 3600, 4 * 3600, 24 * 3600]


class SchedulerMetrics:
    """Recorded by the scheduler actor on every pass of its loop and at each event."""

    def __init__(self):
        from ray.util.metrics import Counter, Gauge, Histogram

        self.jobs = Gauge("cellray_jobs", "cellray jobs by state and kind", tag_keys=("state", "kind"))
        self.admissions = Counter("cellray_admissions", "jobs admitted (handed to Ray Jobs)", tag_keys=("kind",))
        self.preemptions = Counter(
            "cellray_preemptions", "running jobs preempted for higher priorities", tag_keys=("kind",)
        )
        self.retries = Counter("cellray_retries", "jobs requeued after a lost process or node", tag_keys=("kind",))
        self.queue_wait = Histogram(
            "cellray_queue_wait_seconds",
            "seconds from queued to admitted",
            boundaries=QUEUE_WAIT_BOUNDARIES,
            tag_keys=("kind",),
        )
        self.admitted = Gauge(
            "cellray_admitted_resources", "resources held by admitted jobs (memory in bytes)", tag_keys=("resource",)
        )
        self.capacity = Gauge(
            "cellray_capacity_resources", "resources of the cluster as the scheduler sees them", tag_keys=("resource",)
        )
        self.seen: set[tuple[str, str]] = set()

    def update(self, jobs: list[JobRecord], capacity: dict[str, float], admitted: dict[str, float]) -> None:
        counts: dict[tuple[str, str], int] = {}
        for j in jobs:
            counts[(j.state, j.kind)] = counts.get((j.state, j.kind), 0) + 1
        kinds = {k for _, k in counts} | {k for _, k in self.seen}
        self.seen |= {(s, k) for s in STATES for k in kinds}
        for state, kind in self.seen:  # every (state, kind) seen so far, zeros included
            self.jobs.set(counts.get((state, kind), 0), tags={"state": state, "kind": kind})
        for r in RESOURCES:
            self.admitted.set(admitted.get(r, 0.0), tags={"resource": r})
            self.capacity.set(capacity.get(r, 0.0), tags={"resource": r})

    def admission(self, job: JobRecord, now: float) -> None:
        self.admissions.inc(tags={"kind": job.kind})
        self.queue_wait.observe(max(0.0, now - job.queued_since), tags={"kind": job.kind})

    def preemption(self, job: JobRecord) -> None:
        self.preemptions.inc(tags={"kind": job.kind})

    def retry(self, job: JobRecord) -> None:
        self.retries.inc(tags={"kind": job.kind})


def job_tag(default: str) -> str:
    return os.environ.get(JOB_ID_ENV) or default


def train_reporter(name: str) -> Callable[[dict[str, Any]], None]:
    """A callback for the pretraining driver's reports: training gauges tagged by job (cellray id, or the name)."""
    gauges: list[Any] = []
    last: list[tuple[float, int]] = []
    tags = {"job": job_tag(name)}

    def report(m: dict[str, Any]) -> None:
        from ray.util.metrics import Gauge

        if not gauges:
            gauges.extend(
                Gauge(n, d, tag_keys=("job",))
                for n, d in (
                    ("cellray_train_step", "optimizer steps done"),
                    ("cellray_train_loss", "training loss (mean over the last report window)"),
                    ("cellray_train_cells_per_s", "training cells per second, all workers"),
                    ("cellray_train_data_wait_fraction", "fraction of step time spent waiting for data"),
                    ("cellray_train_step_seconds", "seconds per optimizer step (between reports)"),
                )
            )
        step, now = int(m["step"]), time.monotonic()
        values = [step, m.get("loss"), m.get("cells_per_s"), m.get("data_wait_frac")]
        if last and step > last[0][1]:
            values.append((now - last[0][0]) / (step - last[0][1]))
        for g, v in zip(gauges, values):
            if v is not None:
                g.set(float(v), tags=tags)
        last[:] = [(now, step)]

    return report


def job_progress(progress: Callable | None, name: str = "") -> Callable[[str, int, int], None]:
    """Wrap a progress callback: inference stages also set cellray_infer_parts(_done) for the dashboard."""
    gauges: list[Any] = []
    tags = {"job": job_tag(name)}

    def update(stage: str, done: int, total: int) -> None:
        if progress is not None:
            progress(stage, done, total)
        if stage != "embed":
            return
        import ray

        if not ray.is_initialized():
            return
        if not gauges:
            from ray.util.metrics import Gauge

            gauges.append(Gauge("cellray_infer_parts_done", "inference parts (store shards) done", ("job",)))
            gauges.append(Gauge("cellray_infer_parts", "inference parts (store shards) in all", ("job",)))
        gauges[0].set(float(done), tags=tags)
        gauges[1].set(float(total), tags=tags)

    return update
