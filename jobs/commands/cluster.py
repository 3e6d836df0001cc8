"""`cellray cluster start|stop|status|attach|check`: a local cluster for one machine, the scheduler on any cluster,
and the offline check of a cluster-launcher config (cluster.yaml)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    cluster = sub.add_parser("cluster", help="a local Ray cluster with the cellray scheduler; check cluster.yaml")
    cmds = cluster.add_subparsers(dest="cluster_command", required=True, metavar="COMMAND")
    state = {
        "default": None,
        "type": Path,
        "metavar": "DIR",
        "help": "where the cluster and the queue are recorded (default: CELLRAY_STATE_DIR, else ~/.cellray)",
    }

    p = cmds.add_parser(
        "start", help="start a Ray head on this machine (dashboard on 127.0.0.1, token auth) and the scheduler"
    )
    p.add_argument("--num-cpus", type=int, default=None, help="logical CPUs (default: this machine's)")
    p.add_argument("--num-gpus", type=int, default=None, help="GPUs (default: detected)")
    p.add_argument("--object-store-mb", type=int, default=None, help="object store size (default 10%% of RAM)")
    p.add_argument(
        "--queueing",
        default="strict",
        choices=["strict", "best-effort"],
        help="strict: nothing passes a waiting job (default); best-effort: smaller jobs may",
    )
    p.add_argument(
        "--system-config",
        default=None,
        metavar="JSON",
        help="Ray system config overrides, e.g. '{\"metrics_report_interval_ms\": 1000}'",
    )
    p.add_argument(
        "--prometheus",
        action="store_true",
        help="also start the installed `prometheus` on 127.0.0.1 with Ray's generated config, and point the "
        "dashboard's metrics views at it (RAY_PROMETHEUS_HOST)",
    )
    p.add_argument(
        "--scrape-interval",
        type=float,
        default=10.0,
        metavar="S",
        help="Prometheus's scrape interval in seconds (default 10, Ray's)",
    )
    p.add_argument("--state-dir", **state)
    p.set_defaults(func=run_start)

    p = cmds.add_parser("stop", help="stop the local cluster (only it: other Ray instances on this machine stay)")
    p.add_argument("--state-dir", **state)
    p.set_defaults(func=run_stop)

    p = cmds.add_parser("status", help="the local cluster (or --address): resources, dashboard, queue")
    p.add_argument("--address", default=None, help="a Ray cluster (default: RAY_ADDRESS, else the local one)")
    p.add_argument("--state-dir", **state)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run_status)

    p = cmds.add_parser("attach", help="start the scheduler on a running Ray cluster (on the head: cluster.yaml does)")
    p.add_argument("--address", default=None, help="the cluster (default: RAY_ADDRESS; `auto` on the head)")
    p.add_argument(
        "--state-dir",
        type=str,
        required=True,
        metavar="DIR",
        help="the queue's directory: shared storage on a real cluster, or a bucket prefix (s3://BUCKET/cellray)",
    )
    p.add_argument("--queueing", default="strict", choices=["strict", "best-effort"])
    p.add_argument(
        "--cluster-config",
        type=Path,
        default=None,
        metavar="YAML",
        help="size the queue by this cluster-launcher config's largest cluster (autoscaling), e.g. "
        "~/ray_bootstrap_config.yaml; default: the nodes up now",
    )
    p.set_defaults(func=run_attach)

    p = cmds.add_parser("check", help="validate a cluster-launcher config offline (Ray's schema + cellray's rules)")
    p.add_argument("config", type=Path, nargs="?", default=Path("cluster.yaml"))
    p.set_defaults(func=run_check)


def run_start(args: argparse.Namespace) -> int:
    import ray

    from engine.errors import ClusterError
    from engine.runtime import LOOPBACK_ENV, free_ports
    from jobs.cluster.local import install_grafana_dashboard, start_cluster, stop_cluster
    from jobs.cluster.prometheus import find_prometheus, start_prometheus
    from jobs.scheduler.client import connect, scheduler

    try:
        system_config = json.loads(args.system_config) if args.system_config else None
    except json.JSONDecodeError as e:
        raise ClusterError(f"--system-config: not JSON ({e})") from None
    if args.scrape_interval <= 0:
        raise ClusterError(f"--scrape-interval {args.scrape_interval:g}: expected seconds > 0")
    for flag, value, low in (("--num-cpus", args.num_cpus, 1), ("--num-gpus", args.num_gpus, 0),
                             ("--object-store-mb", args.object_store_mb, 1)):  # fmt: skip
        if value is not None and value < low:
            raise ClusterError(f"{flag} {value}: expected an integer >= {low}")
    mode = os.environ.get("RAY_AUTH_MODE")
    if mode is not None and mode.lower() != "token":  # the cluster has token auth; this client would send none
        raise ClusterError(
            f"RAY_AUTH_MODE={mode}: `cellray cluster start` always starts Ray with token auth, which this setting "
            "would keep this command (and every client in this environment) from using: unset RAY_AUTH_MODE"
        )
    prometheus = find_prometheus() if args.prometheus else None  # before anything starts: one line if missing
    prometheus_port = free_ports(1)[0] if prometheus else None
    c = start_cluster(
        args.state_dir,
        num_cpus=args.num_cpus,
        num_gpus=args.num_gpus,
        object_store_mb=args.object_store_mb,
        system_config=system_config,
        env={"RAY_PROMETHEUS_HOST": f"http://127.0.0.1:{prometheus_port}"} if prometheus else None,
    )
    try:
        if prometheus:
            home = Path(c.state_dir) / "prometheus"
            c.prometheus_pid = start_prometheus(prometheus, c.temp_dir, home, prometheus_port, args.scrape_interval)
            c.prometheus_url = f"http://127.0.0.1:{prometheus_port}"
            c.save()
        connect(c.address)
        info = ray.get(scheduler(create_in=c.state_dir, queueing=args.queueing).ping.remote())
        resources = ray.cluster_resources()
    except BaseException:
        ray.shutdown()
        stop_cluster(c.state_dir)
        raise
    print(f"cluster    {c.address}  ({resources.get('CPU', 0):g} CPUs, {resources.get('GPU', 0):g} GPUs)")
    print(f"dashboard  {c.dashboard_url}  (token: `ray get-auth-token`)")
    grafana = install_grafana_dashboard(c)
    print(f"metrics    {c.metrics_url}" + (f"  (Grafana dashboard: {grafana})" if grafana else ""))
    if c.prometheus_url:
        print(f"prometheus {c.prometheus_url}  (scrapes every {args.scrape_interval:g} s; the dashboard queries it)")
    print(f"scheduler  queue in {info['state_dir']} ({info['queueing']})")
    print("submit     cellray job submit SPEC.yaml   |   stop: cellray cluster stop")
    if c.address.startswith("127.0.0.1:"):  # Ray's single-machine mode (engine.runtime.keep_ray_on_loopback)
        env = f"{LOOPBACK_ENV}=0 RAY_AUTH_MODE=token"
        print(f"python     {env} before `import ray`, then ray.init(address={c.address!r})")
    return 0


def run_stop(args: argparse.Namespace) -> int:
    import ray

    from jobs.cluster.local import default_state_dir, stop_cluster

    ray.shutdown()  # a process that was a driver of it (a notebook, a test) lets go first
    c = stop_cluster(args.state_dir)
    if c is None:
        print(f"no local cluster recorded in {args.state_dir or default_state_dir()}")
        return 0
    print(f"stopped the cluster at {c.address} (the queue stays in {Path(c.state_dir) / 'scheduler'})")
    return 0


def run_status(args: argparse.Namespace) -> int:
    import ray

    from jobs.cluster.local import LocalCluster, default_state_dir
    from jobs.scheduler.client import call, connect

    local = None if args.address else LocalCluster.load(args.state_dir or default_state_dir())
    if local is not None and not local.alive():
        print(
            f"the local cluster at {local.address} is not running (stale {local.state_dir}/cluster.json); "
            "`cellray cluster start` starts one"
        )
        return 1
    address = connect(args.address or (local.address if local else None), args.state_dir)
    resources = ray.cluster_resources()
    info = call("info")
    if args.json:
        print(
            json.dumps(
                {
                    "address": address,
                    "resources": resources,
                    "scheduler": info,
                    "dashboard": local.dashboard_url if local else None,
                },
                indent=1,
            )
        )
        return 0
    print(
        f"cluster    {address}  ({resources.get('CPU', 0):g} CPUs, {resources.get('GPU', 0):g} GPUs, "
        f"{len([n for n in ray.nodes() if n['Alive']])} node(s))"
    )
    if local:
        print(f"dashboard  {local.dashboard_url}")
        print(f"metrics    {local.metrics_url}")
        if local.prometheus_url:
            print(f"prometheus {local.prometheus_url}")
    adm, cap = info["admitted"], info["capacity"]
    print(
        f"scheduler  {info['state_dir']} ({info['queueing']}); admitted {adm['CPU']:g}/{cap['CPU']:g} CPUs, "
        f"{adm['GPU']:g}/{cap['GPU']:g} GPUs"
    )
    print("jobs       " + ", ".join(f"{n} {s}" for s, n in info["jobs"].items()))
    return 0


def run_attach(args: argparse.Namespace) -> int:
    import ray

    from engine.objects import store_path
    from jobs.cluster.launcher import capacity_of
    from jobs.scheduler.client import connect, scheduler

    capacity = capacity_of(args.cluster_config) if args.cluster_config else None
    connect(args.address)
    info = ray.get(scheduler(create_in=args.state_dir, queueing=args.queueing, capacity=capacity).ping.remote())
    if info["state_dir"] != str(store_path(os.path.expanduser(args.state_dir)) / "scheduler"):
        print(f"note: a scheduler was already running on this cluster; it keeps its queue in {info['state_dir']}")
    print(
        f"scheduler  queue in {info['state_dir']} ({info['queueing']})"
        + (f"; capacity {capacity['CPU']:g} CPUs, {capacity['GPU']:g} GPUs" if capacity else "")
    )
    return 0


def run_check(args: argparse.Namespace) -> int:
    from jobs.cluster.launcher import check_cluster_yaml

    problems = check_cluster_yaml(args.config)
    for p in problems:
        print(p, file=sys.stderr)
    if problems:
        return 1
    print(f"{args.config}: ok (Ray's prepare_config + validate_config, and cellray's rules)")
    return 0
