"""Elastic pretraining on the shared multi-node drill (tests/multinode_drill.py, bench/elastic.py's `drill`):
workers {min: 1, max: 2} on two nodes; a node removed mid-epoch, the run goes on at 1 worker; a node added, it
grows back to 2 from a checkpoint. The trace's global batches are the fixed-size plan's, every cell of the completed
epoch once, and the final parameters within 1e-4 of an in-process run of the same spec (measured: ~4e-7; only
the order of DDP's float32 reductions differs: the probe model draws no random numbers)."""

from __future__ import annotations

import pytest


@pytest.mark.timeout(900)
def test_elastic_run_shrinks_on_node_loss_and_grows_back_exactly(multinode_drill):
    seen = multinode_drill["elastic"]
    assert seen.get("error") is None, seen
    assert seen["final_step"] == seen["fixed_final_step"] == 40
    worlds = seen["worlds"]
    assert worlds[0] == 2 and 1 in worlds and worlds[-1] == 2, worlds
    first1, last1 = worlds.index(1), len(worlds) - 1 - worlds[::-1].index(1)
    assert set(worlds[first1 : last1 + 1]) == {1}, "one stretch at 1 worker, between the loss and the add"
    assert len(set(seen["attempts"])) >= 3, "the lost node and the added one each started a new worker group"
    assert seen["removed"] < seen["shrunk"] < seen["added"] < seen["grown"]
    assert seen["shrunk"] - seen["removed"] < 60, "a lost node costs less than a minute"
    assert seen["batches_equal"], "every step's global batch is the fixed-size plan's"
    # epoch 0 (24 global batches of 60 cells of 1,483; the last 43 are dropped this epoch): each cell once
    assert seen["epoch0_batches"] == 24 and seen["epoch0_cells"] == seen["epoch0_unique"] == 24 * 60
    assert seen["max_param_diff"] < 1e-4
