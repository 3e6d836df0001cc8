"""Elastic pretraining on a local 3-node cluster: a node lost mid-epoch, then one added.

    python bench/elastic.py [--steps 60] [--pace 0.3] [--repeats 1]

A `ray.cluster_utils.Cluster` (head without CPUs, three 2-CPU nodes) runs a pretrain job with
`resources.workers: {min: 1, max: 3}` (2 CPUs per worker: one worker per node) and a global batch. Once step 6 has
passed at 3 workers, a node is removed; once the run steps at 2 workers, a node is added. Measured from the step
trace (`debug.trace_dir`, a wall-clock time per step): seconds from the node's removal to the next step, from the
node's addition to the first step at 3 workers, and steps/s in each phase. Checked: the global batch of every step
(the last attempt of each) equals the fixed-size plan's, every cell of a completed epoch is delivered once, and the
final parameters are within float tolerance of an in-process run of the same spec. Last line: one JSON object.

`drill()` is also what tests/multinode_drill.py runs on the test session's shared cluster.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GLOBAL, EVERY = 60, 4


def spec(store: str, out: Path, workers, steps: int, pace: float):
    from jobs.spec import parse_spec

    return parse_spec({
        "kind": "pretrain",
        "name": out.name,
        "data": {"store": store, "global_batch_size": GLOBAL, "obs_keys": ["cell_type"],
                 "loader": {"block_size": 64, "buffer_blocks": 2}},
        "model": {"name": "probe", "config": {"label_key": "cell_type", "n_hidden": 16}},
        "train": {"max_steps": steps, "lr": 3e-2, "min_lr_ratio": 1.0, "checkpoint_every": EVERY,
                  "report_every": EVERY, "output": str(out), "max_failures": 4},
        "resources": {"workers": workers, "cpus_per_worker": 2, "readers_per_worker": 0, "resize_interval_s": 1.0},
        "debug": {"trace_dir": str(out) + "-trace", "min_step_seconds": pace},
    })  # fmt: skip


def trace_entries(trace: Path) -> list[dict]:
    out = []
    for f in sorted(trace.glob("rank*.jsonl")):
        for line in f.read_text().splitlines():
            out.append({**json.loads(line), "rank": int(f.stem[4:])})
    return out


def last_attempts(entries: list[dict]) -> dict[int, dict]:
    """step -> the global batch of its last attempt: cells of its ranks in rank order, world size, attempt, time."""
    by_step: dict[int, dict[int, list[dict]]] = {}
    for e in entries:
        by_step.setdefault(e["step"], {}).setdefault(e["attempt"], []).append(e)
    out = {}
    for step, attempts in by_step.items():
        a = max(attempts)
        ranks = sorted(attempts[a], key=lambda e: e["rank"])
        complete = [e["rank"] for e in ranks] == list(range(ranks[0]["world_size"]))
        out[step] = {
            "cells": [c for e in ranks for c in e["cells"]] if complete else None,
            "world": ranks[0]["world_size"],
            "attempt": a,
            "time": min(e["time"] for e in ranks),
            "epoch": ranks[0]["epoch"],
        }
    return out


def planned(store: str, steps: int) -> list[list[int]]:
    """The global batches of a fixed-size run: the plan at one rank, in-process."""
    from engine.loading.loader import Loader
    from engine.loading.sampler import SamplerConfig

    plan = SamplerConfig(batch_size=GLOBAL, block_size=64, buffer_blocks=2, global_batch=True)
    out: list[list[int]] = []
    with Loader(store, plan, mode="local") as loader:
        epoch = 0
        while len(out) < steps:
            loader.set_epoch(epoch)
            out += [b["index"].tolist() for b in loader][: steps - len(out)]
            epoch += 1
    return out


def _wait(trace: Path, until, timeout: float) -> dict | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        hit = next((e for e in trace_entries(trace) if until(e)), None) if trace.exists() else None
        if hit is not None:
            return hit
        time.sleep(0.1)
    return None


def drill(cluster, nodes: list, store: str, work: str, steps: int = 48, pace: float = 0.3) -> dict:
    """The elastic run with a node removed then one added (see the module docstring); `nodes` are the cluster's
    worker nodes (the run is elastic from 1 to one worker per node). Returns what it saw, and the nodes it leaves."""
    import torch

    from engine.train.driver import pretrain

    out = Path(work) / "elastic"
    trace = Path(str(out) + "-trace")
    events: dict = {}
    top = len(nodes)  # one worker per node

    def resize() -> None:
        try:
            if _wait(trace, lambda e: e["world_size"] == top and e["step"] >= 6, 240) is None:
                raise TimeoutError(f"no step 6 at {top} workers")
            victim = nodes.pop()
            cluster.remove_node(victim)
            events["removed"] = time.time()
            shrunk = _wait(trace, lambda e: e["time"] > events["removed"] and e["world_size"] == top - 1, 240)
            if shrunk is None:
                raise TimeoutError(f"no step at {top - 1} workers after the node loss")
            events["shrunk"] = shrunk["time"]
            nodes.append(cluster.add_node(num_cpus=2, object_store_memory=80 * 2**20))
            events["added"] = time.time()
            grown = _wait(trace, lambda e: e["time"] > events["added"] and e["world_size"] == top, 240)
            if grown is None:
                raise TimeoutError(f"no step at {top} workers after the node was added")
            events["grown"] = grown["time"]
        except Exception as e:  # reported in the result: the drill did not happen as planned
            events["error"] = repr(e)

    # the run in a thread: Cluster.add_node installs signal handlers, which only the main thread may do
    run: dict = {}

    def train() -> None:
        try:
            run["result"] = pretrain(spec(store, out, {"min": 1, "max": top}, steps, pace))
        except BaseException as e:
            run["error"] = e

    thread = threading.Thread(target=train, daemon=True)
    thread.start()
    resize()
    thread.join()
    if "error" in run:
        raise run["error"]
    result = run["result"]
    ref = pretrain(spec(store, Path(work) / "fixed", 0, steps, 0.0))  # in this process, one worker
    steps_seen = last_attempts(trace_entries(trace))
    plan = planned(store, steps)
    batches_equal = all(steps_seen.get(s, {}).get("cells") == plan[s - 1] for s in range(1, steps + 1))
    epoch0 = [c for s in sorted(steps_seen) if steps_seen[s]["epoch"] == 0 for c in steps_seen[s]["cells"] or []]
    a = torch.load(Path(str(Path(work) / "fixed") + "-trace") / "final-rank0.pt")
    b = torch.load(trace / "final-rank0.pt")
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    return {
        **events,
        "final_step": result.history[-1]["step"],
        "fixed_final_step": ref.history[-1]["step"],
        "worlds": [steps_seen[s]["world"] for s in sorted(steps_seen)],
        "attempts": [steps_seen[s]["attempt"] for s in sorted(steps_seen)],
        "times": [steps_seen[s]["time"] for s in sorted(steps_seen)],
        "batches_equal": batches_equal,
        "epoch0_cells": len(epoch0),
        "epoch0_unique": len(set(epoch0)),
        "epoch0_batches": sum(1 for s in steps_seen.values() if s["epoch"] == 0),
        "max_param_diff": diff,
    }


def figures(seen: dict) -> dict:
    """Seconds from node loss to the next step and from node add to the larger world; steps/s in each phase (at the
    full world, one worker per node, and at one fewer)."""
    times, worlds = seen["times"], seen["worlds"]
    full = max(worlds)

    def rate(lo: float, hi: float, world: int) -> float | None:
        ts = [t for t, w in zip(times, worlds) if lo <= t <= hi and w == world]
        return (len(ts) - 1) / (ts[-1] - ts[0]) if len(ts) > 2 else None

    first_after = min(t for t in times if t > seen["removed"])
    return {
        "loss_to_next_step_s": first_after - seen["removed"],
        "add_to_larger_world_s": seen["grown"] - seen["added"],
        f"steps_per_s_{full}_before": rate(0, seen["removed"], full),
        f"steps_per_s_{full - 1}": rate(seen["removed"], seen["added"], full - 1),
        f"steps_per_s_{full}_after": rate(seen["grown"], float("inf"), full),
    }


def main() -> None:
    import ray
    from ray.cluster_utils import Cluster

    from engine.store.ingest import IngestConfig, ingest
    from engine.store.synthetic import synthetic_counts

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--pace", type=float, default=0.3, help="seconds per step at least (a CPU step is ~10 ms)")
    p.add_argument("--repeats", type=int, default=1)
    args = p.parse_args()
    health = {"health_check_period_ms": 500, "health_check_failure_threshold": 3}
    runs = []
    with tempfile.TemporaryDirectory(prefix="cellray-elastic-") as tmp:
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "_system_config": health})
        try:
            nodes = [cluster.add_node(num_cpus=2, object_store_memory=80 * 2**20) for _ in range(3)]
            cluster.wait_for_nodes()
            ray.init(address=cluster.address, logging_level="ERROR")
            synthetic_counts(1500, 300, nnz_per_cell=40, seed=0).write_h5ad(Path(tmp) / "in.h5ad")
            store = str(Path(tmp) / "s.store")
            ingest([Path(tmp) / "in.h5ad"], store, IngestConfig(shard_cells=400, obs_keys=("cell_type",)))
            for i in range(args.repeats):
                seen = drill(cluster, nodes, store, str(Path(tmp) / f"r{i}"), args.steps, args.pace)
                if "error" in seen:
                    raise SystemExit(f"drill {i}: {seen['error']}")
                runs.append({**figures(seen), "batches_equal": seen["batches_equal"], "diff": seen["max_param_diff"]})
                print(json.dumps(runs[-1]), file=sys.stderr)
        finally:
            ray.shutdown()
            cluster.shutdown()
    keys = [k for k in runs[0] if isinstance(runs[0][k], float)]
    med = {k: statistics.median(r[k] for r in runs if r[k] is not None) for k in keys}
    print(f"{'figure':<26}{'median':>10}  (of {len(runs)} run(s), pace {args.pace} s/step)")
    for k in keys:
        print(f"{k:<26}{med[k]:>10.3g}")
    print(json.dumps({"median": med, "runs": runs}))


if __name__ == "__main__":
    main()
