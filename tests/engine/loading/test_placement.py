"""Multi-node placement: on a 2-node Ray cluster, each rank's reader actors run on that rank's node.

The cluster is a real `ray.cluster_utils.Cluster` (raylets on this host, each its own node id), started by a driver
in a subprocess (tests/multinode_drill.py, through the `multinode_drill` fixture): the test session's own Ray stays
up, and one process cannot join two clusters."""

from __future__ import annotations

import numpy as np


def test_each_ranks_readers_run_on_its_node(multinode_drill):
    nodes, ranks = multinode_drill["nodes"], multinode_drill["placement"]["ranks"]
    assert len(set(nodes)) == len(ranks) == 2
    for r, rank in enumerate(ranks):
        assert rank["node"] == nodes[r]  # the rank is where we put it ...
        assert rank["readers"] and all(n == nodes[r] for n in rank["readers"])  # ... and so are its readers
    # and the two ranks still read the epoch exactly once between them, in lockstep
    per_rank = [np.concatenate(rank["index"]) for rank in ranks]
    assert len({len(b["index"]) for b in ranks}) == 1
    union = np.concatenate(per_rank)
    assert len(np.unique(union)) == len(union) > 0
