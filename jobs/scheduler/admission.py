"""Admission: which queued jobs start now, and which running jobs make room for them. Pure functions.

Order: priority (high first), then submission order. A job is admitted only when all of its demand is free at
once (gang admission): Ray would otherwise start part of it and hold that part while the rest waits (Ray Jobs
PENDING for up to 15 minutes, Ray Train's placement group retried without end). `strict` queueing (the default)
lets nothing pass a job that waits, so a large job is never starved by a stream of small ones; `best-effort`
lets jobs behind it that fit start meanwhile, as Kueue's BestEffortFIFO does (the waiting job still comes first
whenever room frees up, so only jobs that fit into the gaps pass it).

Elastic jobs (a pretrain spec with `resources.workers: {min, max}`; `JobRecord.sizes`): admitted at the most
workers that fit, at least min; a job that waits for room first shrinks running elastic jobs of lower priority
toward their minimum (`Plan.resize`: the job is stopped at its checkpoint and readmitted at the smaller size), and
preempts only what shrinking cannot free; when no job waits, a running elastic job below its maximum grows into
free room the same way (stopped and readmitted larger). Either way the run resumes from its newest checkpoint at
the next unseen global batch.

Preemption: a waiting job may stop running jobs of strictly lower priority that are preemptible (pretraining
resumes from its checkpoint, inference from its committed parts): the lowest priority first, and among equals the
most recently admitted (the least work to redo), and only as many as it needs. Jobs already being stopped count
as free-to-be, so a waiting job never preempts twice for the same room.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from jobs.scheduler.state import RESOURCES, JobRecord

EPS = 1e-9


def add(a: dict[str, float], b: dict[str, float], sign: float = 1.0) -> dict[str, float]:
    return {r: a.get(r, 0.0) + sign * b.get(r, 0.0) for r in RESOURCES}


def demand_at(job: JobRecord, workers: int) -> dict[str, float]:
    """An elastic job's demand at `workers` workers (its `demand` is at its maximum; each worker is one bundle)."""
    if job.sizes is None:
        return job.demand
    return add(job.demand, job.bundles[0], -(job.sizes[1] - workers))


def in_use(job: JobRecord) -> dict[str, float]:
    """What an admitted job holds: an elastic job at the size it was admitted at."""
    return demand_at(job, job.workers) if job.sizes is not None and job.workers else job.demand


def total(jobs: Iterable[JobRecord]) -> dict[str, float]:
    out = {r: 0.0 for r in RESOURCES}
    for j in jobs:
        out = add(out, in_use(j))
    return out


def largest_fit(job: JobRecord, free: dict[str, float]) -> int | None:
    """The most workers of `job` that fit `free` (its maximum for a fixed-size job, as 0); None if none do."""
    if job.sizes is None:
        return 0 if fits(job.demand, free) else None
    lo, hi = job.sizes
    return next((n for n in range(hi, lo - 1, -1) if fits(demand_at(job, n), free)), None)


def fits(demand: dict[str, float], free: dict[str, float]) -> bool:
    return all(demand.get(r, 0.0) <= free.get(r, 0.0) + EPS for r in RESOURCES if demand.get(r, 0.0) > 0)


def describe(res: dict[str, float]) -> str:
    parts = [f"{res.get('CPU', 0):g} CPU", f"{res.get('GPU', 0):g} GPU"]
    if res.get("memory", 0) > 0:
        parts.append(f"{res['memory'] / 2**30:.3g} GiB memory")
    return ", ".join(parts)


def never_fits(demand: dict[str, float], capacity: dict[str, float]) -> list[str]:
    """What a job needs beyond the whole (empty) cluster: one phrase per resource."""
    names = {"CPU": "CPUs", "GPU": "GPUs", "memory": "bytes of memory"}
    return [
        f"{demand[r]:g} {names[r]} (the cluster has {capacity.get(r, 0.0):g})"
        for r in RESOURCES
        if demand.get(r, 0.0) > capacity.get(r, 0.0) + EPS
    ]


def queue_order(queued: Iterable[JobRecord]) -> list[JobRecord]:
    return sorted(queued, key=lambda j: (-j.priority, j.seq))


@dataclass
class Plan:
    admit: list[str] = field(default_factory=list)
    sizes: dict[str, int] = field(default_factory=dict)  # elastic admitted job id -> its workers
    preempt: dict[str, str] = field(default_factory=dict)  # running job id -> the queued job it makes room for
    resize: dict[str, int] = field(default_factory=dict)  # running elastic job id -> its workers after a restart
    waiting: dict[str, str] = field(default_factory=dict)  # job id -> why it waits


