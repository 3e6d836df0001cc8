"""Multi-node drills on one `ray.cluster_utils.Cluster` (run as a script by the `multinode_drill` fixture of
tests/conftest.py: a process can be the driver of one cluster only, and the test session has its own Ray).

The cluster: a head without CPUs and three 2-CPU worker nodes, each with a resource naming it. Two drills run on it,
one after the other, and the script prints one JSON line with what each saw:

- placement: three ranks, each pinned to its node, read an epoch through two reader actors each; where every rank's
  readers ran, and the cells each rank read (tests/engine/loading/test_placement.py checks them);
- node loss: 2 DDP workers with a reader actor each train 16 steps; once step 6 has passed, the node of the busiest
  worker is removed; the final step, and for each rank whether every step's cells (the last attempt of each step)
  equal that rank's plan (tests/faults/test_node_loss.py checks them);
- elastic: a node added back (three worker nodes again), then `bench/elastic.py`'s drill: an elastic run
  (workers {min: 1, max: 3}, one worker per node) loses a node mid-epoch, goes on at 2, and grows back to 3 when a
  node is added (tests/faults/test_elastic.py checks what it saw).
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

WORLD = 3


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


def node_loss(cluster, nodes: list, store: str, work: str) -> dict:
    from engine.loading.loader import Loader
    from engine.loading.sampler import SamplerConfig
    from engine.train.driver import pretrain
    from jobs.spec import parse_spec

    steps, batch = 16, 64
    trace = Path(work) / "trace"
    config = parse_spec({
        "kind": "pretrain",
        "name": "node-loss",
        "data": {"store": store, "batch_size": batch},
        "model": {"name": "vae", "config": {"n_latent": 4, "n_hidden": 16, "dropout": 0.0}},
        "train": {"max_steps": steps, "checkpoint_every": 4, "report_every": 4, "lr": 1e-2,
                  "output": str(Path(work) / "run"), "max_failures": 2},
        "resources": {"workers": 2, "cpus_per_worker": 0.5, "readers_per_worker": 1, "cpus_per_reader": 0.5},
        "debug": {"trace_dir": str(trace)},
    })  # fmt: skip
    removed: dict = {}

    def remove_a_worker_node() -> None:
        from ray._private.state import available_resources_per_node

        try:
            rank0 = trace / "rank0.jsonl"
            while not rank0.exists() or len(rank0.read_text().splitlines()) < 6:
                time.sleep(0.05)
            free = available_resources_per_node()
            victim = min(nodes, key=lambda n: free.get(n.node_id, {}).get("CPU", 0.0))  # the busiest node
            cluster.remove_node(victim)
            removed["node"] = victim.node_id
        except Exception as e:  # reported in the JSON line: the drill did not happen
            removed["error"] = repr(e)

    killer = threading.Thread(target=remove_a_worker_node, daemon=True)
    killer.start()
    result = pretrain(config)
    ok = {}
    for rank in (0, 1):
        last = {}
        for line in (trace / f"rank{rank}.jsonl").read_text().splitlines():
            entry = json.loads(line)
            last[entry["step"]] = entry["cells"]  # a redone step replaces the lost attempt's
        planned = []
        with Loader(store, SamplerConfig(batch_size=batch), rank=rank, world_size=2, mode="local") as loader:
            epoch = 0
            while len(planned) < steps:
                loader.set_epoch(epoch)
                planned += [b["index"].tolist() for b in loader][: steps - len(planned)]
                epoch += 1
        ok[rank] = [last.get(s) for s in range(1, steps + 1)] == planned
    killer.join(timeout=5)
    return {"final_step": result.history[-1]["step"], "plan_ok": ok, "removed": "node" in removed, **removed}


def elastic(cluster, nodes: list, removed: str | None, store: str, work: str) -> dict:
    from bench.elastic import drill

    alive = [n for n in nodes if n.node_id != removed]
    while len(alive) < WORLD:  # the node-loss drill left two: one node per elastic worker, three of them
        alive.append(cluster.add_node(num_cpus=2, object_store_memory=80 * 2**20))
    cluster.wait_for_nodes()
    return drill(cluster, alive, store, work, steps=40, pace=0.2)


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
        out["node_loss"] = node_loss(cluster, nodes, store, work)
        out["elastic"] = elastic(cluster, nodes, out["node_loss"].get("node"), store, work)
        print(json.dumps(out))
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
