"""A node lost mid-training (run as a script by test_node_loss.py: it needs a Ray cluster of its own).

Starts a `ray.cluster_utils.Cluster` (a head without CPUs and two 2-CPU worker nodes), trains 2 DDP workers with
a reader actor each, removes the node of one worker once step 6 has passed, and prints one JSON line: the final
step, and for each rank whether every step's cells (the last attempt of each step) equal that rank's plan.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path


def main(store: str, work: str) -> None:
    import ray
    from ray.cluster_utils import Cluster

    from engine.loading.loader import Loader
    from engine.train.driver import pretrain
    from jobs.spec import parse_spec

    steps, batch = 16, 64
    # a lost node is declared dead after ~1.5 s of failed health checks (Ray's default: ~15 s)
    health = {"health_check_period_ms": 500, "health_check_failure_threshold": 3}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "_system_config": health})
    nodes = [cluster.add_node(num_cpus=2) for _ in range(2)]
    ray.init(address=cluster.address)
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
        with Loader(store, batch_size=batch, rank=rank, world_size=2, mode="local") as loader:
            epoch = 0
            while len(planned) < steps:
                loader.set_epoch(epoch)
                planned += [b["index"].tolist() for b in loader][: steps - len(planned)]
                epoch += 1
        ok[rank] = [last.get(s) for s in range(1, steps + 1)] == planned
    killer.join(timeout=5)
    print(json.dumps({"final_step": result.history[-1]["step"], "plan_ok": ok, "removed": "node" in removed}))
    print(json.dumps(removed), file=sys.stderr)
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
