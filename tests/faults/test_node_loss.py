"""A node of a multi-node cluster removed during training: the run finishes from its last checkpoint, and every
step's cells are accounted for (tests/multinode_drill.py does the work in a process of its own)."""

from __future__ import annotations

import pytest


@pytest.mark.timeout(900)
def test_training_survives_the_loss_of_a_node(multinode_drill):
    result = multinode_drill["node_loss"]
    assert result.get("error") is None, result
    assert {k: result[k] for k in ("final_step", "plan_ok", "removed")} == {
        "final_step": 16, "plan_ok": {"0": True, "1": True}, "removed": True
    }  # fmt: skip
    assert result["node"] in multinode_drill["nodes"]
