"""What a running job reports: its progress, and the `cellray_job_*`, `cellray_train_*`, `cellray_infer_*` and
`cellray_eval_*` gauges.

Every way a job runs (`cellray run`, `cellray embed`, a job the scheduler admitted, a resumed or preempted attempt)
goes through its kind's `run`, which reports through `train_reporter` (pretraining, in steps) or `infer_progress`
(inference, in parts). Both feed one `JobProgress`, which
- sets the gauges, tagged `job` (the cellray id when the scheduler runs it, else the spec's name), while Ray is up;
- sends the same progress, at most once a second, to the scheduler when the scheduler started the job
  (CELLRAY_JOB_ID set): `cellray job status` and `cellray job list` read it from the job's record, not its log.

A resumed attempt reports absolute counts (the step it resumed at, the parts committed earlier), so its series
continue where the previous attempt left them. The scheduler's own queue series are jobs/scheduler/metrics.py.
Ray exports all of them on the node's metrics port with a `ray_` prefix, e.g. `ray_cellray_train_step{job="j0003"}`.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Any

from engine.progress import Progress
from engine.runtime import metrics_set
from jobs.kinds.base import ATTEMPT_ENV, JOB_ID_ENV, job_tag

log = logging.getLogger(__name__)

SEND_EVERY_S = 1.0  # progress to the scheduler at most this often (and always the last one)

JOB_GAUGES = (
    ("cellray_job_progress", "fraction of the job done (pretrain: steps of max_steps; embed: parts)"),
    ("cellray_job_eta_seconds", "seconds left at this attempt's rate so far"),
)
TRAIN_GAUGES = (
    ("cellray_train_step", "optimizer steps done"),
    ("cellray_train_loss", "training loss (mean over the last report window)"),
    ("cellray_train_cells_per_s", "training cells per second, all workers"),
    ("cellray_train_data_wait_fraction", "fraction of step time spent waiting for data, all workers"),
    ("cellray_train_step_seconds", "seconds per optimizer step (between reports)"),
)
RANK_GAUGES = (
    ("cellray_train_rank_data_wait_fraction", "fraction of step time this rank waited for data"),
    ("cellray_train_rank_queue_depth", "batches this rank's loader had read ahead at the report"),
)
INFER_GAUGES = (
    ("cellray_infer_parts_done", "inference parts (store shards) committed, earlier attempts included"),
    ("cellray_infer_parts", "inference parts (store shards) in all"),
)

EVAL_GAUGES = (
    ("cellray_eval_scib", "scIB total of the job's embedding (its bio conservation where there are no batches)"),
    ("cellray_eval_knn_accuracy", "kNN label-transfer accuracy of the job's embedding (5-fold)"),
    ("cellray_eval_scib_vs_baseline", "scIB total of the embedding / that of HVG-PCA-50 of the same cells"),
    ("cellray_eval_knn_vs_baseline", "kNN accuracy of the embedding / that of HVG-PCA-50 of the same cells"),
)


def _ray_up() -> bool:
    import ray

    return ray.is_initialized()


class Gauges:
    """ray.util.metrics gauges of one tag set, created on first use (a process without Ray never imports them)."""

    def __init__(self, specs: tuple[tuple[str, str], ...], tag_keys: tuple[str, ...]):
        self.specs, self.tag_keys = specs, tag_keys
        self.gauges: dict[str, Any] = {}

    def set(self, values: dict[str, float | None], tags: dict[str, str]) -> None:
        if not _ray_up():
            return
        if not self.gauges:
            from ray.util.metrics import Gauge

            self.gauges = {n: Gauge(n, d, tag_keys=self.tag_keys) for n, d in self.specs}
        for name, v in values.items():
            if v is not None:
                self.gauges[name].set(float(v), tags=tags)
        metrics_set()


class JobProgress:
    """One attempt's progress in `unit`s (steps, parts): gauges, the ETA, and the report to the scheduler."""

    def __init__(self, name: str, kind: str, unit: str):
        self.job, self.kind, self.unit = job_tag(name), kind, unit
        self.scheduled_id = os.environ.get(JOB_ID_ENV)
        self.attempt = int(os.environ.get(ATTEMPT_ENV) or 1)
        self.gauges = Gauges(JOB_GAUGES, ("job", "kind"))
        self.first: tuple[float, int] | None = None  # (time, done) of this attempt's first report: its rate
        self.sent = 0.0
        self.scheduler: Any = None

    def update(self, done: int, total: int, **extra: Any) -> dict[str, Any]:
        now = time.time()
        if self.first is None or done < self.first[1]:
            self.first = (now, done)
        t0, d0 = self.first
        rate = (done - d0) / (now - t0) if done > d0 and now > t0 else None
        eta = 0.0 if total and done >= total else ((total - done) / rate if rate else None)
        progress = {
            "unit": self.unit,
            "done": done,
            "total": total,
            "fraction": done / total if total else 0.0,
            "eta_s": eta,
            "attempt": self.attempt,
            "updated": now,
            **extra,
        }
        self.gauges.set(
            {"cellray_job_progress": progress["fraction"], "cellray_job_eta_seconds": eta},
            {"job": self.job, "kind": self.kind},
        )
        if self.scheduled_id and (now - self.sent >= SEND_EVERY_S or done >= total):
            self.sent = now
            self._send(progress, last=done >= total)
        return progress

    def _send(self, progress: dict[str, Any], last: bool) -> None:
        """Fire and forget, except the last report, which the driver's exit right after would lose: progress is an
        aid, never a reason for a job to fail, nor to wait more than a few seconds."""
        if not _ray_up():
            return
        try:
            import ray

            if self.scheduler is None:
                from jobs.scheduler.actor import NAME, NAMESPACE

                self.scheduler = ray.get_actor(NAME, namespace=NAMESPACE)
            sent = self.scheduler.report_progress.remote(self.scheduled_id, self.attempt, progress)
            if last:
                ray.get(sent, timeout=5)
        except Exception as e:  # no scheduler (a plain Ray Job with the variable set by hand): nothing to tell
            log.debug("progress not sent to the scheduler: %s", e)


