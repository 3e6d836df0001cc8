"""What the scheduler makes of a job whose Ray job ended (`after_end`): no Ray needed, every branch."""

from __future__ import annotations

import pytest

from jobs.scheduler.actor import after_end
from jobs.scheduler.state import FAILED, STOPPED, SUCCEEDED


@pytest.mark.parametrize(
    ("stop_reason", "status", "error", "exit_code", "can_retry", "outcome"),
    [
        ("preempt", "STOPPED", None, None, True, "preempted"),
        ("preempt", "FAILED", None, -15, False, "preempted"),  # killed by the stop itself: still resumes
        ("preempt", "SUCCEEDED", None, 0, True, SUCCEEDED),  # finished before the stop landed: not run again
        ("resize", "STOPPED", None, None, True, "resized"),
        ("resize", "SUCCEEDED", None, 0, True, SUCCEEDED),
        ("user", "STOPPED", None, None, True, STOPPED),
        ("user", "SUCCEEDED", None, 0, True, STOPPED),
        (None, "STOPPED", None, None, True, STOPPED),  # `ray job stop` from outside the scheduler
        (None, "SUCCEEDED", None, 0, True, SUCCEEDED),
        (None, "FAILED", "JOB_SUPERVISOR_ACTOR_DIED", None, True, "retry"),  # its node was lost
        (None, "FAILED", None, -9, True, "retry"),  # the driver killed from outside (OOM killer)
        (None, "FAILED", None, 137, True, "retry"),
        (None, "FAILED", None, -9, False, FAILED),  # no retries left
        (None, "FAILED", None, 2, True, FAILED),  # a spec or data error: it fails on its own, never retried
    ],
)
def test_an_ended_job_is_requeued_retried_or_finished(stop_reason, status, error, exit_code, can_retry, outcome):
    assert after_end(stop_reason, status, error, exit_code, can_retry) == outcome
