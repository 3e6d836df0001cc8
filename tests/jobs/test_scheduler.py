"""The scheduler on a real Ray head (`cellray cluster start` in a temp dir, on free ports, 2 CPUs and 2 fake GPUs).

One head for the whole module; the commands run through `jobs.cli.main` in one client process (tests/jobs/
cli_worker.py). The queue tests use `kind: sleep` jobs (they hold their resources for a few seconds); the
preemption test runs real pretraining on the tiny store.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
import yaml

from jobs.scheduler.actor import GROW_AFTER_ENV
from tests.conftest import listening_beyond_loopback
from tests.jobs.conftest import running_head, sample

pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    with running_head(
        tmp_path_factory,
        "--num-gpus", "2", "--system-config", json.dumps({"metrics_report_interval_ms": 500}),
        env_vars={GROW_AFTER_ENV: "5"},  # an elastic job may grow 5 s after its admission, once it has stepped
    ) as h:  # fmt: skip
        yield h


@pytest.fixture(autouse=True)
def _no_job_outlives_its_test(head):
    """A failed test's running jobs would hold the head's CPUs and stall every later test: stop them."""
    yield
    listed = head.cli("job", "list", "--json")  # rc 2 after the last test's `cluster stop`
    for j in json.loads(listed["out"]) if listed["rc"] == 0 else []:
        if j["state"] in ("QUEUED", "RUNNING"):
            head.cli("job", "stop", j["id"])


def _no_processes_of(temp_dir: str) -> list[str]:
    import psutil

    return [
        " ".join(p.info["cmdline"] or [])[:120]
        for p in psutil.process_iter(["cmdline"])
        if any(temp_dir in a for a in (p.info["cmdline"] or []))
    ]


# ------------------------------------------------------------------------------------------------ the queue


def test_priority_then_fifo_with_gang_admission_and_metrics(head):
    """2 CPUs: A and B need both, C (priority 10) needs one. A runs; B and C wait QUEUED and never reach Ray
    (no PENDING Ray job holds anything); when A ends C runs first, then B. The scraped metrics count them."""
    before = head.metrics()
    a = head.submit(head.spec("a", seconds=3, resources={"cpus": 2}))
    head.running(a)
    b = head.submit(head.spec("b", seconds=0, resources={"cpus": 2}))
    c = head.submit(head.spec("c", seconds=0, resources={"cpus": 1}), "--priority", "10")
    jc = head.wait_for(c, lambda j: j["message"] or j["state"] != "QUEUED", "was planned")
    jb = head.job(b)
    if head.job(a)["state"] == "RUNNING":
        assert jb["state"] == jc["state"] == "QUEUED" and not jb["ray_ids"] and not jc["ray_ids"]
        assert jc["message"].startswith("needs 1 CPU, 0 GPU; free 0 CPU, 2 GPU"), jc["message"]
        assert jb["message"] == f"behind {c}"
        cellray_ids = {v["metadata"].get("cellray_id") for v in head.ray_jobs().values()}
        assert b not in cellray_ids and c not in cellray_ids  # never submitted, so never PENDING in Ray
    for job in (a, b, c):
        assert head.cli("job", "wait", job, timeout=300)["rc"] == 0  # SUCCEEDED
    ja, jb, jc = head.job(a), head.job(b), head.job(c)
    assert jc["admitted"] >= ja["ended"] - 1.0  # C waited for A (a tick's slack: A ends when Ray says so)
    assert jb["admitted"] >= jc["ended"] - 1.0  # B (priority 0, submitted before C) waited for C
    listing = head.cli.ok("job", "list")
    assert re.search(rf"{c}\s+c\s+sleep\s+10\s+SUCCEEDED\s+1C 0G", listing), listing
    assert {r["id"] for r in json.loads(head.cli.ok("job", "list", "--json"))} >= {a, b, c}
    assert head.ray_jobs()[f"cellray-{c}-1"]["metadata"] == {
        "job_name": f"{c} c (sleep, priority 10, attempt 1)",  # the Name column of the dashboard's Jobs page
        "cellray_id": c,
        "name": "c",
        "kind": "sleep",
        "priority": "10",
        "attempt": "1",
    }

    deadline = time.monotonic() + 30  # the metrics agent exports every 0.5 s in this cluster
    while True:
        text = head.metrics()
        got = {
            "succeeded": sample(text, "ray_cellray_jobs", state="SUCCEEDED", kind="sleep"),
            "queued": sample(text, "ray_cellray_jobs", state="QUEUED", kind="sleep"),
            "admissions": sample(text, "ray_cellray_admissions_total", kind="sleep")
            - sample(before, "ray_cellray_admissions_total", kind="sleep"),
            "waits": sample(text, "ray_cellray_queue_wait_seconds_count", kind="sleep")
            - sample(before, "ray_cellray_queue_wait_seconds_count", kind="sleep"),
            "capacity_gpu": sample(text, "ray_cellray_capacity_resources", resource="GPU"),
        }
        want = {"succeeded": 3, "queued": 0, "admissions": 3, "waits": 3, "capacity_gpu": 2}
        if got == want:
            break
        assert time.monotonic() < deadline, (got, want)
        time.sleep(0.5)
    # B and C waited for A: two of the three queue waits are over a second
    assert (
        sample(text, "ray_cellray_queue_wait_seconds_bucket", kind="sleep", le="1.0")
        - sample(before, "ray_cellray_queue_wait_seconds_bucket", kind="sleep", le="1.0")
        == 1
    )


def test_the_head_and_its_jobs_listen_on_loopback_only(head):
    """Every port of the head's Ray (GCS, raylet, object manager, dashboard and its agents, metrics, workers, a
    job's driver) is on 127.0.0.1: nothing is reachable from another machine by default."""
    job = head.submit(head.spec("listener", seconds=30, resources={"cpus": 1}))
    head.running(job)
    assert listening_beyond_loopback(head.info["temp_dir"]) == []
    assert head.info["address"].startswith("127.0.0.1:"), head.info
    head.cli.ok("job", "stop", job)


