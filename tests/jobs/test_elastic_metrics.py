"""The world-size gauge and resize counter of elastic runs (jobs/kinds/metrics.py), fed as the driver feeds them."""

from __future__ import annotations

from jobs.kinds.metrics import WorldReporter


def test_world_reporter_counts_changes_of_world_size(ray_local):
    world = WorldReporter("elastic-job")
    for size in (3, 3, 2, 2, 3):
        world({"step": 1, "loss": 0.0, "world_size": size})
    world({"step": 2, "loss": 0.0})  # a report without a world size (an older checkpoint's) changes nothing
    assert (world.world, world.resizes) == (3, 2)
