"""Admission of elastic jobs (jobs/scheduler/admission.py): admitted at the most workers that fit, shrunk for a job
of higher priority before anyone is preempted, grown into free room once nothing waits (no Ray: milliseconds)."""

from __future__ import annotations

from jobs.kinds import KINDS, bundles, demand
from jobs.scheduler.admission import demand_at, in_use, plan, total
from jobs.scheduler.state import QUEUED, RUNNING, JobRecord
from jobs.spec import parse_spec

CAP = {"CPU": 6.0, "GPU": 0.0, "memory": 0.0}
WORKER = {"CPU": 2.0, "GPU": 0.0, "memory": 0.0}


def elastic(id: str, seq: int, lo: int, hi: int, priority: int = 0, state: str = QUEUED, workers: int = 0, **kw):
    return JobRecord(
        id=id, seq=seq, name=id, kind="pretrain", priority=priority, preemptible=True, max_retries=0,
        demand={"CPU": 2.0 * hi, "GPU": 0.0, "memory": 0.0}, driver={}, spec_file="", state=state,
        bundles=[dict(WORKER) for _ in range(hi)], sizes=[lo, hi], workers=workers, **kw,
    )  # fmt: skip


def fixed(id: str, seq: int, cpu: float, priority: int = 0, state: str = QUEUED, preemptible: bool = False, **kw):
    return JobRecord(
        id=id, seq=seq, name=id, kind="sleep", priority=priority, preemptible=preemptible, max_retries=0,
        demand={"CPU": cpu, "GPU": 0.0, "memory": 0.0}, driver={}, spec_file="", state=state, **kw,
    )  # fmt: skip


def test_an_elastic_job_is_admitted_at_the_most_workers_that_fit():
    busy = fixed("busy", 0, 3.0, state=RUNNING)
    p = plan([elastic("e", 1, 1, 3)], [busy], CAP)
    assert p.admit == ["e"] and p.sizes == {"e": 1}  # 3 CPUs free: one 2-CPU worker
    assert plan([elastic("e", 1, 2, 3)], [busy], CAP).admit == []  # its minimum does not fit: it waits
    assert plan([elastic("e", 1, 1, 3)], [], CAP).sizes == {"e": 3}
    running = elastic("e", 1, 1, 3, state=RUNNING, workers=2)
    assert in_use(running)["CPU"] == 4.0 and total([running])["CPU"] == 4.0 and demand_at(running, 1)["CPU"] == 2.0


def test_a_higher_priority_job_shrinks_elastic_jobs_before_preempting_anyone():
    e = elastic("e", 1, 1, 3, state=RUNNING, workers=3, admitted=1.0)
    other = fixed("p", 2, 0.0, state=RUNNING, preemptible=True)
    p = plan([fixed("hi", 3, 4.0, priority=5)], [e, other], CAP)
    assert p.resize == {"e": 1} and p.preempt == {} and p.admit == []
    assert p.waiting["hi"] == "shrinking e to 1"
    # what shrinking to the minimum cannot free is preempted as before
    p = plan([fixed("huge", 3, 6.0, priority=5)], [e], CAP)
    assert p.resize == {} and p.preempt == {"e": "huge"}
    # never for a job of equal or lower priority
    assert plan([fixed("lo", 3, 4.0)], [e], CAP).resize == {}


def test_an_elastic_job_grows_when_room_frees_and_nothing_waits():
    stepped = {"attempt": 2, "done": 40}
    e = elastic("e", 1, 1, 3, state=RUNNING, workers=1, admitted=100.0, attempts=2, progress=stepped)
    assert plan([], [e], CAP, now=200.0, grow_after_s=30.0).resize == {"e": 3}
    assert plan([], [e], CAP, now=110.0, grow_after_s=30.0).resize == {}, "not right after its admission"
    # not before its attempt has stepped at its size: a restart then would only throw its start-up away
    for progress in (None, {"attempt": 1, "done": 40}, {"attempt": 2, "done": 0}):
        e.progress = progress
        assert plan([], [e], CAP, now=200.0, grow_after_s=30.0).resize == {}, progress
    e.progress = stepped
    hi = fixed("hi", 2, 4.0, priority=5, state=RUNNING)
    assert plan([], [e, hi], CAP, now=200.0).resize == {}, "no room"
    waiting = fixed("w", 3, 6.0)
    assert plan([waiting], [e], CAP, now=200.0).resize == {}, "a waiting job comes first"
    # shrunk job requeued and the higher-priority job admitted first: the elastic job gets what is left
    p = plan([elastic("e", 1, 1, 3), fixed("hi", 3, 4.0, priority=5)], [], CAP)
    assert p.admit == ["hi", "e"] and p.sizes == {"e": 1}


def test_the_pretrain_kind_reports_its_sizes(tmp_path):
    spec = parse_spec({
        "kind": "pretrain", "name": "x", "data": {"store": str(tmp_path), "global_batch_size": 64},
        "model": {"name": "vae"},
        "resources": {"workers": {"min": 1, "max": 3}, "cpus_per_worker": 1, "readers_per_worker": 1},
    })  # fmt: skip
    assert KINDS["pretrain"].sizes(spec) == (1, 3)
    assert len(bundles(spec)) == 3 and demand(spec)["CPU"] == 3 * 1.5
    fixed_spec = spec.model_copy(update={"resources": spec.resources.model_copy(update={"workers": 2})})
    assert KINDS["pretrain"].sizes(fixed_spec) is None and KINDS["sleep"].sizes(None) is None
