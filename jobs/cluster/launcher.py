"""A Ray cluster-launcher config (cluster.yaml): `cellray cluster check` (Ray's own offline validation, then
cellray's rules) and `capacity_of` (the largest cluster it can grow to, which sizes the queue).

Ray: `prepare_config` (fills in the provider's defaults, as `ray up` does) then `validate_config` (the JSON
schema: unknown keys, integer resources, head_node_type naming a node type). cellray: a CPU head and a GPU
worker type, token auth on every node with the token shipped to it, the dashboard on 127.0.0.1 only (reached
through `ray dashboard cluster.yaml`), cellray installed by the setup commands, and the scheduler started on the
head with its state directory on shared storage. One line per problem.
"""

from __future__ import annotations

import copy
import logging
import re
from pathlib import Path
from typing import Any

import yaml

TOKEN_FILE = "~/.ray/auth_token"
LOCAL_DIRS = ("/tmp", "/var/tmp", "/dev/shm")


def check_cluster_yaml(path: str | Path) -> list[str]:
    path = Path(path)
    if not path.exists():
        return [f"{path}: no such file"]
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        return [f"{path}: not valid YAML ({str(e).splitlines()[0]})"]
    if not isinstance(config, dict):
        return [f"{path}: expected a mapping (a Ray cluster-launcher config)"]
    return [f"{path}: {p}" for p in ray_problems(config) + cellray_problems(config)]


