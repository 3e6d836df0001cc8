"""Prometheus for a local cluster (`cellray cluster start --prometheus`): an installed `prometheus` binary (Debian's
package), on 127.0.0.1, scraping what Ray's own generated config lists.

Ray's dashboard writes SESSION/metrics/prometheus/prometheus.yml, whose file-based service discovery
(SESSION/prom_metrics_service_discovery.json) names every node's metrics port, the cellray_* series included. cellray
runs Prometheus on that config (with the scrape interval it is given) and starts the head with RAY_PROMETHEUS_HOST,
so the dashboard's metrics views query it. The config keeps the series' own `job` label (honor_labels), which
Prometheus would otherwise rename `exported_job`. `ray metrics launch-prometheus` would download Prometheus from the
internet; this uses the one installed, or says in one line how to install it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import yaml

from engine.errors import ClusterError

log = logging.getLogger(__name__)

INSTALL = "no `prometheus` on PATH: install it (`sudo apt-get install prometheus` on Debian/Ubuntu) to use --prometheus"
RAY_CONFIG = Path("session_latest") / "metrics" / "prometheus" / "prometheus.yml"  # under the cluster's temp dir
CONFIG_FILE = "prometheus.yml"  # under STATE_DIR/prometheus, beside its data


def find_prometheus() -> str:
    """The installed prometheus binary, or a ClusterError saying how to install one."""
    path = shutil.which("prometheus")
    if path is None:
        raise ClusterError(INSTALL)
    return path


def start_prometheus(
    binary: str, temp_dir: str | os.PathLike, home: Path, port: int, scrape_s: float, timeout: float = 60.0
) -> int:
    """Start Prometheus on 127.0.0.1:port with Ray's generated config (written once the head's dashboard is up),
    its data in HOME; returns its pid once it answers /-/ready."""
    ray_config = Path(temp_dir) / RAY_CONFIG
    deadline = time.monotonic() + timeout
    while not ray_config.exists():
        if time.monotonic() > deadline:
            raise ClusterError(f"{ray_config}: Ray's Prometheus config did not appear within {timeout:.0f} s")
        time.sleep(0.2)
    config = yaml.safe_load(ray_config.read_text())
    config.setdefault("global", {})["scrape_interval"] = f"{scrape_s:g}s"
    config["global"]["evaluation_interval"] = f"{scrape_s:g}s"
    for scrape in config.get("scrape_configs", []):
        # cellray's series carry a `job` tag; without this Prometheus renames it `exported_job` (its own `job` label
        # names the scrape job, "ray", which no Ray series uses)
        scrape["honor_labels"] = True
    home.mkdir(parents=True, exist_ok=True)
    (home / CONFIG_FILE).write_text(yaml.safe_dump(config, sort_keys=False))
    with open(home / "prometheus.log", "w") as out:
        proc = subprocess.Popen(
            [
                binary,
                f"--config.file={home / CONFIG_FILE}",
                f"--storage.tsdb.path={home / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--web.enable-lifecycle",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            cwd=home,
        )
    while time.monotonic() < deadline and proc.poll() is None:
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/-/ready", timeout=2) as r:
                if r.status == 200:
                    log.info("prometheus up on 127.0.0.1:%d (pid %d)", port, proc.pid)
                    return proc.pid
        time.sleep(0.3)
    stop_prometheus(proc.pid)
    tail = "; ".join((home / "prometheus.log").read_text().strip().splitlines()[-2:])
    raise ClusterError(f"prometheus did not start (log {home / 'prometheus.log'}): {tail}")


def stop_prometheus(pid: int, timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after `timeout`; reaped when this process started it."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError, OSError):
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
