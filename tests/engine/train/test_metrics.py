"""The per-rank metrics window: losses stay tensors until a report reads them, and a report stops a diverged run."""

from __future__ import annotations

import pytest
import torch

from engine.errors import TrainError
from engine.train.metrics import MetricsWindow


def test_window_reports_means_and_stops_at_the_first_diverged_step():
    window = MetricsWindow()
    for step, value in [(1, 2.0), (2, 4.0)]:
        window.add(torch.tensor(value), {"nll": torch.tensor(value / 2), "kl_weight": 0.5}, 8, 0.1, 1.0, step)
    m = window.summary(world=1, step=2, epoch=0, lr=1e-3)
    assert (m["loss"], m["nll"], m["kl_weight"], m["cells"]) == (3.0, 1.5, 0.5, 16)
    assert m["data_wait_frac"] == pytest.approx(0.1)

    for step, value in [(3, 1.0), (4, float("nan")), (5, float("inf"))]:
        window.add(torch.tensor(value), {}, 8, 0.0, 1.0, step)
    with pytest.raises(TrainError, match=r"the loss is nan at step 4: training diverged"):
        window.summary(world=1, step=5, epoch=0, lr=1e-3)


# One DDP rank's report over gloo, in a process of its own: rank 1 saw a NaN at its window's last step, rank 0 none.
REPORT_ON_RANK = """
import datetime, sys
import torch, torch.distributed as dist
from engine.errors import TrainError
from engine.train.metrics import MetricsWindow

rank, init = int(sys.argv[1]), sys.argv[2]
dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2, timeout=datetime.timedelta(seconds=60))
window = MetricsWindow()
for step in (1, 2):
    window.add(torch.tensor(float("nan") if (rank, step) == (1, 2) else 1.0), {}, 8, 0.0, 1.0, step)
try:
    window.summary(world=2, step=2, epoch=0, lr=1e-3, rank=rank)
    print("no error")
except TrainError as e:
    print(e)
dist.destroy_process_group()
"""


def test_a_loss_diverged_on_one_rank_stops_every_rank_at_the_same_report(tmp_path):
    """The check follows the report's allreduce: a rank that saw no NaN stops too, with the same error, instead of
    waiting in the collective its peer never joins (before: it died there on gloo's "connection closed" error)."""
    import subprocess
    import sys

    init = f"file://{tmp_path / 'rendezvous'}"
    procs = [
        subprocess.Popen([sys.executable, "-c", REPORT_ON_RANK, str(r), init], stdout=subprocess.PIPE, text=True)
        for r in (0, 1)
    ]
    try:
        got = [p.communicate(timeout=45)[0].strip() for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert got[1].startswith("the loss is nan at step 2: training diverged"), got
    assert got[0].startswith("another rank's loss is not finite by step 2: training diverged"), got
