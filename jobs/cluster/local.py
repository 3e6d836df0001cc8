"""A local Ray cluster for one machine: `ray start --head --block`, wrapped, on free ports, in its own temp dir.

Several Ray instances share this machine (other users' `ray.init()` clusters, test sessions), so the head gets a
free port for everything it binds (GCS, dashboard, dashboard agent, metrics, client server, raylet, object
manager, runtime-env agent, workers) and its own `--temp-dir`: it never picks up, nor is picked up as,
/tmp/ray/ray_current_cluster. `ray start --block` runs in a new session (process group); stopping the cluster
signals exactly that group, then sweeps any process still naming the cluster's temp dir. Plain `ray stop` would
kill every Ray on the host.

`STATE_DIR/cluster.json` records the cluster (address, dashboard, ports, pid, temp dir); the job commands find
the local cluster there. The scheduler's queue lives beside it (STATE_DIR/scheduler/) and outlives the cluster.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from engine.atomic import write_text_atomically
from engine.errors import ClusterError
from engine.runtime import LOOPBACK_ENV, PROJECT_ROOT, free_ports, keep_ray_on_loopback

log = logging.getLogger(__name__)

CLUSTER_FILE = "cluster.json"
STATE_ENV = "CELLRAY_STATE_DIR"
# Ray's sockets live at TEMP/session_<date>_<pid>/sockets/plasma_store; a Unix socket path has at most 107 bytes.
MAX_TEMP_DIR_LEN = 40
PORT_NAMES = (
    "port",
    "dashboard-port",
    "dashboard-agent-listen-port",
    "dashboard-agent-grpc-port",
    "metrics-export-port",
    "ray-client-server-port",
    "node-manager-port",
    "object-manager-port",
    "runtime-env-agent-port",
)
WORKER_PORTS = 200
START_ATTEMPTS = 3  # a private range for worker processes, below Linux's ephemeral ports (32768+)


def default_state_dir() -> Path:
    return Path(os.environ.get(STATE_ENV) or Path.home() / ".cellray").expanduser()


@dataclass
class LocalCluster:
    state_dir: str
    address: str  # GCS address, what ray.init(address=...) and `--address` take
    dashboard_url: str
    metrics_url: str  # the head's Prometheus endpoint (ray.util.metrics series, cellray_* included)
    temp_dir: str
    pid: int  # `ray start --block`, leader of the cluster's process group
    num_cpus: float
    num_gpus: float
    ports: dict[str, int] = field(default_factory=dict)
    started: float = 0.0
    prometheus_url: str | None = None  # `cellray cluster start --prometheus`: jobs/cluster/prometheus.py
    prometheus_pid: int | None = None

    @classmethod
    def load(cls, state_dir: str | os.PathLike) -> LocalCluster | None:
        path = Path(state_dir) / CLUSTER_FILE
        if not path.exists():
            return None
        return cls(**json.loads(path.read_text()))

    def save(self) -> None:
        write_text_atomically(Path(self.state_dir) / CLUSTER_FILE, json.dumps(asdict(self), indent=1))

    def alive(self) -> bool:
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return not _is_zombie(self.pid)


def _is_zombie(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def free_port_range(n: int, low: int = 20000, high: int = 32000) -> int:
    """The first port of n consecutive ports that are all free now, outside the default ranges Ray's
    workers (10002-19999) and the kernel's ephemeral ports use."""
    import random

    rng = random.Random(os.getpid() ^ time.time_ns())
    for _ in range(50):
        start = rng.randrange(low, high - n)
        if all(_port_free(p) for p in range(start, start + n, 7)) and _port_free(start + n - 1):
            return start
    raise ClusterError(f"no range of {n} free ports found between {low} and {high}")


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def temp_dir_for(state_dir: Path) -> Path:
    """STATE_DIR/ray when short enough for Ray's socket paths, else /tmp/cellray-<hash of STATE_DIR>."""
    inside = state_dir / "ray"
    if len(str(inside)) <= MAX_TEMP_DIR_LEN:
        return inside
    return Path("/tmp") / f"cellray-{hashlib.sha1(str(state_dir).encode()).hexdigest()[:10]}"


def _ensure_token() -> None:
    """Token auth on: Ray's token file (~/.ray/auth_token, or RAY_AUTH_TOKEN[_PATH]) must exist first."""
    if os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return
    from ray._private.authentication.authentication_token_setup import (
        _get_default_token_path,
        generate_and_save_token,
    )

    if not _get_default_token_path().exists():
        generate_and_save_token()


