"""Multi-node drills on one `ray.cluster_utils.Cluster` (run as a script by the `multinode_drill` fixture of
tests/conftest.py: a process can be the driver of one cluster only, and the test session has its own Ray).

The cluster: a head without CPUs and two 2-CPU worker nodes, each with a resource naming it (two, not more: each
node's worker imports torch on the same 2 cores, so every node added makes every worker group start longer). Two
drills run on it, one after the other, and the script prints one JSON line with what each saw:

- placement: two ranks, each pinned to its node, read an epoch through two reader actors each; where every rank's
  readers ran, and the cells each rank read (tests/engine/loading/test_placement.py checks them);
- elastic: `bench/elastic.py`'s drill: an elastic run (workers {min: 1, max: 2}, one worker per node) loses a node
  mid-epoch, goes on at 1, and grows back to 2 when a node is added; every step's global batch and the final
  parameters are those of a fixed-size run (tests/faults/test_elastic.py checks what it saw). The loss of a node is
  drilled here only: a fixed-size run restarts on the same path as an elastic one (a new worker group from the last
  checkpoint, tests/engine/train/test_train.py kills a worker), and a lost reader is tests/engine/loading's.
"""

from __future__ import annotations

import json
import sys

WORLD = 2


def placement(store: str) -> dict:
    import ray

    @ray.remote(num_cpus=0.25)
    class Rank:
        def run(self, rank):
            from engine.loading.loader import Loader
            from engine.loading.readers import ReadOptions
            from engine.loading.sampler import SamplerConfig

            plan = SamplerConfig(batch_size=32, block_size=64, buffer_blocks=2)
            reading = ReadOptions(readers=2, cpus_per_reader=0.25)
            loader = Loader(store, plan, rank=rank, world_size=WORLD, mode="ray", output="csr", reading=reading)
            index = [b["index"].numpy().tolist() for b in loader]
            readers = [p.node_id for p in loader.reader_processes()]
            loader.close()
            return {"node": ray.get_runtime_context().get_node_id(), "readers": readers, "index": index}

    ranks = [Rank.options(resources={f"node{r}": 0.01}).remote() for r in range(WORLD)]
    out = ray.get([a.run.remote(r) for r, a in enumerate(ranks)], timeout=240)
    for a in ranks:
        ray.kill(a)
    return {"ranks": out}


def elastic(cluster, nodes: list, store: str, work: str) -> dict:
    from bench.elastic import drill

    return drill(cluster, list(nodes), store, work, steps=40, pace=0.2)


def main(store: str, work: str) -> None:
    import ray
    from ray.cluster_utils import Cluster

    # a lost node is declared dead after ~1.5 s of failed health checks (Ray's default: ~15 s)
    health = {"health_check_period_ms": 500, "health_check_failure_threshold": 3}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "_system_config": health})
    try:
        nodes = [
            cluster.add_node(num_cpus=2, resources={f"node{r}": 1}, object_store_memory=80 * 2**20)
            for r in range(WORLD)
        ]
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, logging_level="ERROR")
        out = {"nodes": [n.node_id for n in nodes], "placement": placement(store)}
        out["elastic"] = elastic(cluster, nodes, store, work)
        print(json.dumps(out))
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
