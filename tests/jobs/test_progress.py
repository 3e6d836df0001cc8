"""A job's progress report without Ray (jobs/kinds/metrics.py JobProgress) and how the CLI prints it."""

from __future__ import annotations

import time

from jobs.commands.job import progress_text
from jobs.kinds.metrics import JobProgress


def test_eta_comes_from_this_attempts_rate_and_a_resumed_start_is_not_counted():
    p = JobProgress("vae", "pretrain", "steps")
    first = p.update(40, 100)  # an attempt resumed at step 40: no rate yet
    assert first["eta_s"] is None and first["fraction"] == 0.4
    time.sleep(0.5)
    mid = p.update(50, 100, loss=0.5)  # 10 steps in this attempt's time so far: 50 left take 5x as long
    elapsed = mid["updated"] - first["updated"]
    assert elapsed >= 0.5 and abs(mid["eta_s"] - 5 * elapsed) < 1e-6, mid
    assert mid["loss"] == 0.5 and mid["unit"] == "steps" and mid["done"] == 50
    assert p.update(100, 100)["eta_s"] == 0.0


def test_status_and_list_lines():
    p = {"unit": "steps", "done": 120, "total": 200, "fraction": 0.6, "eta_s": 14.2, "attempt": 2,
         "updated": time.time(), "loss": 0.41234, "cells_per_s": 8310.4, "data_wait": 0.12}  # fmt: skip
    line = progress_text(p)
    assert line.startswith("step 120/200 (60%)   loss 0.4123   8,310 cells/s   data wait 12%   ETA 0:14")
    assert "(attempt 2, reported 0 s ago)" in line
    parts = {"unit": "parts", "done": 3, "total": 8, "fraction": 0.375, "eta_s": 3725.0}
    assert progress_text(parts, short=True) == "parts 3/8 (38%) ETA 1:02:05"
    assert progress_text(None) == "-"


def test_the_scheduler_keeps_the_newest_report_of_the_current_attempt():
    """The scheduler actor runs calls in threads: a driver's last report can arrive before the one sent just before
    it (seen once: a SUCCEEDED 200-step job listed at step 195/200)."""
    from jobs.scheduler.state import JobRecord

    job = JobRecord("j1", 1, "vae", "pretrain", 0, True, 0, {}, {}, "spec.yaml", attempts=2)
    p = JobProgress("vae", "pretrain", "steps")
    p.attempt = 2
    before_last = p.update(195, 200)
    time.sleep(0.01)
    last = p.update(200, 200)
    assert job.take_progress(2, last) and not job.take_progress(2, before_last)
    assert job.progress["done"] == 200
    p.attempt = 1
    assert not job.take_progress(1, p.update(10, 200)), "an earlier attempt's late report"
    assert job.progress["done"] == 200
    job.attempts = 3
    p.attempt = 3
    assert job.take_progress(3, p.update(150, 200)) and job.progress["done"] == 150, "a new attempt starts over"