def join_as_local(address: str, state_dir: str | os.PathLike | None = None) -> None:
    """A client of this machine's head joins it in Ray's single-machine mode: the head listens on 127.0.0.1 only,
    and a client in Ray's default mode would look for a node at the machine's address and wait there forever."""
    local = LocalCluster.load(state_dir or default_state_dir())
    if local is not None and address == local.address and address.startswith("127.0.0.1:"):
        keep_ray_on_loopback()


def start_cluster(
    state_dir: str | os.PathLike | None = None,
    num_cpus: float | None = None,
    num_gpus: float | None = None,
    object_store_mb: int | None = None,
    system_config: dict[str, Any] | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 150.0,
) -> LocalCluster:
    """Start a Ray head for this machine (every service on 127.0.0.1, token auth) and record it in STATE_DIR."""
    from engine.runtime import local_object_store_bytes

    state_dir = Path(state_dir or default_state_dir()).expanduser().resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    old = LocalCluster.load(state_dir)
    if old is not None and old.alive():
        raise ClusterError(
            f"{state_dir}: a cluster is already running at {old.address} (pid {old.pid}); `cellray cluster stop` first"
        )
    temp_dir = temp_dir_for(state_dir)
    temp_dir.mkdir(parents=True, exist_ok=True)
    _ensure_token()
    base_env = {**os.environ, **(env or {})}
    base_env["RAY_AUTH_MODE"] = "token"
    base_env.setdefault(LOOPBACK_ENV, "0")  # every service on 127.0.0.1 unless the user says (keep_ray_on_loopback)
    # The head's workers import this project (the scheduler actor, jobs' drivers before their working_dir).
    base_env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PROJECT_ROOT), base_env.get("PYTHONPATH", "")) if p)
    # `cellray cluster stop` ends the whole cluster: no 30 s node drain (it waits for idle workers, and the
    # detached scheduler never is); running jobs go back to the queue when the cluster comes back.
    base_env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "0"
    store_bytes = object_store_mb * 2**20 if object_store_mb else local_object_store_bytes()
    log_path = state_dir / "ray-start.log"
    address_file = temp_dir / "ray_current_cluster"
    for attempt in range(1, START_ATTEMPTS + 1):
        # fresh ports each attempt: one taken meanwhile by another process fails the start
        *main_ports, autoscaler_port, dashboard_metric_port = free_ports(len(PORT_NAMES) + 2)
        ports = dict(zip(PORT_NAMES, main_ports))
        worker_low = free_port_range(WORKER_PORTS)
        # Two more fixed default ports (44217, 44227) that two heads on one host would both want.
        run_env = {
            **base_env,
            "AUTOSCALER_METRIC_PORT": str(autoscaler_port),
            "DASHBOARD_METRIC_PORT": str(dashboard_metric_port),
            # the state API in its workers (Ray Train's placement-group cleaner) asks this head, never "auto"
            "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{ports['dashboard-port']}",
        }
        cmd = _head_command(temp_dir, store_bytes, ports, worker_low, num_cpus, num_gpus, system_config)
        address_file.unlink(missing_ok=True)
        with open(log_path, "w") as out:
            proc = subprocess.Popen(
                cmd,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=run_env,
                start_new_session=True,
                cwd=state_dir,
            )
        deadline = time.monotonic() + timeout
        while not address_file.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        if address_file.exists():
            break
        slow = proc.poll() is None
        _stop_group(proc.pid, str(temp_dir))
        text = log_path.read_text()
        # Ray waits a fixed 30 s for its raylet to register; on a loaded machine that (or our own deadline) can
        # pass: try again.
        if (slow or "timed out during startup" in text) and attempt < START_ATTEMPTS:
            log.warning(
                "ray start --head: not up after %s (machine busy?); trying again",
                f"{timeout:.0f} s" if slow else "Ray's 30 s raylet wait",
            )
            continue
        tail = "; ".join(text.strip().splitlines()[-3:])
        if slow:
            tail = f"not up after {timeout:.0f} s; {tail}"
        raise ClusterError(f"ray start --head failed (log {log_path}): {tail}")
    cluster = LocalCluster(
        state_dir=str(state_dir),
        address=address_file.read_text().strip() or f"127.0.0.1:{ports['port']}",
        dashboard_url=f"http://127.0.0.1:{ports['dashboard-port']}",
        metrics_url=f"http://127.0.0.1:{ports['metrics-export-port']}/metrics",
        temp_dir=str(temp_dir),
        pid=proc.pid,
        num_cpus=float(num_cpus) if num_cpus is not None else float(os.cpu_count() or 1),
        num_gpus=float(num_gpus or 0),
        ports={**ports, "min-worker-port": worker_low},
        started=time.time(),
    )
    cluster.save()
    log.info("ray head up at %s (dashboard %s)", cluster.address, cluster.dashboard_url)
    return cluster