def plan(
    queued: Iterable[JobRecord],
    running: Iterable[JobRecord],
    capacity: dict[str, float],
    available: dict[str, float] | None = None,
    strict: bool = True,
    now: float = float("inf"),
    grow_after_s: float = 0.0,
) -> Plan:
    """Admissions and preemptions for this moment.

    `running`: every admitted job not yet ended (those being stopped too); their demand is in use.
    `capacity`: the cluster's total resources. `available`: what Ray itself reports free (catches resources
    held outside the scheduler, or not yet released by a job that just ended); None to ignore. An elastic job
    grows only once its attempt has reported progress (it steps at its size) and has run `grow_after_s` since its
    admission (`now`): a restart costs it its steps since the last checkpoint, and one that has not stepped yet
    would restart for nothing.
    """
    running = list(running)
    used = total(running)
    free = {r: capacity.get(r, 0.0) - used[r] for r in RESOURCES}
    if available is not None:
        free = {r: min(free[r], available.get(r, 0.0)) for r in RESOURCES}
    releasing = total(j for j in running if j.stop_reason is not None)
    out = Plan()
    taken: set[str] = set()
    for job in queue_order(queued):
        size = largest_fit(job, free)
        if size is not None:
            out.admit.append(job.id)
            if job.sizes is not None:
                out.sizes[job.id] = size
            free = add(free, demand_at(job, size) if size else job.demand, -1)
            continue
        need = demand_at(job, job.sizes[0]) if job.sizes is not None else job.demand
        if not fits(need, add(free, releasing)):
            shrink = _shrinks(job, need, running, taken, add(free, releasing))
            if shrink:
                out.resize.update(shrink)
                taken.update(shrink)
                releasing = add(releasing, total(j for j in running if j.id in shrink))
                out.waiting[job.id] = "shrinking " + ", ".join(f"{k} to {n}" for k, n in shrink.items())
                if strict:
                    _behind(out, queued, job)
                    break
                continue
            victims = _victims(job, running, taken, add(free, releasing), need)
            if victims:
                out.preempt.update({v.id: job.id for v in victims})
                taken.update(v.id for v in victims)
                releasing = add(releasing, total(victims))
                out.waiting[job.id] = f"preempting {', '.join(v.id for v in victims)}"
            else:
                out.waiting[job.id] = f"needs {describe(job.demand)}; free {describe(free)}"
        else:
            out.waiting[job.id] = "waiting for preempted jobs to stop"
        if strict:
            _behind(out, queued, job)
            break
    if not out.waiting and not out.preempt:
        grown = [r for r in running if (r.admitted or 0.0) + grow_after_s <= now and _stepped(r)]
        out.resize.update(_growths(grown, free))
    return out


def _stepped(job: JobRecord) -> bool:
    """The job's current attempt has reported progress (jobs/kinds/metrics.py JobProgress, sent after steps)."""
    return job.progress is not None and job.progress.get("attempt") == job.attempts and job.progress["done"] > 0


def _behind(out: Plan, queued: Iterable[JobRecord], job: JobRecord) -> None:
    for rest in queue_order(queued):
        if rest.id not in out.admit and rest.id not in out.waiting:
            out.waiting[rest.id] = f"behind {job.id}"


def _shrinks(
    job: JobRecord, need: dict[str, float], running: list[JobRecord], taken: set[str], free: dict[str, float]
) -> dict[str, int]:
    """Running elastic jobs of lower priority shrunk toward their minimum, lowest priority and most recent first,
    one worker at a time, until `need` fits: {job id: workers}; {} when shrinking all of them is not enough."""
    candidates = [
        r
        for r in running
        if r.sizes is not None
        and r.workers > r.sizes[0]
        and r.stop_reason is None
        and r.id not in taken
        and r.priority < job.priority
    ]
    candidates.sort(key=lambda r: (r.priority, -(r.admitted or 0.0), -r.seq))
    out: dict[str, int] = {}
    room = dict(free)
    for c in candidates:
        n = c.workers
        while n > c.sizes[0] and not fits(need, room):
            n -= 1
            room = add(room, c.bundles[0])
        if n < c.workers:
            out[c.id] = n
        if fits(need, room):
            return out
    return {}


def _growths(running: list[JobRecord], free: dict[str, float]) -> dict[str, int]:
    """Running elastic jobs below their maximum grown into free room (highest priority first): {job id: workers}."""
    out: dict[str, int] = {}
    room = dict(free)
    for r in sorted(running, key=lambda r: (-r.priority, r.seq)):
        if r.sizes is None or r.stop_reason is not None or not r.workers or r.workers >= r.sizes[1]:
            continue
        n = r.workers
        while n < r.sizes[1] and fits(r.bundles[0], room):
            n += 1
            room = add(room, r.bundles[0], -1)
        if n > r.workers:
            out[r.id] = n
    return out


def _victims(
    job: JobRecord,
    running: list[JobRecord],
    taken: set[str],
    free: dict[str, float],
    need: dict[str, float] | None = None,
) -> list[JobRecord]:
    """The fewest, lowest-priority preemptible running jobs whose resources make `job` (`need`: at its minimum
    size) fit; [] if none do."""
    need = job.demand if need is None else need
    candidates = [
        r
        for r in running
        if r.preemptible and r.stop_reason is None and r.id not in taken and r.priority < job.priority
    ]
    candidates.sort(key=lambda r: (r.priority, -(r.admitted or 0.0), -r.seq))
    chosen: list[JobRecord] = []
    room = dict(free)
    for c in candidates:
        if fits(need, room):
            break
        chosen.append(c)
        room = add(room, in_use(c))
    if not fits(need, room):
        return []
    for c in reversed(list(chosen)):  # drop any the job does not need after all (e.g. CPU-only when GPUs lack)
        if fits(need, add(room, in_use(c), -1)):
            chosen.remove(c)
            room = add(room, in_use(c), -1)
    return chosen


def scale_request(queued: Iterable[JobRecord], running: Iterable[JobRecord], current: dict[str, float]) -> list[dict]:
    """For an autoscaling cluster: the bundles the cluster must be able to hold so that the first queued job that
    does not fit the nodes up now can start (every running job's bundles plus its own); [] when none waits on
    missing nodes. Gang admission submits nothing until a job fits, so without this request the autoscaler would
    never see the demand that should make it add nodes."""
    running = list(running)
    free = add(current, total(running), -1)
    for job in queue_order(queued):
        if not fits(job.demand, free):
            if fits(job.demand, current):
                return []  # it fits the nodes up now once running jobs end: no new node needed
            return [b for j in running for b in j.bundles] + list(job.bundles)
    return []
