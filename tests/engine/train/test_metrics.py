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