def _head_command(
    temp_dir: Path,
    store_bytes: int,
    ports: dict[str, int],
    worker_low: int,
    num_cpus: float | None,
    num_gpus: float | None,
    system_config: dict[str, Any] | None,
) -> list[str]:
    """`ray start --head --block` on 127.0.0.1 with the dashboard, on the given ports and in its own temp dir."""
    cmd = [
        sys.executable,
        "-m",
        "ray.scripts.scripts",
        "start",
        "--head",
        "--block",
        "--node-ip-address=127.0.0.1",
        "--dashboard-host=127.0.0.1",
        "--include-dashboard=true",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
        f"--object-store-memory={store_bytes}",
        f"--min-worker-port={worker_low}",
        f"--max-worker-port={worker_low + WORKER_PORTS - 1}",
        *(f"--{name}={port}" for name, port in ports.items()),
    ]
    if num_cpus is not None:
        cmd.append(f"--num-cpus={int(num_cpus)}")
    if num_gpus is not None:
        cmd.append(f"--num-gpus={int(num_gpus)}")
    if system_config:
        cmd.append(f"--system-config={json.dumps(system_config)}")
    return cmd


GRAFANA_DASHBOARD = PROJECT_ROOT / "jobs" / "grafana" / "cellray.json"


def install_grafana_dashboard(cluster: LocalCluster) -> Path | None:
    """Put cellray's Grafana dashboard beside Ray's own in the session's provisioning folder, so a Grafana started
    with the session's grafana.ini shows it next to Ray's dashboards. Best effort (None when the folder is not
    there, e.g. the dashboard is off)."""
    import shutil

    folder = Path(cluster.temp_dir) / "session_latest" / "metrics" / "grafana" / "dashboards"
    if not folder.is_dir() or not GRAFANA_DASHBOARD.exists():
        return None
    dest = folder / "cellray_grafana_dashboard.json"
    shutil.copyfile(GRAFANA_DASHBOARD, dest)
    return dest


def stop_cluster(state_dir: str | os.PathLike | None = None, timeout: float = 30.0) -> LocalCluster | None:
    """Stop the cluster recorded in STATE_DIR, and only it. Returns it (None when none was recorded)."""
    state_dir = Path(state_dir or default_state_dir()).expanduser().resolve()
    cluster = LocalCluster.load(state_dir)
    if cluster is None:
        return None
    if cluster.prometheus_pid:
        from jobs.cluster.prometheus import stop_prometheus

        stop_prometheus(cluster.prometheus_pid)
    _stop_group(cluster.pid, cluster.temp_dir, timeout)
    (state_dir / CLUSTER_FILE).unlink(missing_ok=True)
    return cluster


def _names(arg: str, temp_dir: str) -> bool:
    """Whether a command-line argument names this cluster's temp dir (and not another one it is a prefix of)."""
    return arg == temp_dir or arg.endswith("=" + temp_dir) or temp_dir + "/" in arg


def _stop_group(pid: int, temp_dir: str, timeout: float = 30.0) -> None:
    """SIGTERM `ray start --block` (it stops the processes it started), then SIGKILL what is left of its process
    group and of any process whose command line names the cluster's temp dir."""
    import psutil

    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not _is_zombie(pid):
        time.sleep(0.2)
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)  # reap it if this process started it
    log.debug("ray start (pid %d) ended after %.1f s", pid, timeout - (deadline - time.monotonic()))
    leftovers = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if p.pid == os.getpid():
                continue
            if os.getpgid(p.pid) == pid or any(_names(arg, temp_dir) for arg in (p.info["cmdline"] or [])):
                leftovers.append(p)
        except (psutil.Error, ProcessLookupError, PermissionError):
            continue
    for p in leftovers:
        with contextlib.suppress(psutil.Error):
            p.terminate()
    log.debug("%d leftover process(es) of the cluster: %s", len(leftovers), [p.pid for p in leftovers])
    _, alive = psutil.wait_procs(leftovers, timeout=5)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(alive, timeout=5)
