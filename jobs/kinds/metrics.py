"""What a running job reports to the dashboard: `cellray_train_*` and `cellray_infer_*` gauges, tagged by job.

Every way a job runs (`cellray run`, `cellray embed`, a scheduled job) goes through its kind's `run`, which sets these
through the callbacks below; the scheduler's own queue series are jobs/scheduler/metrics.py. Ray exports them on the
node's metrics port with a `ray_` prefix, e.g. `ray_cellray_train_step{job="j0003"}`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from engine.progress import Progress
from jobs.kinds.base import job_tag


def train_reporter(name: str) -> Callable[[dict[str, Any]], None]:
    """A callback for the pretraining driver's reports: training gauges tagged by job (cellray id, or the name)."""
    gauges: list[Any] = []
    last: list[tuple[float, int]] = []
    tags = {"job": job_tag(name)}

    def report(m: dict[str, Any]) -> None:
        from ray.util.metrics import Gauge

        if not gauges:
            gauges.extend(
                Gauge(n, d, tag_keys=("job",))
                for n, d in (
                    ("cellray_train_step", "optimizer steps done"),
                    ("cellray_train_loss", "training loss (mean over the last report window)"),
                    ("cellray_train_cells_per_s", "training cells per second, all workers"),
                    ("cellray_train_data_wait_fraction", "fraction of step time spent waiting for data"),
                    ("cellray_train_step_seconds", "seconds per optimizer step (between reports)"),
                )
            )
        step, now = int(m["step"]), time.monotonic()
        values = [step, m.get("loss"), m.get("cells_per_s"), m.get("data_wait_frac")]
        if last and step > last[0][1]:
            values.append((now - last[0][0]) / (step - last[0][1]))
        for g, v in zip(gauges, values):
            if v is not None:
                g.set(float(v), tags=tags)
        last[:] = [(now, step)]

    return report


def infer_progress(progress: Progress, name: str) -> Progress:
    """Wrap a progress callback: the inference stage also sets cellray_infer_parts(_done) while Ray is up."""
    gauges: list[Any] = []
    tags = {"job": job_tag(name)}

    def update(stage: str, done: int, total: int) -> None:
        progress(stage, done, total)
        if stage != "embed":
            return
        import ray

        if not ray.is_initialized():
            return
        if not gauges:
            from ray.util.metrics import Gauge

            gauges.append(Gauge("cellray_infer_parts_done", "inference parts (store shards) done", ("job",)))
            gauges.append(Gauge("cellray_infer_parts", "inference parts (store shards) in all", ("job",)))
        gauges[0].set(float(done), tags=tags)
        gauges[1].set(float(total), tags=tags)

    return update


class WorldReporter:
    """For elastic runs: `cellray_train_world_size{job}` (workers of the latest report) and
    `cellray_train_resizes{job}` (a counter: reports whose world size differs from the one before)."""

    def __init__(self, name: str):
        self.tags = {"job": job_tag(name)}
        self.world: int | None = None
        self.resizes = 0
        self._metrics: tuple[Any, Any] | None = None

    def __call__(self, m: dict[str, Any]) -> None:
        world = m.get("world_size")
        if world is None:
            return
        from ray.util.metrics import Counter, Gauge

        if self._metrics is None:
            self._metrics = (
                Gauge("cellray_train_world_size", "training workers now", tag_keys=("job",)),
                Counter("cellray_train_resizes", "changes of a run's number of workers", tag_keys=("job",)),
            )
        gauge, counter = self._metrics
        if self.world is not None and world != self.world:
            self.resizes += 1
            counter.inc(1.0, tags=self.tags)
        self.world = int(world)
        gauge.set(float(world), tags=self.tags)
