"""The scheduler: a detached, named, restartable Ray actor on the head node that holds the queue.

Its loop, every `tick_s` (and at once on a submit or a stop): follow every admitted job's Ray Job to its end
(requeue it when it was preempted, or lost with retries left), then admit what fits (jobs/scheduler/admission.py)
as Ray Jobs: `python -m jobs.cli run SPEC --address auto` with this project as working_dir and metadata
(cellray id, kind, priority, attempt), so the dashboard's Jobs page shows each attempt with its logs.

Every transition is written to the state directory before it is acted on (a job is recorded RUNNING with its
Ray submission id before it is submitted), so a restarted scheduler re-adopts running jobs by their Ray
submission ids and keeps the queue; on a restarted cluster, jobs whose Ray record is gone go back to the queue.

Retries (`max_retries`) only follow lost processes and nodes: the driver killed by a signal, or Ray's job
supervisor lost with its node. A job that exits on its own with an error (a spec or data error exits 2) fails.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from typing import Any

from engine.errors import SchedulerError
from jobs.kinds.base import ATTEMPT_ENV, JOB_ID_ENV, WORKERS_ENV
from jobs.scheduler import admission
from jobs.scheduler.metrics import SchedulerMetrics
from jobs.scheduler.state import FAILED, QUEUED, RUNNING, STOPPED, SUCCEEDED, TERMINAL, JobRecord, StateStore

log = logging.getLogger(__name__)

NAME = "cellray-scheduler"
NAMESPACE = "cellray"
# What the working_dir of a job leaves out (the same as `cellray run --address`).
EXCLUDES = [".venv*", "data", "runs", ".git", "bench/out", "**/__pycache__", "*.egg-info"]
# Ray Job errors that mean the job's process or node was lost, not that the job failed on its own.
LOST_ERRORS = {"JOB_SUPERVISOR_ACTOR_DIED", "JOB_SUPERVISOR_ACTOR_UNKNOWN_FAILURE"}
RESTOP_AFTER_S = 15.0  # ask Ray again to stop a job that has not stopped after this long
GROW_AFTER_ENV = "CELLRAY_GROW_AFTER_S"  # the head's environment: seconds an elastic job runs before it may grow
MAX_SUBMIT_FAILURES = 20  # consecutive failed submissions of one job before it fails (transient errors retry)


def entrypoint(spec_file: str, python: str = "python") -> str:
    """The command a Ray Job runs for every kind: `cellray run SPEC` on the cluster it runs in (RAY_ADDRESS)."""
    import shlex

    return f"{shlex.quote(python)} -m jobs.cli run {shlex.quote(spec_file)} --address auto"


def killed_by_signal(exit_code: int | None) -> bool:
    """A driver killed from outside (SIGKILL by the OOM killer, a lost node's processes): negative from Python's
    subprocess, or 128 + signal from a shell."""
    return exit_code is not None and (exit_code < 0 or exit_code > 128)


def after_end(stop_reason: str | None, status: str, error: str | None, exit_code: int | None, can_retry: bool) -> str:
    """What becomes of a job whose Ray job ended with `status`: "preempted" or "resized" (requeued to resume),
    "retry" (requeued after a lost process, when retries are left), or the state it ends in. A job stopped by
    the scheduler may finish before the stop lands: its work is done, so it succeeds rather than run again."""
    if stop_reason in ("preempt", "resize") and status != "SUCCEEDED":
        return "preempted" if stop_reason == "preempt" else "resized"
    if stop_reason == "user" or status == "STOPPED":
        return STOPPED
    if status == "SUCCEEDED":
        return SUCCEEDED
    if (error in LOST_ERRORS or killed_by_signal(exit_code)) and can_retry:
        return "retry"
    return FAILED


class Scheduler:
    """The queue. Methods are called from the CLI (`cellray job ...`) through Ray; the loop runs in a thread."""

    def __init__(
        self,
        state_dir: str,
        queueing: str = "strict",
        capacity: dict[str, float] | None = None,
        tick_s: float = 0.5,
        grow_after_s: float | None = None,  # an elastic job runs this long at one size before it is grown
    ):
        from engine.runtime import PROJECT_ROOT

        if queueing not in ("strict", "best-effort"):
            raise SchedulerError(f"queueing: {queueing!r}, expected strict or best-effort")
        self.store = StateStore(os.path.expanduser(state_dir))
        self.jobs, self.next_seq = self.store.load()
        self.queueing = queueing
        self.fixed_capacity = capacity
        self.tick_s = tick_s
        self.grow_after_s = float(os.environ.get(GROW_AFTER_ENV, 30.0)) if grow_after_s is None else grow_after_s
        self.project = str(PROJECT_ROOT)
        self.python = sys.executable
        self.lock = threading.RLock()
        self.wake = threading.Event()
        self.metrics = SchedulerMetrics()
        self.submit_failures: dict[str, int] = {}
        self.scale_requested: list[dict] | None = None
        self._client = None
        self.started = time.time()
        running = [j.id for j in self.jobs.values() if j.state == RUNNING]
        queued = [j.id for j in self.jobs.values() if j.state == QUEUED]
        log.warning(
            "cellray scheduler up (state %s): re-adopting %d running job(s) %s, %d queued",
            self.store.dir,
            len(running),
            running,
            len(queued),
        )
        threading.Thread(target=self._loop, name="cellray-scheduler", daemon=True).start()

    # ------------------------------------------------------------------------------------------------ calls

    def ping(self) -> dict[str, Any]:
        return {
            "state_dir": str(self.store.dir),
            "queueing": self.queueing,
            "grow_after_s": self.grow_after_s,
            "pid": os.getpid(),
            "started": self.started,
        }

    def submit(self, request: dict[str, Any]) -> dict[str, Any]:
        """Queue a job. `request`: name, kind, priority, preemptible, max_retries, demand, bundles, driver, spec
        (the YAML text, paths already absolute). Refuses, with one line, a job that can never fit the cluster."""
        capacity = self.capacity()
        too_big = admission.never_fits(request["demand"], capacity)
        too_big += self._bundle_problems(request.get("bundles") or [])
        if too_big:
            raise SchedulerError(f"{request['name']}: needs {'; '.join(too_big)}: it can never run on this cluster")
        with self.lock:
            seq = self.next_seq
            self.next_seq += 1
            job_id = f"j{seq:04d}"
            now = time.time()
            job = JobRecord(
                id=job_id,
                seq=seq,
                name=request["name"],
                kind=request["kind"],
                priority=int(request["priority"]),
                preemptible=bool(request["preemptible"]),
                max_retries=int(request["max_retries"]),
                demand=request["demand"],
                driver=request["driver"],
                bundles=request.get("bundles") or [],
                sizes=list(request["sizes"]) if request.get("sizes") else None,
                spec_file=self.store.write_spec(job_id, request["spec"]),
                submitted=now,
                queued_since=now,
            )
            job.event(f"queued (priority {job.priority})", now)
            self.jobs[job_id] = job
            self._save()
        self.wake.set()
        return job.to_dict()

    def list(self) -> list[dict[str, Any]]:
        with self.lock:
            return [j.to_dict() for j in sorted(self.jobs.values(), key=lambda j: j.seq)]

    def get(self, job_id: str) -> dict[str, Any]:
        with self.lock:
            return self._job(job_id).to_dict()

    def stop(self, job_id: str) -> dict[str, Any]:
        """A queued job stops at once and never reaches Ray; a running one is stopped through Ray Jobs."""
        with self.lock:
            job = self._job(job_id)
            if job.state == QUEUED:
                self._finish(job, STOPPED, "stopped while queued")
            elif job.state == RUNNING:
                job.stop_reason, job.stop_requested, job.message = "user", time.time(), "stopping"
                job.event("stop requested")
                self._save()
                self._stop_ray_job(job)
            return job.to_dict()

    def logs(self, job_id: str, attempt: int | None = None) -> dict[str, Any]:
        """The driver log of one attempt (default: the latest) from Ray Jobs."""
        with self.lock:
            job = self._job(job_id).to_dict()
        if not job["ray_ids"]:
            return {"job": job, "attempt": 0, "text": ""}
        attempt = attempt or len(job["ray_ids"])
        try:
            text = self.client().get_job_logs(job["ray_ids"][attempt - 1])
        except Exception as e:  # the record is gone with a restarted cluster, or the dashboard is down
            text = f"(no log for attempt {attempt}: {e})\n"
        return {"job": job, "attempt": attempt, "text": text}

    def report_progress(self, job_id: str, attempt: int, progress: dict[str, Any]) -> None:
        """A running job's progress (jobs/kinds/metrics.py), kept in its record for `cellray job status/list`.
        Not written to disk on its own: the next transition saves it. The latest attempt's report counts even when
        it arrives after Ray said the attempt ended (its last one races the driver's exit); an earlier attempt's
        late report does not, nor one older than the report kept (`JobRecord.take_progress`)."""
        with self.lock:
            job = self.jobs.get(job_id)
            if job is not None and job.take_progress(attempt, progress) and job.state in TERMINAL:
                self._save()

    def info(self) -> dict[str, Any]:
        import ray

        with self.lock:
            running = [j for j in self.jobs.values() if j.state == RUNNING]
            counts = {s: sum(j.state == s for j in self.jobs.values()) for s in (QUEUED, RUNNING, *TERMINAL)}
        return {
            **self.ping(),
            "capacity": self.capacity(),
            "admitted": admission.total(running),
            "available": {r: ray.available_resources().get(r, 0.0) for r in ("CPU", "GPU", "memory")},
            "jobs": counts,
        }

    def tick(self) -> None:
        """One pass of the loop now (the loop also runs on its own)."""
        self._tick()

    # ------------------------------------------------------------------------------------------------ loop

    def _loop(self) -> None:
        while True:
            try:
                self._tick()
            except Exception:  # keep the queue alive through a dashboard restart or a bad record
                log.exception("scheduler pass failed; next pass in %.1f s", self.tick_s)
            self.wake.wait(self.tick_s)
            self.wake.clear()

    def _tick(self) -> None:
        with self.lock:
            changed = self._follow_running()
            changed |= self._admit()
            if changed:
                self._save()
            jobs = list(self.jobs.values())
        running = [j for j in jobs if j.state == RUNNING]
        self.metrics.update(jobs, self.capacity(), admission.total(running))

    def _follow_running(self) -> bool:
        changed = False
        for job in [j for j in self.jobs.values() if j.state == RUNNING]:
            try:
                info = self.client().get_job_info(job.ray_id)
            except Exception as e:
                if "does not exist" not in str(e) and "404" not in str(e):
                    log.warning("%s: Ray job %s not readable now: %s", job.id, job.ray_id, e)
                    continue
                # Ray has no record of it: the cluster was restarted under the scheduler. Not the job's fault.
                self._requeue(job, f"attempt {job.attempts} lost with the cluster; requeued")
                changed = True
                continue
            status = info.status.value
            if status == "RUNNING" and job.ray_status != "RUNNING":
                job.event(f"running (attempt {job.attempts})")
                job.started = job.started or time.time()
            if status != job.ray_status:
                job.ray_status, changed = status, True
            if status in ("PENDING", "RUNNING"):
                if job.stop_reason and time.time() - (job.stop_requested or 0) > RESTOP_AFTER_S:
                    job.stop_requested = time.time()
                    self._stop_ray_job(job)
                continue
            changed = True
            error = getattr(info.error_type, "value", info.error_type)
            outcome = after_end(job.stop_reason, status, error, info.driver_exit_code, job.retries < job.max_retries)
            if outcome == "preempted":
                self._requeue(job, f"preempted (attempt {job.attempts}); requeued to resume", preempted=True)
            elif outcome == "resized":
                job.resizes += 1
                self._requeue(job, f"stopped to resize (from {job.workers} workers); requeued to resume")
            elif outcome == STOPPED:
                self._finish(job, STOPPED, "stopped" if job.stop_reason == "user" else "stopped through Ray")
            elif outcome == SUCCEEDED:
                self._finish(job, SUCCEEDED, "")
            elif outcome == "retry":
                job.retries += 1
                self.metrics.retry(job)
                self._requeue(
                    job,
                    f"attempt {job.attempts} lost ({error}, exit code {info.driver_exit_code}); "
                    f"retry {job.retries} of {job.max_retries}",
                )
            else:
                self._finish(job, FAILED, _last_line(info.message) or f"{error} (exit code {info.driver_exit_code})")
        return changed

    def _admit(self) -> bool:
        import ray

        queued = [j for j in self.jobs.values() if j.state == QUEUED]
        if not queued and not any(j.sizes for j in self.jobs.values() if j.state == RUNNING):
            return False  # nothing to admit, and no elastic job that could grow
        running = [j for j in self.jobs.values() if j.state == RUNNING]
        available = ray.available_resources()
        plan = admission.plan(
            queued,
            running,
            self.capacity(),
            available,
            strict=self.queueing == "strict",
            now=time.time(),
            grow_after_s=self.grow_after_s,
        )
        if self.fixed_capacity:  # an autoscaling cluster: ask for the nodes the queue head waits for
            self._request_nodes(admission.scale_request(queued, running, self._current_resources()))
        changed = False
        for job_id, waiting in plan.preempt.items():
            victim = self.jobs[job_id]
            victim.stop_reason, victim.stop_requested = "preempt", time.time()
            victim.message = f"preempted by {waiting}"
            victim.event(f"preempted by {waiting}: stopping")
            self.metrics.preemption(victim)
            self._save()  # recorded before Ray is asked: a restarted scheduler knows why it stopped
            self._stop_ray_job(victim)
            changed = True
        for job_id, workers in plan.resize.items():
            job = self.jobs[job_id]
            job.stop_reason, job.stop_requested = "resize", time.time()
            job.message = f"resizing from {job.workers} to {workers} workers"
            job.event(f"{job.message}: stopping at its checkpoint")
            self._save()
            self._stop_ray_job(job)
            changed = True
        for job_id in plan.admit:
            self.jobs[job_id].workers = plan.sizes.get(job_id, 0)
            if not self._start(self.jobs[job_id]):
                break  # Ray Jobs is not taking submissions now: keep the order, try again next pass
            changed = True
        for job_id, why in plan.waiting.items():
            job = self.jobs[job_id]
            if job.state == QUEUED and not job.message.startswith("submission failed") and job.message != why:
                job.message, changed = why, True
        return changed

    def _start(self, job: JobRecord) -> bool:
        now = time.time()
        attempt = job.attempts + 1
        ray_id = f"cellray-{job.id}-{attempt}"
        previous = (job.state, job.admitted, job.message)
        job.state, job.admitted, job.attempts, job.ray_status, job.message = RUNNING, now, attempt, "PENDING", ""
        job.stop_reason = job.stop_requested = None
        job.ray_ids.append(ray_id)
        self._save()  # recorded before submitting: a scheduler restarted in between finds it by this id
        drv = job.driver
        try:
            self.client().submit_job(
                entrypoint=entrypoint(job.spec_file, self.python),
                submission_id=ray_id,
                runtime_env={
                    "working_dir": self.project,
                    "excludes": EXCLUDES,
                    "env_vars": {
                        JOB_ID_ENV: job.id,
                        ATTEMPT_ENV: str(attempt),
                        WORKERS_ENV: str(job.workers),  # an elastic job's size this attempt (0: its spec's)
                        # the driver's own ray.init(address, runtime_env=working_dir) ships the same files again
                        "RAY_OVERRIDE_JOB_RUNTIME_ENV": "1",
                    },
                },
                metadata={
                    # the dashboard's Jobs page shows `job_name` in its Name column: cellray's record at a glance
                    "job_name": f"{job.id} {job.name} ({job.kind}, priority {job.priority}, attempt {attempt})",
                    "cellray_id": job.id,
                    "name": job.name,
                    "kind": job.kind,
                    "priority": str(job.priority),
                    "attempt": str(attempt),
                },
                entrypoint_num_cpus=drv.get("CPU", 0.0) or None,
                entrypoint_num_gpus=drv.get("GPU", 0.0) or None,
                entrypoint_memory=int(drv.get("memory", 0.0)) or None,
            )
        except Exception as e:  # e.g. "No available agent" right after the cluster starts: try again
            job.state, job.admitted, job.message = previous
            job.attempts -= 1
            job.ray_ids.pop()
            job.ray_status = None
            n = self.submit_failures[job.id] = self.submit_failures.get(job.id, 0) + 1
            if n >= MAX_SUBMIT_FAILURES:
                self._finish(job, FAILED, f"Ray Jobs refused it {n} times: {_last_line(str(e))}")
            else:
                job.message = f"submission failed, retrying: {_last_line(str(e))}"
                log.warning("%s: submission %d failed: %s", job.id, n, e)
            self._save()
            return False
        self.submit_failures.pop(job.id, None)
        self.metrics.admission(job, now)
        job.event(f"admitted as Ray job {ray_id} after {now - job.queued_since:.1f} s in the queue", now)
        log.info("%s (%s, %s, priority %d): admitted as Ray job %s", job.id, job.name, job.kind, job.priority, ray_id)
        return True

    # ------------------------------------------------------------------------------------------------ helpers

    def client(self):
        """A JobSubmissionClient on this cluster's dashboard (found through the GCS, not /tmp/ray)."""
        if self._client is None:
            from ray._private import ray_constants
            from ray.experimental.internal_kv import _internal_kv_get
            from ray.job_submission import JobSubmissionClient

            url = _internal_kv_get(ray_constants.DASHBOARD_ADDRESS, namespace=ray_constants.KV_NAMESPACE_DASHBOARD)
            if not url:
                raise SchedulerError("the cluster's dashboard is not up (Ray Jobs needs it)")
            self._client = JobSubmissionClient(f"http://{url.decode()}")
        return self._client

    def capacity(self) -> dict[str, float]:
        import ray

        if self.fixed_capacity:
            return {r: float(self.fixed_capacity.get(r, 0.0)) for r in ("CPU", "GPU", "memory")}
        total = ray.cluster_resources()
        return {r: float(total.get(r, 0.0)) for r in ("CPU", "GPU", "memory")}

    def _current_resources(self) -> dict[str, float]:
        import ray

        total = ray.cluster_resources()
        return {r: float(total.get(r, 0.0)) for r in ("CPU", "GPU", "memory")}

    def _request_nodes(self, bundles: list[dict]) -> None:
        if bundles == self.scale_requested:
            return
        from ray.autoscaler.sdk import request_resources

        try:
            request_resources(bundles=[{k: v for k, v in b.items() if v > 0} for b in bundles])
            self.scale_requested = bundles
            log.info("asked the autoscaler for %d bundle(s)", len(bundles))
        except Exception as e:  # no autoscaler: the queue works on the nodes there are
            log.warning("request_resources failed: %s", e)
            self.scale_requested = bundles

    def _bundle_problems(self, bundles: list[dict[str, float]]) -> list[str]:
        """A worker larger than every node can never be placed, whatever the totals say."""
        import ray

        if self.fixed_capacity or not bundles:
            return []
        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
        for b in bundles:
            if not any(admission.fits(b, {r: float(n.get(r, 0.0)) for r in b}) for n in nodes):
                return [f"a worker of {admission.describe(b)}, more than any node has"]
        return []

    def _job(self, job_id: str) -> JobRecord:
        job = self.jobs.get(job_id)
        if job is None:
            raise SchedulerError(f"no job {job_id!r} (see `cellray job list`)")
        return job

    def _stop_ray_job(self, job: JobRecord) -> None:
        try:
            self.client().stop_job(job.ray_id)
        except Exception as e:  # asked again after RESTOP_AFTER_S
            log.warning("%s: stopping Ray job %s failed: %s", job.id, job.ray_id, e)

    def _requeue(self, job: JobRecord, why: str, preempted: bool = False) -> None:
        job.state, job.queued_since, job.admitted, job.workers = QUEUED, time.time(), None, 0
        job.ray_status = job.stop_reason = job.stop_requested = None
        job.preemptions += int(preempted)
        job.message = why
        job.event(why)
        log.info("%s: %s", job.id, why)

    def _finish(self, job: JobRecord, state: str, message: str) -> None:
        job.state, job.ended, job.message = state, time.time(), message
        job.stop_reason = job.stop_requested = None
        job.event(f"{state}{': ' + message if message else ''}")
        self._save()
        log.info("%s: %s %s", job.id, state, message)

    def _save(self) -> None:
        self.store.save(self.jobs, self.next_seq)


def _last_line(text: str | None) -> str:
    lines = [ln.strip() for ln in (text or "").strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""