def test_job_that_can_never_fit_is_refused_at_submit(head):
    r = head.cli("job", "submit", head.spec("big", seconds=1, resources={"cpus": 1, "gpus": 4}))
    assert r["rc"] == 2 and r["out"] == ""
    lines = r["err"].strip().splitlines()
    assert len(lines) == 1 and "4 GPUs (the cluster has 2)" in lines[0] and "never run" in lines[0], r["err"]
    assert all(j["name"] != "big" for j in json.loads(head.cli.ok("job", "list", "--json")))


def test_logs_stop_and_wait_exit_codes(head):
    """`job logs` shows a running job's log; a queued job stopped never reaches Ray; `job wait` exits 0 / 1 / 2;
    a job that fails on its own is not retried."""
    blocker = head.submit(head.spec("blocker", seconds=120, resources={"cpus": 2}))
    head.running(blocker)
    queued = head.submit(head.spec("queued", seconds=1, resources={"cpus": 1}))
    assert head.job(queued)["state"] == "QUEUED"
    assert head.cli.ok("job", "stop", queued).strip() == f"{queued}: STOPPED"
    j = head.job(queued)
    assert j["state"] == "STOPPED" and j["ray_ids"] == [] and j["attempts"] == 0
    assert queued not in {v["metadata"].get("cellray_id") for v in head.ray_jobs().values()}
    assert head.cli("job", "wait", queued)["rc"] == 1  # STOPPED
    r = head.cli("job", "logs", queued)
    assert r["rc"] == 0 and "has not run yet" in r["err"]

    deadline = time.monotonic() + 120
    while "tick 1," not in (out := head.cli.ok("job", "logs", blocker)):
        assert time.monotonic() < deadline, out
        time.sleep(0.5)
    assert head.job(blocker)["state"] == "RUNNING"
    assert "blocker: holding 2 CPUs" in out and "jobs.cli run" in out
    r = head.cli("job", "wait", blocker, "--timeout", "1")
    assert r["rc"] == 2 and "still RUNNING after 1 s" in r["err"]
    head.cli.ok("job", "stop", blocker)
    assert head.cli("job", "wait", blocker, timeout=120)["rc"] == 1
    assert head.job(blocker)["state"] == "STOPPED"

    bad = head.submit(head.spec("broken", seconds=0, fail="the data are wrong"), "--max-retries", "2")
    r = head.cli("job", "wait", bad, timeout=300)
    assert r["rc"] == 1 and "the data are wrong" in r["out"]
    jb = head.job(bad)
    assert jb["state"] == "FAILED" and jb["attempts"] == 1 and jb["retries"] == 0  # an error of its own: no retry


