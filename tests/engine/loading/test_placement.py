"""Multi-node placement: on a 3-node Ray cluster, each rank's reader actors run on that rank's node.

The cluster is a real `ray.cluster_utils.Cluster` (three raylets on this host, each its own node id), started by
a driver in a subprocess: the test session's own Ray stays up, and one process cannot join two clusters."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[3]

DRIVER = r"""
import json, sys
import ray
from ray.cluster_utils import Cluster

store, world = sys.argv[1], 3
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "object_store_memory": 80 * 2**20})
try:
    # each node: 1 logical CPU (a rank's 0.25 + its two readers' 0.25 each) and a resource naming it
    nodes = [
        cluster.add_node(num_cpus=1, resources={f"node{r}": 1}, object_store_memory=80 * 2**20) for r in range(world)
    ]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="ERROR")

    @ray.remote(num_cpus=0.25)
    class Rank:
        def run(self, rank):
            from engine.loading.loader import Loader

            loader = Loader(store, 32, rank=rank, world_size=world, mode="ray", num_workers=2, reader_cpus=0.25,
                            output="csr", block_size=64, buffer_blocks=2)
            index = [b["index"].numpy().tolist() for b in loader]
            readers = ray.get([a.node_id.remote() for a in loader._actors])
            loader.close()
            return {"node": ray.get_runtime_context().get_node_id(), "readers": readers, "index": index}

    ranks = [Rank.options(resources={f"node{r}": 0.01}).remote() for r in range(world)]
    out = ray.get([a.run.remote(r) for r, a in enumerate(ranks)], timeout=240)
    print(json.dumps({"nodes": [n.node_id for n in nodes], "ranks": out}))
finally:
    ray.shutdown()
    cluster.shutdown()
"""


def test_each_ranks_readers_run_on_its_node(tiny_store):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("RAY_ADDRESS", None)
    out = subprocess.run(
        [sys.executable, "-c", DRIVER, str(tiny_store)], capture_output=True, text=True, env=env, timeout=280
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    nodes, ranks = result["nodes"], result["ranks"]
    assert len(set(nodes)) == 3
    for r, rank in enumerate(ranks):
        assert rank["node"] == nodes[r]  # the rank is where we put it ...
        assert rank["readers"] and all(n == nodes[r] for n in rank["readers"])  # ... and so are its readers
    # and the three ranks still read the epoch exactly once between them, in lockstep
    per_rank = [np.concatenate(rank["index"]) for rank in ranks]
    assert len({len(b["index"]) for b in ranks}) == 1
    union = np.concatenate(per_rank)
    assert len(np.unique(union)) == len(union) > 0
