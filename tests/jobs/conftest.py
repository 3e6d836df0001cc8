"""What the scheduler and monitoring tests share: `cellray` commands in one long-lived client process (cli_worker.py)
and a view of the cluster it started (test modules import these: `from tests.jobs.conftest import Cli, Head`)."""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import yaml

from jobs.cluster.local import temp_dir_for
from tests.conftest import ROOT

WORKER = Path(__file__).with_name("cli_worker.py")


class Cli:
    """`cellray ...` in the long-lived client process."""

    def __init__(self, env: dict[str, str], log: Path, cwd: Path):
        self.log = log
        with open(log, "w") as err:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen(
                [sys.executable, str(WORKER)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                env=env,
                cwd=cwd,
                text=True,
            )

    def _ask(self, request: dict, timeout: float) -> dict:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            raise TimeoutError(f"{request} took over {timeout} s; client log tail:\n{self.tail()}")
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the client process died; log tail:\n{self.tail()}")
        return json.loads(line)

    def __call__(self, *argv: str, timeout: float = 180) -> dict:
        return self._ask({"argv": [str(a) for a in argv]}, timeout)

    def ok(self, *argv: str, timeout: float = 180) -> str:
        r = self(*argv, timeout=timeout)
        assert r["rc"] == 0, f"cellray {' '.join(map(str, argv))}: rc {r['rc']}\n{r['out']}\n{r['err']}"
        return r["out"]

    def py(self, code: str, timeout: float = 120):
        r = self._ask({"py": code}, timeout)
        assert r["rc"] == 0, r["err"]
        return r["value"]

    def tail(self, n: int = 30) -> str:
        return "\n".join(self.log.read_text().splitlines()[-n:])

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


class Head:
    def __init__(self, cli: Cli, state: Path, work: Path):
        self.cli, self.state, self.work = cli, state, work
        self.info = json.loads((state / "cluster.json").read_text())

    def spec(self, name: str, **fields) -> Path:
        path = self.work / f"{name}.yaml"
        path.write_text(yaml.safe_dump({"kind": "sleep", "name": name, **fields}))
        return path

    def submit(self, spec: Path, *flags: str) -> str:
        return self.cli.ok("job", "submit", spec, *flags).strip()

    def job(self, job_id: str) -> dict:
        return json.loads(self.cli.ok("job", "status", job_id, "--json"))

    def wait_for(self, job_id: str, condition, what: str, timeout: float = 240) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            j = self.job(job_id)
            if condition(j):
                return j
            if time.monotonic() > deadline:
                raise AssertionError(f"{job_id} never {what}: {j}")
            time.sleep(0.3)

    def running(self, job_id: str) -> dict:
        return self.wait_for(job_id, lambda j: j["state"] == "RUNNING" and j["ray_status"] == "RUNNING", "ran")

    def ended(self, job_id: str, timeout: float = 240) -> dict:
        return self.wait_for(job_id, lambda j: j["state"] in ("SUCCEEDED", "FAILED", "STOPPED"), "ended", timeout)

    def ray_jobs(self) -> dict[str, dict]:
        """Every job Ray Jobs knows, by submission id, with its metadata (the dashboard's Jobs page)."""
        return self.cli.py(
            "from ray.job_submission import JobSubmissionClient\n"
            f"c = JobSubmissionClient({self.info['dashboard_url']!r})\n"
            "result = {j.submission_id: {'status': j.status.value, 'metadata': j.metadata} for j in c.list_jobs()"
            " if j.submission_id}\n"
        )

    def metrics(self) -> str:
        with urllib.request.urlopen(self.info["metrics_url"], timeout=10) as r:
            return r.read().decode()


def sample(text: str, name: str, **tags) -> float:
    """The sum of a Prometheus series' samples with these tags."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in tags.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


@contextlib.contextmanager
def running_head(tmp_path_factory, *start_args: str, env_vars: dict[str, str] | None = None) -> Iterator[Head]:
    """`cellray cluster start --num-cpus 2 --object-store-mb 300 START_ARGS` in a temp state dir, from a client
    process (with `env_vars`, which the head inherits); stopped (and the client closed) at the end, leaving no
    cluster.json behind."""
    state = tmp_path_factory.mktemp("state")
    work = tmp_path_factory.mktemp("work")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "CELLRAY_STATE_DIR": str(state),
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1",
        "RAY_DEDUP_LOGS": "0",
        **(env_vars or {}),
    }
    env.pop("RAY_ADDRESS", None)
    cli = Cli(env, work / "client.log", work)
    try:
        cli.ok("cluster", "start", "--num-cpus", "2", "--object-store-mb", "300", *start_args, timeout=600)
        yield Head(cli, state, work)
    finally:
        cli("cluster", "stop", timeout=120)
        cli.close()
        # the pytest state dir is too long for Ray's socket paths: Ray's logs went to /tmp/cellray-<hash> (kept
        # after a stop, as Ray keeps its own), which no tmp_path cleanup reaches
        outside = temp_dir_for(state)
        if state not in outside.parents:
            shutil.rmtree(outside, ignore_errors=True)
    assert not (state / "cluster.json").exists()
