"""The scheduler's records and their store: one JSON file in the state directory, replaced atomically.

One writer (the scheduler actor) and a handful of transitions per job: an atomic JSON file works on any shared
filesystem (NFS, EFS, GCS FUSE), where SQLite's locking does not, and in a bucket (a put replaces an object whole),
so a cluster needs no shared filesystem at all: `--state-dir s3://BUCKET/cellray`. The spec of every job is kept
beside it, so a restarted scheduler, or a scheduler on a restarted cluster, has all it needs to run the queue.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from engine.atomic import read_text, write_text_atomically
from engine.objects import ObjectPath, store_path

QUEUED, RUNNING, SUCCEEDED, FAILED, STOPPED = "QUEUED", "RUNNING", "SUCCEEDED", "FAILED", "STOPPED"
PREEMPTED = "PREEMPTED"  # an event, not a resting state: a preempted job goes back to QUEUED
STATES = (QUEUED, RUNNING, SUCCEEDED, FAILED, STOPPED)
TERMINAL = (SUCCEEDED, FAILED, STOPPED)
RESOURCES = ("CPU", "GPU", "memory")  # what a job demand counts, in Ray's names; memory in bytes
STATE_FILE = "scheduler.json"
MAX_EVENTS = 30
SPECS_DIR = "specs"


@dataclass
class JobRecord:
    id: str
    seq: int  # submission order: FIFO within a priority
    name: str
    kind: str
    priority: int
    preemptible: bool
    max_retries: int
    demand: dict[str, float]  # the whole job: CPU, GPU, memory (bytes)
    driver: dict[str, float]  # what the entrypoint process reserves itself
    spec_file: str
    state: str = QUEUED
    submitted: float = 0.0
    queued_since: float = 0.0  # submit, or the last return to the queue (preemption, retry)
    admitted: float | None = None  # handed to Ray Jobs (the current attempt)
    started: float | None = None  # Ray reported it RUNNING (the first attempt that ran)
    ended: float | None = None
    attempts: int = 0  # Ray Jobs submitted for it
    retries: int = 0  # of those, reruns after a lost process or node
    preemptions: int = 0
    ray_ids: list[str] = field(default_factory=list)  # one Ray submission id per attempt
    ray_status: str | None = None  # the current attempt's Ray status
    stop_reason: str | None = None  # "user" or "preempt" while a stop is under way
    stop_requested: float | None = None
    message: str = ""
    bundles: list[dict[str, float]] = field(default_factory=list)  # one per worker: what an autoscaler must place
    sizes: list[int] | None = None  # elastic jobs: [min, max] workers (`demand` is at max, a worker per bundle)
    workers: int = 0  # elastic jobs: the workers of the current attempt (0 while queued)
    resizes: int = 0  # elastic jobs: restarts at another size (shrunk for a job of higher priority, or grown)
    events: list[str] = field(default_factory=list)  # "HH:MM:SS what happened", the last MAX_EVENTS
    # what the running attempt last reported (jobs/kinds/metrics.py JobProgress): unit, done, total, fraction, eta_s,
    # attempt, updated, and the kind's figures (loss, cells_per_s, data_wait); kept after the attempt ends
    progress: dict[str, Any] | None = None

    def event(self, text: str, now: float | None = None) -> None:
        stamp = time.strftime("%H:%M:%S", time.localtime(now or time.time()))
        self.events = [*self.events, f"{stamp} {text}"][-MAX_EVENTS:]

    def take_progress(self, attempt: int, progress: dict[str, Any]) -> bool:
        """Keep a report of the current attempt unless a newer one is kept: the scheduler runs calls in threads, so a
        driver's reports may arrive out of order (its last one overtaken by the one before). An earlier attempt's
        late report is dropped."""
        if attempt != self.attempts:
            return False
        kept = self.progress
        if kept is not None and kept.get("attempt") == attempt and kept.get("updated", 0) > progress.get("updated", 0):
            return False
        self.progress = progress
        return True

    @property
    def ray_id(self) -> str | None:
        return self.ray_ids[-1] if self.ray_ids else None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> JobRecord:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


class StateStore:
    """STATE_DIR/scheduler.json (every job and the next sequence number) and STATE_DIR/specs/<id>.yaml."""

    def __init__(self, state_dir: str | os.PathLike):
        self.dir = store_path(os.path.expanduser(str(state_dir)))  # a directory, or a prefix in a bucket
        if not isinstance(self.dir, ObjectPath):
            (self.dir / SPECS_DIR).mkdir(parents=True, exist_ok=True)
        self.path = self.dir / STATE_FILE

    def load(self) -> tuple[dict[str, JobRecord], int]:
        try:
            data = json.loads(read_text(self.path))
        except FileNotFoundError:  # MissingObjectError too: a new queue
            return {}, 1
        jobs = {d["id"]: JobRecord.from_dict(d) for d in data["jobs"]}
        return jobs, int(data["next_seq"])

    def save(self, jobs: dict[str, JobRecord], next_seq: int) -> None:
        data = {"version": 1, "next_seq": next_seq, "jobs": [j.to_dict() for j in jobs.values()]}
        write_text_atomically(self.path, json.dumps(data, indent=1))

    def write_spec(self, job_id: str, text: str) -> str:
        path = self.dir / SPECS_DIR / f"{job_id}.yaml"
        write_text_atomically(path, text)
        return str(path.resolve())  # a URI in a bucket: `cellray run` reads it from there