def test_lost_driver_is_retried(head):
    import psutil

    before = head.metrics()
    job = head.submit(head.spec("fragile", seconds=30, resources={"cpus": 1}), "--max-retries", "1")
    spec_file = head.running(job)["spec_file"]
    drivers = [
        p
        for p in psutil.process_iter(["cmdline"])
        if spec_file in " ".join(p.info["cmdline"] or []) and "jobs.cli" in " ".join(p.info["cmdline"] or [])
    ]
    assert drivers, "the job's driver process was not found"
    for p in drivers:
        p.kill()  # as the kernel's OOM killer or a lost node would
    j = head.wait_for(job, lambda j: j["attempts"] == 2, "was retried")
    assert j["retries"] == 1 and j["ray_ids"] == [f"cellray-{job}-1", f"cellray-{job}-2"], j
    assert head.ray_jobs()[f"cellray-{job}-1"]["status"] == "FAILED"
    head.running(job)
    assert head.ray_jobs()[f"cellray-{job}-2"]["metadata"]["attempt"] == "2"
    head.cli.ok("job", "stop", job)
    assert head.ended(job)["state"] == "STOPPED"
    deadline = time.monotonic() + 30
    while (
        sample(head.metrics(), "ray_cellray_retries_total", kind="sleep")
        - sample(before, "ray_cellray_retries_total", kind="sleep")
        != 1
    ):
        assert time.monotonic() < deadline
        time.sleep(0.5)


def test_killed_scheduler_keeps_queue_and_readopts_running_job(head):
    running = head.submit(head.spec("long", seconds=120, resources={"cpus": 2}))
    ray_id = head.running(running)["ray_ids"][-1]
    waiting = head.submit(head.spec("after", seconds=0, resources={"cpus": 1}), "--priority", "3")
    ping = "from jobs.scheduler.client import call\nresult = call('ping')['pid']"
    before = head.cli.py(ping)
    head.cli.py("import ray\nray.kill(ray.get_actor('cellray-scheduler', namespace='cellray'), no_restart=False)")
    deadline = time.monotonic() + 60  # ray.kill returns before the process is gone: a ping may still reach it
    while head.cli.py(ping) == before:
        assert time.monotonic() < deadline, "the scheduler was not restarted"
        time.sleep(0.5)
    # a new scheduler process, restarted by Ray from the state directory
    assert head.job(waiting)["state"] == "QUEUED"
    j = head.job(running)
    assert j["state"] == "RUNNING" and j["ray_ids"] == [ray_id]  # re-adopted by its Ray submission id
    head.cli.ok("job", "stop", running)  # the new scheduler controls it: stops it through Ray
    jr, jw = head.ended(running), head.ended(waiting)
    assert jr["state"] == "STOPPED" and jr["attempts"] == 1 and jw["state"] == "SUCCEEDED"
    assert jw["admitted"] >= jr["ended"] - 1.0
    assert head.ray_jobs()[ray_id]["status"] == "STOPPED"


# ------------------------------------------------------------------------------------------------ real kinds


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_h5ads) -> Path:
    """The tiny inputs ingested in this process (no Ray needed here)."""
    from engine.store.ingest import IngestConfig, ingest

    out = tmp_path_factory.mktemp("sched_store") / "tiny.store"
    ingest(tiny_h5ads, out, IngestConfig(shard_cells=400, obs_keys=("cell_type", "batch"), executor="local"))
    return out


def test_stats_job_runs_in_its_placement_group(head, store):
    spec = head.work / "stats.yaml"
    spec.write_text(
        yaml.safe_dump(
            {"kind": "stats", "name": "tiny-stats", "store": str(store), "stats": {"hvg": 50}, "resources": {"cpus": 2}}
        )
    )
    job = head.submit(spec)
    j = head.ended(job)
    assert j["state"] == "SUCCEEDED", head.cli.ok("job", "logs", job)
    from engine.preprocess.stats import load_stats

    stats = load_stats(store)
    assert int(stats.highly_variable.sum()) == 50 and stats.n_cells == 1483


def pretrain_spec(store: Path, output: Path, trace: Path | None, steps: int) -> dict:
    """A VAE in Ray Train's local mode (workers: 0, the loop in the job's driver, which reserves the CPU): the
    checkpoint/resume path of every run, without a worker group's start-up cost."""
    return {
        "kind": "pretrain",
        "name": output.name,
        "data": {"store": str(store), "batch_size": 64, "obs_keys": ["cell_type", "batch"], "seed": 3},
        "model": {"name": "vae", "config": {"n_latent": 4, "n_hidden": 32, "dropout": 0.0}},
        "train": {
            "max_steps": steps,
            "lr": 1e-3,
            "checkpoint_every": 10,
            "report_every": 10,
            "keep_checkpoints": 50,
            "output": str(output),
            "max_failures": 0,
        },
        "resources": {"workers": 0, "cpus_per_worker": 1, "readers_per_worker": 0},
        "debug": {"trace_dir": str(trace) if trace else None},
    }


