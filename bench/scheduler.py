"""Submit to RUNNING on an idle local cluster: `cellray job submit` (queue, gang admission, then Ray Jobs) vs a
plain Ray Jobs `submit_job` of the same entrypoint, same run, same cluster.

    python bench/scheduler.py [--quick] [--repeats N]

Starts a local cluster (`cellray cluster start`: 2 CPUs, the scheduler) in a temp dir, then alternates:
- cellray: `cellray job submit sleep.yaml` (in this process: `jobs.cli.main`, so no interpreter start-up), the
  scheduler admits it and submits a Ray Job; times to "admitted" (the scheduler's Ray submission id exists) and to
  RUNNING (Ray's job status, polled every 20 ms: the same event for both sides).
- Ray Jobs: `JobSubmissionClient.submit_job` of the same entrypoint (`python -m jobs.cli run sleep.yaml`), the
  same working_dir and one entrypoint CPU.
The job is `kind: sleep` with `seconds: 0` (RUNNING -> SUCCEEDED is the driver's start-up). A warm-up job of
each side runs first (the working_dir upload and the first worker processes are paid once per cluster).
Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def wait_status(client, ray_id: str, wanted: set[str], timeout: float = 300.0) -> float:
    deadline = time.monotonic() + timeout
    while True:
        try:
            status = client.get_job_status(ray_id).value
        except RuntimeError:  # not known to Ray yet
            status = None
        if status in wanted:
            return time.perf_counter()
        if time.monotonic() > deadline:
            raise TimeoutError(f"{ray_id}: still {status} after {timeout} s")
        time.sleep(0.02)


def cellray_once(spec: Path, client) -> dict[str, float]:
    from jobs.cli import main
    from jobs.scheduler.client import call

    out = io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(out):
        assert main(["job", "submit", str(spec)]) == 0
    job_id = out.getvalue().strip()
    t_submitted = time.perf_counter()
    while not (ray_ids := call("get", job_id)["ray_ids"]):
        time.sleep(0.02)
    t_admitted = time.perf_counter()
    t_running = wait_status(client, ray_ids[-1], {"RUNNING", "SUCCEEDED"})
    t_done = wait_status(client, ray_ids[-1], {"SUCCEEDED", "FAILED", "STOPPED"})
    while call("get", job_id)["state"] == "RUNNING":  # the scheduler sees it end (next pass)
        time.sleep(0.02)
    return {
        "submit_call": t_submitted - t0,
        "admitted": t_admitted - t0,
        "running": t_running - t0,
        "succeeded": t_done - t0,
    }


def ray_jobs_once(spec: Path, client, n: int) -> dict[str, float]:
    from engine.runtime import PROJECT_ROOT
    from jobs.scheduler.actor import EXCLUDES, entrypoint

    t0 = time.perf_counter()
    ray_id = client.submit_job(
        entrypoint=entrypoint(str(spec), sys.executable),
        submission_id=f"plain-{n}",
        runtime_env={"working_dir": str(PROJECT_ROOT), "excludes": EXCLUDES},
        entrypoint_num_cpus=1,
    )
    t_submitted = time.perf_counter()
    t_running = wait_status(client, ray_id, {"RUNNING", "SUCCEEDED"})
    t_done = wait_status(client, ray_id, {"SUCCEEDED", "FAILED", "STOPPED"})
    return {"submit_call": t_submitted - t0, "running": t_running - t0, "succeeded": t_done - t0}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="3 repeats")
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args()
    repeats = 3 if args.quick else args.repeats

    import ray
    from ray.job_submission import JobSubmissionClient

    from jobs.cluster.local import start_cluster, stop_cluster
    from jobs.scheduler.client import connect, scheduler

    with tempfile.TemporaryDirectory(prefix="cellray-bench-") as d:
        state = Path(d) / "state"
        spec = Path(d) / "sleep.yaml"
        spec.write_text("kind: sleep\nname: bench\nseconds: 0\nresources: {cpus: 1}\n")
        t = time.perf_counter()
        cluster = start_cluster(state, num_cpus=2, num_gpus=0, object_store_mb=256)
        try:
            connect(cluster.address)
            scheduler(create_in=str(state))
            t_up = time.perf_counter() - t
            client = JobSubmissionClient(cluster.dashboard_url)
            cellray_once(spec, client)  # warm-up: working_dir upload, first workers
            ray_jobs_once(spec, client, -1)
            ours, plain = [], []
            for i in range(repeats):
                ours.append(cellray_once(spec, client))
                plain.append(ray_jobs_once(spec, client, i))
        finally:
            ray.shutdown()
            stop_cluster(state)

    def med(rows: list[dict], key: str) -> float:
        return statistics.median(r[key] for r in rows)

    result = {
        "repeats": repeats,
        "cluster_start_s": round(t_up, 2),
        "cellray_submit_call_s": round(med(ours, "submit_call"), 3),
        "cellray_admitted_s": round(med(ours, "admitted"), 3),
        "cellray_running_s": round(med(ours, "running"), 3),
        "cellray_succeeded_s": round(med(ours, "succeeded"), 3),
        "ray_jobs_running_s": round(med(plain, "running"), 3),
        "ray_jobs_succeeded_s": round(med(plain, "succeeded"), 3),
    }
    result["running_ratio"] = round(result["cellray_running_s"] / result["ray_jobs_running_s"], 3)
    print(f"idle local cluster (2 CPUs), medians of {repeats}; cluster start + scheduler {t_up:.1f} s")
    print(f"{'':24}{'submit call':>12}{'admitted':>10}{'RUNNING':>10}{'SUCCEEDED':>11}")
    print(
        f"{'cellray job submit':24}{result['cellray_submit_call_s']:>12.3f}{result['cellray_admitted_s']:>10.3f}"
        f"{result['cellray_running_s']:>10.3f}{result['cellray_succeeded_s']:>11.3f}"
    )
    print(
        f"{'Ray Jobs submit_job':24}{med(plain, 'submit_call'):>12.3f}{'-':>10}"
        f"{result['ray_jobs_running_s']:>10.3f}{result['ray_jobs_succeeded_s']:>11.3f}"
    )
    print(f"submit -> RUNNING: cellray / Ray Jobs = {result['running_ratio']:.2f}x")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