def ray_problems(config: dict[str, Any]) -> list[str]:
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    quiet = logging.getLogger("ray.autoscaler")  # its INFO lines ("setting max workers ...") are not problems
    level = quiet.level
    quiet.setLevel(logging.WARNING)
    try:
        validate_config(prepare_config(copy.deepcopy(config)))
    except jsonschema.ValidationError as e:
        where = ".".join(str(p) for p in e.absolute_path)
        return [f"{where + ': ' if where else ''}{e.message} (Ray's cluster schema)"]
    except Exception as e:  # prepare_config's own checks (ValueError, KeyError on a missing provider, ...)
        return [f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'invalid'} (Ray's prepare_config)"]
    finally:
        quiet.setLevel(level)
    return []


def _commands(config: dict[str, Any], *keys: str) -> str:
    return "\n".join(str(c) for k in keys for c in (config.get(k) or []))


def _flag(commands: str, flag: str) -> list[str]:
    return re.findall(rf"--{flag}[= ]+(\S+)", commands)


def cellray_problems(config: dict[str, Any]) -> list[str]:
    problems: list[str] = []
    types = config.get("available_node_types") or {}
    head = config.get("head_node_type")
    if not types:  # Ray's schema lets both go (its launcher then falls back to one default node type)
        return ["available_node_types: missing (cellray needs a CPU head type and a GPU worker type)"]
    if head is None:
        return ["head_node_type: missing (expected one of available_node_types: " + ", ".join(map(str, types)) + ")"]
    if not isinstance(types, dict) or head not in types:
        return problems  # Ray's schema check already said so
    for name, t in types.items():
        for key in ("min_workers", "max_workers"):
            value = (t or {}).get(key, 0)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                problems.append(f"available_node_types.{name}.{key}: {value!r} is not a count (an integer >= 0)")
    if problems:
        return problems
    head_res = (types[head] or {}).get("resources") or {}
    if head_res.get("GPU", 0):
        problems.append(
            f"available_node_types.{head}: the head should be a CPU node (resources.GPU: 0); "
            "GPU nodes are workers the autoscaler can add and remove"
        )
    gpu_workers = [
        name
        for name, t in types.items()
        if name != head
        and ((t or {}).get("resources") or {}).get("GPU", 0) >= 1
        and (t or {}).get("max_workers", 0) >= 1
    ]
    if not gpu_workers:
        problems.append(
            "available_node_types: no GPU worker type (a type other than the head with resources.GPU >= 1 "
            "and max_workers >= 1)"
        )

    head_start = _commands(config, "head_start_ray_commands")
    worker_start = _commands(config, "worker_start_ray_commands")
    if "ray start" not in head_start:
        problems.append("head_start_ray_commands: no `ray start --head`")
    hosts = _flag(head_start, "dashboard-host")
    if not hosts:
        problems.append(
            "head_start_ray_commands: `ray start --head` needs --dashboard-host=127.0.0.1 "
            "(Ray's default for the launcher is 0.0.0.0; reach it with `ray dashboard cluster.yaml`)"
        )
    for h in hosts:
        if h.strip("'\"") not in ("127.0.0.1", "localhost"):
            problems.append(
                f"head_start_ray_commands: --dashboard-host={h}: the dashboard must listen on 127.0.0.1 "
                "only (reach it with `ray dashboard cluster.yaml`)"
            )
    for key, text in (("head_start_ray_commands", head_start), ("worker_start_ray_commands", worker_start)):
        if not re.search(r"RAY_AUTH_MODE=token", text):
            problems.append(f"{key}: token auth is off: start Ray with RAY_AUTH_MODE=token on every node")
    mounts = config.get("file_mounts") or {}
    setup_all = _commands(
        config, "setup_commands", "head_setup_commands", "worker_setup_commands", "initialization_commands"
    )
    if TOKEN_FILE not in mounts and "RAY_AUTH_TOKEN" not in head_start + worker_start + setup_all:
        problems.append(
            f"file_mounts: no token for the nodes: mount {TOKEN_FILE} (`ray get-auth-token --generate` "
            "makes one) or set RAY_AUTH_TOKEN"
        )
    setup = _commands(config, "setup_commands")
    if not re.search(r"pip install[^\n]*(cellray|-e\s+\S*cellray|-e\s+\.)", setup):
        problems.append("setup_commands: cellray is not installed on the nodes (e.g. `pip install -e ~/cellray`)")
    if "cluster attach" not in head_start:
        problems.append(
            "head_start_ray_commands: the scheduler is not started (`cellray cluster attach --address "
            "auto --state-dir /shared/...` after `ray start --head`)"
        )
    else:
        dirs = _flag(head_start, "state-dir")
        if not dirs:
            problems.append("head_start_ray_commands: `cellray cluster attach` needs --state-dir on shared storage")
        for d in dirs:
            if d.startswith(LOCAL_DIRS) or d.startswith("~"):
                problems.append(
                    f"head_start_ray_commands: --state-dir {d} is on the head's own disk: put the "
                    "scheduler's state on shared storage (NFS, EFS, a bucket mount) so it outlives the head"
                )
    max_workers = config.get("max_workers")
    mins = sum(int((t or {}).get("min_workers", 0)) for n, t in types.items() if n != head)
    if isinstance(max_workers, int) and mins > max_workers:
        problems.append(f"max_workers: {max_workers} is below the node types' min_workers ({mins} in all)")
    for name, t in types.items():
        t = t or {}
        if int(t.get("min_workers", 0)) > int(t.get("max_workers", t.get("min_workers", 0))):
            problems.append(
                f"available_node_types.{name}: min_workers {t['min_workers']} > max_workers {t['max_workers']}"
            )
    return problems


def capacity_of(path: Path) -> dict[str, float]:
    """The largest cluster a launcher config can grow to: the head plus every worker type at max_workers
    (within the global max_workers)."""
    config = yaml.safe_load(path.expanduser().read_text())
    types = config["available_node_types"]
    head = config["head_node_type"]
    budget = int(config.get("max_workers", 10**6))
    total = {"CPU": 0.0, "GPU": 0.0, "memory": 0.0}
    order = [head] + sorted((n for n in types if n != head), key=lambda n: -types[n].get("resources", {}).get("GPU", 0))
    for name in order:
        n = 1 if name == head else min(int(types[name].get("max_workers", 0)), budget)
        if name != head:
            budget -= n
        for r in total:
            total[r] += n * float(types[name].get("resources", {}).get(r, 0))
    return total