def test_preempted_pretraining_resumes_from_checkpoint_exactly(head, store, tmp_path):
    """A low-priority pretraining job is preempted by a higher-priority job that needs the CPUs, goes back to the
    queue, resumes from its latest checkpoint, and ends with the steps and parameters of an uninterrupted run."""
    import torch

    from engine.train.checkpoint import MODEL_FILE, latest_checkpoint, read_meta

    steps = 120
    ref_spec = tmp_path / "ref.yaml"
    ref_spec.write_text(yaml.safe_dump(pretrain_spec(store, tmp_path / "ref", None, steps)))
    low_spec = tmp_path / "low.yaml"
    paced = pretrain_spec(store, tmp_path / "low", tmp_path / "trace", steps)
    paced["debug"]["min_step_seconds"] = 0.1  # 12 s of steps at least: preempted before its end on a busy machine
    low_spec.write_text(yaml.safe_dump(paced))

    low = head.submit(low_spec)
    head.running(low)
    deadline = time.monotonic() + 300
    while latest_checkpoint(tmp_path / "low", required=False) is None:  # at least one checkpoint to resume from
        assert time.monotonic() < deadline and head.job(low)["state"] == "RUNNING", head.job(low)
        time.sleep(0.2)
    high = head.submit(head.spec("urgent", seconds=0, resources={"cpus": 2}), "--priority", "10")
    ref = head.submit(ref_spec)  # the uninterrupted run of the same spec: it queues behind urgent, then runs beside low
    j = head.wait_for(low, lambda j: j["preemptions"] >= 1, "was preempted", timeout=120)
    assert any(f"preempted by {high}" in e for e in j["events"]), j["events"]
    jh = head.ended(high)
    assert jh["state"] == "SUCCEEDED"
    jl = head.ended(low, timeout=600)
    assert jl["state"] == "SUCCEEDED" and jl["attempts"] == 2 and jl["preemptions"] == 1, jl
    assert jl["admitted"] >= jh["ended"] - 1.0

    jr = head.ended(ref, timeout=600)
    assert jr["state"] == "SUCCEEDED" and jr["attempts"] == 1 and jr["admitted"] >= jh["ended"] - 1.0, jr

    # resumed, not restarted: the second attempt's first step follows a checkpoint of the first
    trace = [json.loads(line) for line in (tmp_path / "trace" / "rank0.jsonl").read_text().splitlines()]
    pids = list(dict.fromkeys(t["pid"] for t in trace))
    assert len(pids) == 2, pids
    first = [t["step"] for t in trace if t["pid"] == pids[0]]
    second = [t["step"] for t in trace if t["pid"] == pids[1]]
    assert second[0] > 1 and (second[0] - 1) % 10 == 0 and second[0] - 1 <= first[-1], (first[-1], second[0])
    assert second == list(range(second[0], steps + 1))

    got, want = latest_checkpoint(tmp_path / "low"), latest_checkpoint(tmp_path / "ref")
    assert read_meta(got)["step"] == read_meta(want)["step"] == steps
    a = torch.load(got / MODEL_FILE, weights_only=True)
    b = torch.load(want / MODEL_FILE, weights_only=True)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
    text = head.metrics()
    assert re.search(r'ray_cellray_preemptions_total\{[^}]*kind="pretrain"[^}]*\} 1(\.0)?$', text, re.MULTILINE), [
        ln for ln in text.splitlines() if "preemptions" in ln
    ]


