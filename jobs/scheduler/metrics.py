"""The scheduler's cellray_* dashboard metrics (ray.util.metrics): the queue by state and kind, the queue's length
by priority, admissions, preemptions, retries, queue wait, admitted and total resources. A running job's own series
are jobs/kinds/metrics.py.

Ray exports them on every node's metrics port with a `ray_` prefix (Counters also get `_total`), e.g.
`ray_cellray_jobs{state="QUEUED",kind="pretrain"}`; jobs/grafana/cellray.json charts them. Tags stay few: state,
kind, priority and resource.
"""

from __future__ import annotations

from jobs.scheduler.state import QUEUED, RESOURCES, STATES, JobRecord

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
        self.queued = Gauge("cellray_queue_length", "jobs waiting in the queue, by priority", tag_keys=("priority",))
        self.seen: set[tuple[str, str]] = set()
        self.priorities: set[int] = set()

    def update(self, jobs: list[JobRecord], capacity: dict[str, float], admitted: dict[str, float]) -> None:
        counts: dict[tuple[str, str], int] = {}
        for j in jobs:
            counts[(j.state, j.kind)] = counts.get((j.state, j.kind), 0) + 1
        kinds = {k for _, k in counts} | {k for _, k in self.seen}
        self.seen |= {(s, k) for s in STATES for k in kinds}
        for state, kind in self.seen:  # every (state, kind) seen so far, zeros included
            self.jobs.set(counts.get((state, kind), 0), tags={"state": state, "kind": kind})
        waiting: dict[int, int] = {}
        for j in jobs:
            if j.state == QUEUED:
                waiting[j.priority] = waiting.get(j.priority, 0) + 1
        self.priorities |= set(waiting)
        for p in self.priorities:  # every priority seen waiting so far, zeros included
            self.queued.set(waiting.get(p, 0), tags={"priority": str(p)})
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
