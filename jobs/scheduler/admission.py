"""Admission: which queued jobs start now, and which running jobs make room for them. Pure functions.

Order: priority (high first), then submission order. A job is admitted only when all of its demand is free at
once (gang admission): Ray would otherwise start part of it and hold that part while the rest waits (Ray Jobs
PENDING for up to 15 minutes, Ray Train's placement group retried without end). `strict` queueing (the default)
lets nothing pass a job that waits, so a large job is never starved by a stream of small ones; `best-effort`
lets jobs behind it that fit start meanwhile, as Kueue's BestEffortFIFO does (the waiting job still comes first
whenever room frees up, so only jobs that fit into the gaps pass it).

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


def total(jobs: Iterable[JobRecord]) -> dict[str, float]:
    out = {r: 0.0 for r in RESOURCES}
    for j in jobs:
        out = add(out, j.demand)
    return out


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
    preempt: dict[str, str] = field(default_factory=dict)  # running job id -> the queued job it makes room for
    waiting: dict[str, str] = field(default_factory=dict)  # job id -> why it waits


def plan(
    queued: Iterable[JobRecord],
    running: Iterable[JobRecord],
    capacity: dict[str, float],
    available: dict[str, float] | None = None,
    strict: bool = True,
) -> Plan:
    """Admissions and preemptions for this moment.

    `running`: every admitted job not yet ended (those being stopped too); their demand is in use.
    `capacity`: the cluster's total resources. `available`: what Ray itself reports free (catches resources
    held outside the scheduler, or not yet released by a job that just ended); None to ignore.
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
        if fits(job.demand, free):
            out.admit.append(job.id)
            free = add(free, job.demand, -1)
            continue
        if not fits(job.demand, add(free, releasing)):
            victims = _victims(job, running, taken, add(free, releasing))
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
            for rest in queue_order(queued):
                if rest.id not in out.admit and rest.id not in out.waiting:
                    out.waiting[rest.id] = f"behind {job.id}"
            break
    return out


def _victims(job: JobRecord, running: list[JobRecord], taken: set[str], free: dict[str, float]) -> list[JobRecord]:
    """The fewest, lowest-priority preemptible running jobs whose resources make `job` fit; [] if none do."""
    candidates = [
        r
        for r in running
        if r.preemptible and r.stop_reason is None and r.id not in taken and r.priority < job.priority
    ]
    candidates.sort(key=lambda r: (r.priority, -(r.admitted or 0.0), -r.seq))
    chosen: list[JobRecord] = []
    room = dict(free)
    for c in candidates:
        if fits(job.demand, room):
            break
        chosen.append(c)
        room = add(room, c.demand)
    if not fits(job.demand, room):
        return []
    for c in reversed(list(chosen)):  # drop any the job does not need after all (e.g. CPU-only when GPUs lack)
        if fits(job.demand, add(room, c.demand, -1)):
            chosen.remove(c)
            room = add(room, c.demand, -1)
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