def test_elastic_job_shrinks_for_a_higher_priority_job_and_grows_back(head, store, tmp_path):
    """An elastic pretraining job (workers {min: 1, max: 2}) runs at 2; a higher-priority job that needs more than
    is free shrinks it to 1 (nobody is preempted); when that job ends it grows back to 2. Every step is done once
    in the end, with the global batches of a fixed-size run."""
    from bench.elastic import last_attempts, planned, trace_entries

    steps, trace = 75, tmp_path / "trace"
    spec = tmp_path / "elastic.yaml"
    spec.write_text(yaml.safe_dump({
        "kind": "pretrain", "name": "elastic",
        "data": {"store": str(store), "global_batch_size": 60, "obs_keys": ["cell_type"],
                 "loader": {"block_size": 64, "buffer_blocks": 2}},
        "model": {"name": "probe", "config": {"label_key": "cell_type", "n_hidden": 16}},
        "train": {"max_steps": steps, "lr": 3e-2, "checkpoint_every": 5, "report_every": 5, "max_failures": 0,
                  "output": str(tmp_path / "run")},
        "resources": {"workers": {"min": 1, "max": 2}, "cpus_per_worker": 0.5, "readers_per_worker": 0},
        "debug": {"trace_dir": str(trace), "min_step_seconds": 0.3},
    }))  # fmt: skip
    e = head.submit(spec)
    j = head.wait_for(e, lambda j: j["ray_status"] == "RUNNING" and j["workers"] == 2, "ran at 2 workers")
    assert j["sizes"] == [1, 2]
    assert "workers    2 now, allowed 1-2 (elastic; 0 resizes)" in head.cli.ok("job", "status", e)
    deadline = time.monotonic() + 300
    while not (tmp_path / "run").exists() or not list((tmp_path / "run").glob("checkpoint_*")):
        assert time.monotonic() < deadline, head.job(e)
        time.sleep(0.2)
    # the scheduler grows the shrunk attempt once it has stepped at 1 worker (and 5 s after its admission: the head's
    # CELLRAY_GROW_AFTER_S)
    high = head.submit(head.spec("urgent", seconds=5, resources={"cpus": 1.5}), "--priority", "10")
    j = head.wait_for(e, lambda j: j["resizes"] >= 1, "was shrunk", timeout=120)
    assert any("resizing from 2 to 1 workers" in ev for ev in j["events"]), j["events"]
    assert head.ended(high)["state"] == "SUCCEEDED"
    j = head.wait_for(e, lambda j: j["resizes"] >= 2 and j["workers"] == 2, "grew back", timeout=240)
    assert any("resizing from 1 to 2 workers" in ev for ev in j["events"]), j["events"]
    j = head.ended(e, timeout=600)
    assert j["state"] == "SUCCEEDED" and j["preemptions"] == 0 and j["attempts"] == 3, j
    seen = last_attempts(trace_entries(trace))
    assert sorted(seen) == list(range(1, steps + 1)), "no step lost"
    worlds = [seen[s]["world"] for s in sorted(seen)]
    assert worlds[0] == 2 and worlds[-1] == 2, (worlds, j["events"])
    # the shrunk attempt stepped at 1 worker before it grew (its steps may be redone at 2 if it had no checkpoint)
    assert any(e["world_size"] == 1 for e in trace_entries(trace)), j["events"]
    want = planned(str(store), steps)
    assert all(seen[s]["cells"] == want[s - 1] for s in range(1, steps + 1))


def test_cluster_stop_leaves_no_process_and_a_restart_keeps_the_queue(head):
    """Runs last. `cellray cluster stop` ends this cluster and nothing else (its process group and the processes
    naming its temp dir); started again on the same state directory, the scheduler keeps the queue, and a job
    that was running when the cluster went away goes back to the queue and runs again."""
    running = head.submit(head.spec("interrupted", seconds=6, resources={"cpus": 2}))
    head.running(running)
    queued = head.submit(head.spec("survivor", seconds=0, resources={"cpus": 1}))
    temp_dir = head.info["temp_dir"]
    assert _no_processes_of(temp_dir), "the cluster should be running before the stop"
    head.cli.ok("cluster", "stop", timeout=120)
    assert not (head.state / "cluster.json").exists()
    deadline = time.monotonic() + 30
    while left := _no_processes_of(temp_dir):
        assert time.monotonic() < deadline, left
        time.sleep(0.5)

    head.cli.ok("cluster", "start", "--num-cpus", "2", "--object-store-mb", "300", timeout=600)
    jr, jq = head.ended(running), head.ended(queued)
    assert jr["state"] == jq["state"] == "SUCCEEDED", (jr, jq)
    assert jr["attempts"] == 2 and any("lost with the cluster" in e for e in jr["events"]), jr["events"]
    assert jq["attempts"] == 1 and jq["admitted"] >= jr["ended"] - 1.0  # the queue order held across the restart
    head.cli.ok("cluster", "stop", timeout=120)
