"""Admission and preemption decisions, job kinds' demands and the scheduler's state file (no Ray: milliseconds)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from jobs.kinds import KINDS, bundles, demand, resolve_paths
from jobs.scheduler.admission import never_fits, plan
from jobs.scheduler.state import QUEUED, RUNNING, JobRecord, StateStore
from jobs.spec import parse_spec

ROOT = Path(__file__).resolve().parents[2]
CAP = {"CPU": 4.0, "GPU": 2.0, "memory": 8 * 2**30}


def job(
    id: str,
    seq: int,
    cpu: float = 1,
    gpu: float = 0,
    priority: int = 0,
    state: str = QUEUED,
    preemptible: bool = False,
    admitted: float | None = None,
    stop_reason: str | None = None,
) -> JobRecord:
    return JobRecord(
        id=id,
        seq=seq,
        name=id,
        kind="pretrain" if preemptible else "sleep",
        priority=priority,
        preemptible=preemptible,
        max_retries=0,
        demand={"CPU": cpu, "GPU": gpu, "memory": 0.0},
        driver={},
        spec_file="",
        state=state,
        admitted=admitted,
        stop_reason=stop_reason,
    )


def test_priority_then_fifo():
    q = [job("a", 1), job("b", 2, priority=5), job("c", 3, priority=5), job("d", 4)]
    assert plan(q, [], CAP).admit == ["b", "c", "a", "d"]


def test_gang_admission_strict_blocks_the_rest():
    running = [job("r", 0, cpu=3, state=RUNNING)]
    q = [job("big", 1, cpu=2, priority=1), job("small", 2, cpu=1)]
    p = plan(q, running, CAP)
    assert p.admit == [] and "needs 2 CPU" in p.waiting["big"] and p.waiting["small"] == "behind big"
    p = plan(q, running, CAP, strict=False)  # best-effort: the small job starts meanwhile
    assert p.admit == ["small"]


def test_best_effort_fills_gaps_in_queue_order():
    running = [job("r", 0, cpu=2, state=RUNNING)]
    q = [job("big", 1, cpu=3), job("s1", 2, cpu=1), job("s2", 3, cpu=2), job("s3", 4, cpu=1)]
    assert plan(q, running, CAP, strict=False).admit == ["s1", "s3"]
    assert plan(q, [], CAP, strict=False).admit == ["big", "s1"]  # once room frees, the waiting job goes first


def test_ray_available_resources_bound_admission():
    assert plan([job("a", 1, cpu=2)], [], CAP, available={"CPU": 1.0, "GPU": 2.0}).admit == []
    assert plan([job("a", 1, cpu=1)], [], CAP, available={"CPU": 1.0, "GPU": 2.0}).admit == ["a"]


def test_preemption_takes_lowest_priority_newest_and_only_what_is_needed():
    running = [
        job("old-low", 1, cpu=1, state=RUNNING, preemptible=True, priority=0, admitted=100.0),
        job("new-low", 2, cpu=1, state=RUNNING, preemptible=True, priority=0, admitted=200.0),
        job("mid", 3, cpu=1, state=RUNNING, preemptible=True, priority=3, admitted=50.0),
        job("pinned", 4, cpu=1, state=RUNNING, preemptible=False, priority=-5, admitted=10.0),
    ]
    p = plan([job("urgent", 5, cpu=1, priority=5)], running, CAP)
    assert p.preempt == {"new-low": "urgent"} and p.admit == []
    p = plan([job("urgent", 5, cpu=2, priority=5)], running, CAP)
    assert p.preempt == {"new-low": "urgent", "old-low": "urgent"}
    p = plan([job("urgent", 5, cpu=4, priority=5)], running, CAP)
    assert p.preempt == {} and "needs 4 CPU" in p.waiting["urgent"]  # pinned is not preemptible: no partial stop


def test_no_preemption_of_equal_priority_nor_twice_for_the_same_room():
    running = [job("r", 1, cpu=4, state=RUNNING, preemptible=True, priority=1)]
    assert plan([job("q", 2, cpu=1, priority=1)], running, CAP).preempt == {}
    stopping = [job("r", 1, cpu=4, state=RUNNING, preemptible=True, stop_reason="preempt")]
    p = plan([job("q", 2, cpu=1, priority=1)], stopping, CAP)
    assert p.preempt == {} and p.waiting["q"] == "waiting for preempted jobs to stop"


def test_preemption_frees_the_resource_that_is_short():
    running = [
        job("cpu-job", 1, cpu=2, state=RUNNING, preemptible=True, admitted=2.0),
        job("gpu-job", 2, cpu=1, gpu=2, state=RUNNING, preemptible=True, admitted=1.0),
    ]
    p = plan([job("wants-gpu", 3, cpu=1, gpu=1, priority=1)], running, CAP)
    assert p.preempt == {"gpu-job": "wants-gpu"}  # the newer CPU-only job is not stopped for nothing


def test_scale_request_for_an_autoscaling_cluster():
    from jobs.scheduler.admission import scale_request

    up_now = {"CPU": 8.0, "GPU": 0.0, "memory": 0.0}  # the head only; GPU workers are added on demand
    r = job("r", 1, cpu=2, state=RUNNING)
    r.bundles = [{"CPU": 2.0}]
    gpu = job("gpu", 2, cpu=8, gpu=2, priority=1)
    gpu.bundles = [{"CPU": 4.0, "GPU": 1.0}] * 2
    assert scale_request([gpu, job("small", 3)], [r], up_now) == [{"CPU": 2.0}] + gpu.bundles
    assert scale_request([job("small", 3, cpu=7)], [r], up_now) == []  # fits these nodes once r ends
    assert scale_request([], [r], up_now) == []


def test_never_fits():
    assert never_fits({"CPU": 2, "GPU": 4, "memory": 0}, CAP) == ["4 GPUs (the cluster has 2)"]
    assert never_fits({"CPU": 4, "GPU": 2, "memory": 0}, CAP) == []


def test_kind_demands_count_every_process(tmp_path):
    vae = yaml.safe_load((ROOT / "jobs" / "pretrain_vae.yaml").read_text())
    spec = parse_spec(vae, "vae.yaml")
    assert demand(spec) == {"CPU": 2.0, "GPU": 0.0, "memory": 0.0}  # 2 x (0.5 worker + 1 x 0.5 reader)
    gpu = parse_spec(
        {
            **vae,
            "resources": {
                "workers": 4,
                "cpus_per_worker": 2,
                "gpus_per_worker": 1,
                "readers_per_worker": 2,
                "cpus_per_reader": 1,
            },
        },
        "gpu.yaml",
    )
    assert demand(gpu) == {"CPU": 16.0, "GPU": 4.0, "memory": 0.0}
    assert bundles(gpu) == [{"CPU": 4.0, "GPU": 1.0, "memory": 0.0}] * 4
    assert KINDS["pretrain"].driver(gpu)["CPU"] == 0  # the workers reserve their own
    emb = parse_spec(
        {
            "kind": "embed",
            "checkpoint": "c",
            "store": "s",
            "out": "o.zarr",
            "resources": {"workers": 3, "gpus_per_worker": 1},
        },
        "e.yaml",
    )
    assert demand(emb) == {"CPU": 3.0, "GPU": 3.0, "memory": 0.0} and KINDS["embed"].preemptible
    sleep = parse_spec({"kind": "sleep", "resources": {"cpus": 2, "memory_gb": 1}}, "s.yaml")
    assert demand(sleep) == KINDS["sleep"].driver(sleep) == {"CPU": 2.0, "GPU": 0.0, "memory": 2.0**30}
    stats = parse_spec({"kind": "stats", "store": "s", "resources": {"cpus": 3}}, "st.yaml")
    assert len(bundles(stats)) == 3 and not KINDS["stats"].preemptible


def test_paths_resolve_against_the_submitting_directory(tmp_path):
    spec = parse_spec(
        {"kind": "ingest", "inputs": ["a.h5ad", "/abs/b.h5ad", "s3://bucket/c.zarr"], "out": "x.store"}, "i.yaml"
    )
    fixed = resolve_paths(spec, tmp_path)
    assert fixed.inputs == [str(tmp_path / "a.h5ad"), "/abs/b.h5ad", "s3://bucket/c.zarr"]
    assert fixed.out == str(tmp_path / "x.store")
    again = parse_spec(yaml.safe_load(yaml.safe_dump(fixed.model_dump(mode="json"))), "back.yaml")
    assert again.model_dump() == fixed.model_dump()  # what the scheduler stores parses back to the same spec


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"kind": "sleep", "resources": {"cpus": 0}}, "resources.cpus"),
        ({"kind": "sleep", "seconds": 1, "extra": 1}, "extra"),
        ({"kind": "stats"}, "store"),
        ({"kind": "nope"}, "expected one of ['embed', 'ingest', 'pretrain', 'sleep', 'stats']"),
    ],
)
def test_bad_specs_name_the_field(raw, message):
    from engine.errors import SpecError

    with pytest.raises(SpecError, match="bad.yaml") as e:
        parse_spec(raw, "bad.yaml")
    assert message in str(e.value)


def test_state_store_round_trip(tmp_path):
    store = StateStore(tmp_path / "scheduler")
    a = job("j0001", 1, cpu=2, priority=3)
    a.event("queued")
    b = job("j0002", 2, state=RUNNING)
    b.ray_ids.append("cellray-j0002-1")
    store.save({a.id: a, b.id: b}, 3)
    jobs, next_seq = StateStore(tmp_path / "scheduler").load()
    assert next_seq == 3 and jobs["j0001"] == a and jobs["j0002"].ray_id == "cellray-j0002-1"
    assert store.write_spec("j0001", "kind: sleep\n").endswith("specs/j0001.yaml")


@pytest.mark.parametrize("path", sorted((ROOT / "jobs").glob("*.yaml")), ids=lambda p: p.name)
def test_example_specs_parse(path):
    from jobs.spec import load_spec

    spec = load_spec(path)
    assert spec.kind in KINDS and demand(spec)["CPU"] > 0