def train_reporter(name: str, max_steps: int) -> Callable[[dict[str, Any]], None]:
    """A callback for the pretraining driver's reports: training gauges (also per rank) and the job's progress."""
    job = JobProgress(name, "pretrain", "steps")
    train = Gauges(TRAIN_GAUGES, ("job",))
    ranks = Gauges(RANK_GAUGES, ("job", "rank"))
    last: list[tuple[float, int]] = []

    def report(m: dict[str, Any]) -> None:
        step, now = int(m["step"]), time.monotonic()
        step_s = (now - last[0][0]) / (step - last[0][1]) if last and step > last[0][1] else None
        last[:] = [(now, step)]
        train.set(
            {
                "cellray_train_step": step,
                "cellray_train_loss": m.get("loss"),
                "cellray_train_cells_per_s": m.get("cells_per_s"),
                "cellray_train_data_wait_fraction": m.get("data_wait_frac"),
                "cellray_train_step_seconds": step_s,
            },
            {"job": job.job},
        )
        for rank, (wait, depth) in enumerate(zip(m.get("rank_data_wait_frac", []), m.get("rank_queue_depth", []))):
            ranks.set(
                {"cellray_train_rank_data_wait_fraction": wait, "cellray_train_rank_queue_depth": depth},
                {"job": job.job, "rank": str(rank)},
            )
        job.update(
            step,
            max_steps,
            loss=m.get("loss"),
            cells_per_s=m.get("cells_per_s"),
            data_wait=m.get("data_wait_frac"),
        )

    return report


def infer_progress(progress: Progress, name: str) -> Progress:
    """Wrap a progress callback: the inference stage's parts also go to cellray_infer_parts(_done) and the job's
    progress (with the cells/s of this attempt)."""
    job = JobProgress(name, "embed", "parts")
    infer = Gauges(INFER_GAUGES, ("job",))
    cells: dict[str, float] = {}

    def update(stage: str, done: int, total: int) -> None:
        progress(stage, done, total)
        if stage == "cells":  # cells of this attempt: its rate
            cells.setdefault("t0", time.monotonic())
            cells["done"] = done
            return
        if stage != "embed":
            return
        infer.set({"cellray_infer_parts_done": done, "cellray_infer_parts": total}, {"job": job.job})
        elapsed = time.monotonic() - cells["t0"] if "t0" in cells else 0.0
        job.update(done, total, cells_per_s=cells.get("done", 0) / elapsed if elapsed > 0 else None)

    return update


def eval_report(name: str, headline: dict[str, Any]) -> None:
    """An embed job's evaluation (engine.infer.evaluate's headline) as `cellray_eval_*{job}` gauges."""
    Gauges(EVAL_GAUGES, ("job",)).set(
        {
            "cellray_eval_scib": headline["scib"],
            "cellray_eval_knn_accuracy": headline["knn"],
            "cellray_eval_scib_vs_baseline": headline["scib_vs_baseline"],
            "cellray_eval_knn_vs_baseline": headline["knn_vs_baseline"],
        },
        {"job": job_tag(name)},
    )


class WorldReporter:
    """For elastic runs: `cellray_train_world_size{job}` (workers of the latest report) and
    `cellray_train_resizes{job}` (a gauge of the resizes so far: reports whose world size differs from the one
    before; a gauge, so a run that never resized shows 0 rather than no series)."""

    def __init__(self, name: str):
        self.tags = {"job": job_tag(name)}
        self.world: int | None = None
        self.resizes = 0
        self._metrics: tuple[Any, Any] | None = None

    def __call__(self, m: dict[str, Any]) -> None:
        world = m.get("world_size")
        if world is None:
            return
        from ray.util.metrics import Gauge

        if self._metrics is None:
            self._metrics = (
                Gauge("cellray_train_world_size", "training workers now", tag_keys=("job",)),
                Gauge("cellray_train_resizes", "changes of a run's number of workers so far", tag_keys=("job",)),
            )
        gauge, resizes = self._metrics
        if self.world is not None and world != self.world:
            self.resizes += 1
        self.world = int(world)
        gauge.set(float(world), tags=self.tags)
        resizes.set(float(self.resizes), tags=self.tags)
        metrics_set()
