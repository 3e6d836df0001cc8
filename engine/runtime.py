"""Where cellray's Ray work runs: the cluster at `address`, or an embedded local Ray started on demand."""

from __future__ import annotations

import collections
import contextlib
import itertools
import logging
import os
import re
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

from engine.errors import CellrayError, cellray_cause
from engine.progress import Progress, silent

log = logging.getLogger(__name__)

Executor = Literal["auto", "ray", "local"]
# Below this many bytes of count data, work runs faster in this process than Ray can start workers and
# import the engine (~3-5 s on a laptop); above it, Ray tasks spread it over every CPU of the cluster.
LOCAL_MAX_BYTES = 256 * 2**20


def choose_local(executor: Executor, address: str | None, work_bytes: int) -> bool:
    """Whether a stage's tasks run in this process (True) or as Ray tasks: the one rule for every stage."""
    if executor == "local":
        return True
    if executor == "ray" or address is not None:
        return False
    return work_bytes < LOCAL_MAX_BYTES


PROJECT_ROOT = Path(__file__).resolve().parents[1]


# Ray's single-machine mode (its default on macOS and Windows): every service of a Ray this process starts or joins
# listens on 127.0.0.1. On Linux Ray replaces 127.0.0.1 by the machine's address and serves GCS, raylet, object
# manager, workers and metrics there (several on all interfaces); cellray's own Rays stay on loopback.
LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
INSECURE_ENV = "CELLRAY_INSECURE"  # set by `cellray --insecure`: accept an embedded Ray without token auth
SESSIONS_DIR = Path.home() / ".cache" / "cellray" / "embedded-ray"  # one record per live embedded Ray


def free_ports(n: int) -> list[int]:
    """n distinct ports that are free now (bound and released; the kernel hands out each once)."""
    socks, ports = [], []
    try:
        while len(ports) < n:
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


_UNDO: list[Callable[[], None]] = []  # what init_ray changed for an embedded Ray, undone when its session ends


def init_ray(address: str | None = None, num_cpus: int | None = None, dashboard: bool = True) -> bool:
    """Connect to Ray unless already connected. Returns True when this call started/connected it.

    `address=None` starts a fresh embedded Ray (``address="local"`` never attaches to a stale cluster left in
    /tmp/ray) with token auth set explicitly (see `secure_embedded_ray`), every service on 127.0.0.1
    (`keep_ray_on_loopback`). The
    dashboard is on by default: it also serves the state API that Ray Train's placement-group cleaner polls every
    second. Processes left by an embedded Ray whose cellray command was killed are stopped first. Any other
    address connects there and ships this project as the job's working_dir so every node imports the same
    engine/models/jobs.
    """
    import ray

    if ray.is_initialized():
        return False
    if address is None:
        stop_orphaned_embedded_rays()
        secure_embedded_ray()
        _UNDO.append(keep_ray_on_loopback())
        # Ray's state API (Ray Train's placement-group cleaner polls it) resolves "auto" in every worker and fails
        # with "Found multiple active Ray instances" when another Ray runs on this machine: name this one's
        dashboard_port = free_ports(1)[0]
        env = {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{dashboard_port}"} if dashboard else {}
        ctx = ray.init(
            address="local",
            num_cpus=num_cpus,
            include_dashboard=dashboard,
            dashboard_host="127.0.0.1",
            dashboard_port=dashboard_port,
            runtime_env={"env_vars": env} if env else None,
            object_store_memory=local_object_store_bytes(),
            logging_level=logging.WARNING,
            log_to_driver=True,
        )
        _record_embedded_session()
        _restrict_token_file()
    else:
        ctx = ray.init(
            address=address,
            runtime_env={"working_dir": str(PROJECT_ROOT), "excludes": [".venv*", "data", "runs", ".git", "bench/out"]},
            logging_level=logging.WARNING,
        )
    quiet_benign_ray_lines()
    url = getattr(ctx, "dashboard_url", None)
    log.info("ray ready: %s%s", ray.cluster_resources(), f"; dashboard http://{url}" if url else "")
    return True


# Ray-internal lines that Ray streams from its workers' logs to this terminal and that name no problem of the user's.
# Ray logs one at ERROR level from C++ for every restartable actor with a constructor argument in the object store
# (ray-project/ray#53727: Ray keeps no lineage for such arguments, so a restart could miss them): every Ray Train run's
# controller for Ray Train's own PreemptionWatcher. (cellray's reader actors take their recipe in each call instead:
# engine.loading.actors.start_reader_actor.) They stay in Ray's log files.
BENIGN_RAY_LINES = re.compile(
    r"Actor with class name: 'PreemptionWatcher' .* has constructor arguments in the object store"
)


def quiet_benign_ray_lines() -> None:
    """Drop `BENIGN_RAY_LINES` from the worker logs this driver prints (Ray's log_to_driver handler); idempotent."""
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    def quiet(handler: Callable[[dict], None]) -> Callable[[dict], None]:
        def handle(data: dict) -> None:
            lines = [line for line in data.get("lines", ()) if not BENIGN_RAY_LINES.search(line)]
            if lines or not data.get("lines"):
                handler({**data, "lines": lines})

        handle.cellray_quiet = True  # type: ignore[attr-defined]
        return handle

    with dispatcher._lock:
        dispatcher.handlers = [
            (name, h if name != "ray_print_logs" or getattr(h, "cellray_quiet", False) else quiet(h))
            for name, h in dispatcher.handlers
        ]


def keep_ray_on_loopback() -> Callable[[], None]:
    """Ray's single-machine mode for this process and the Ray processes it starts (they inherit the environment): a
    Ray started here binds 127.0.0.1 only, and this process joins a head started so (`cellray cluster start`).
    A user's own RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER wins. Returns a function that undoes it."""
    import ray._private.ray_constants as constants  # read at call time by Ray's get_node_ip_address

    if LOOPBACK_ENV in os.environ:
        return lambda: None
    before = constants.ENABLE_RAY_CLUSTER
    os.environ[LOOPBACK_ENV] = "0"
    constants.ENABLE_RAY_CLUSTER = False

    def undo() -> None:
        os.environ.pop(LOOPBACK_ENV, None)
        constants.ENABLE_RAY_CLUSTER = before

    return undo


def secure_embedded_ray() -> None:
    """Token auth on, explicitly: Ray turns it on by default for clusters ray.init starts, but RAY_AUTH_MODE in the
    environment silently turns it off. Then anyone who can reach this machine's Ray ports can run code as you, so
    cellray refuses unless the user passed --insecure."""
    mode = os.environ.get("RAY_AUTH_MODE")
    if mode is not None and mode.lower() != "token":
        if os.environ.get(INSECURE_ENV) != "1":
            raise CellrayError(
                f"RAY_AUTH_MODE={mode} turns off Ray's token auth for the embedded Ray: anyone who can reach this "
                "machine's Ray ports (GCS, raylet and worker gRPC ports on the node address) could run code as you. "
                "Unset RAY_AUTH_MODE, or pass --insecure to accept that"
            )
        log.warning("embedded Ray without token auth (--insecure): its gRPC ports accept anyone who can reach them")
        return
    if mode is None:
        # Ray's own switch: sets RAY_AUTH_MODE=token and refreshes the config this process already loaded (setting
        # the variable alone reaches the Ray processes but not this driver's client, which then sends no token)
        from ray._private.authentication.authentication_token_setup import _enable_token_auth

        _enable_token_auth()


def _restrict_token_file() -> None:
    """Ray writes ~/.ray/auth_token readable by everyone (0644); the token is a password: 0600."""
    token = Path.home() / ".ray" / "auth_token"
    if token.exists() and token.stat().st_mode & 0o077:
        token.chmod(0o600)


def _record_embedded_session() -> None:
    """Remember which Ray session this process started, so a later command can stop it if this one is killed."""
    import json

    import ray

    session_dir = ray._private.worker._global_node.get_session_dir_path()
    SESSIONS_DIR.mkdir(parents=True, exist_ok=True)
    (SESSIONS_DIR / f"{os.getpid()}.json").write_text(json.dumps({"pid": os.getpid(), "session_dir": session_dir}))


def _forget_embedded_session() -> None:
    (SESSIONS_DIR / f"{os.getpid()}.json").unlink(missing_ok=True)


def stop_orphaned_embedded_rays() -> list[int]:
    """Stop the Ray processes of embedded Rays whose cellray process is gone (killed with -9, say): Ray's
    dashboard and agents otherwise keep listening for about a minute. Returns the pids stopped."""
    import json

    import psutil

    from engine.atomic import process_alive

    stopped: list[int] = []
    for record in SESSIONS_DIR.glob("*.json") if SESSIONS_DIR.is_dir() else ():
        try:
            info = json.loads(record.read_text())
        except (OSError, ValueError):
            record.unlink(missing_ok=True)
            continue
        if process_alive(int(info["pid"])):
            continue
        session = str(info["session_dir"])
        for proc in psutil.process_iter(["pid", "cmdline"]):
            try:
                if any(session in arg for arg in proc.info["cmdline"] or ()):
                    proc.kill()
                    stopped.append(proc.info["pid"])
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        record.unlink(missing_ok=True)
        if stopped:
            log.warning("stopped %d Ray process(es) left by a killed cellray command (%s)", len(stopped), session)
    return stopped


def local_object_store_bytes() -> int:
    """A modest object store for an embedded Ray: cellray streams, so it never needs 30% of RAM."""
    import psutil

    env = os.environ.get("CELLRAY_OBJECT_STORE_MB")
    if env:
        return int(env) * 2**20
    return int(min(2 * 2**30, max(512 * 2**20, psutil.virtual_memory().total * 0.1)))


_METRICS_SET_AT = 0.0  # time.monotonic() when this process last set one of its Ray metrics (`metrics_set`)


def metrics_set() -> None:
    """Note that this process has just set a Ray metric: a `ray_session` attached to a cluster keeps its connection
    until Ray has exported it."""
    global _METRICS_SET_AT
    _METRICS_SET_AT = time.monotonic()


def _wait_for_metrics_export() -> None:
    """Ray exports a process's metrics on its report interval (`metrics_report_interval_ms`, 10 s by default, the
    cluster's setting in a connected driver), not when they are set: a driver that disconnects right after setting
    its last values loses them. Waits out what is left of one interval (at most 10.5 s)."""
    if not _METRICS_SET_AT:
        return
    import ray

    interval_ms = getattr(ray._config, "metrics_report_interval_ms", lambda: 10_000)()
    remaining = _METRICS_SET_AT + min(interval_ms, 10_000) / 1000 + 0.5 - time.monotonic()
    if remaining > 0:
        time.sleep(remaining)


@contextlib.contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None) -> Iterator[None]:
    """Use Ray for the duration of a command; shut it down afterwards only if this started it (attached to a
    cluster, once the metrics this process set have been exported: the cluster's dashboard outlives the command)."""
    import ray

    started = init_ray(address, num_cpus=num_cpus)
    try:
        yield
        if started and address is not None:  # a failing command does not wait: its error comes first
            _wait_for_metrics_export()
    finally:
        if started:
            ray.shutdown()
            _forget_embedded_session()
            while _UNDO:
                _UNDO.pop()()


def ray_cpus() -> int:
    """Logical CPUs of the connected Ray cluster (at least 1)."""
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def map_tasks(
    fn: Callable,
    calls: Sequence[tuple],
    *,
    local: bool,
    stage: str = "",
    progress: Progress | None = None,
    window: int | None = None,
    max_retries: int = 0,
) -> Iterator[Any]:
    """fn(*args) for each args in `calls`, in this process (`local`) or as Ray tasks with at most `window`
    in flight (default: twice the cluster's CPUs); yields results in call order, reporting progress.

    Results in call order keep merges reproducible. A CellrayError raised inside a task is re-raised as
    itself, so the user reads the message rather than a Ray traceback; the tasks not yet done are cancelled.
    """
    report = progress or silent
    report(stage, 0, len(calls))
    if local:
        for done, args in enumerate(calls, 1):
            yield fn(*args)
            report(stage, done, len(calls))
        return
    import ray

    remote = ray.remote(num_cpus=1, max_retries=max_retries)(fn)
    window = window or 2 * ray_cpus()
    pending: collections.deque = collections.deque()
    todo = iter(calls)
    for args in itertools.islice(todo, window):
        pending.append(remote.remote(*args))
    done = 0
    while pending:
        try:
            result = ray.get(pending.popleft())
        except ray.exceptions.RayTaskError as e:
            for ref in pending:
                ray.cancel(ref)
            cause = cellray_cause(e)
            if cause is not None:
                raise cause from None
            raise
        done += 1
        report(stage, done, len(calls))
        nxt = next(todo, None)
        if nxt is not None:
            pending.append(remote.remote(*nxt))
        yield result


def peak_rss_sampler() -> Callable[[], int]:
    """Start a thread sampling this process's RSS; returns a function giving the peak growth in bytes."""
    import threading

    import psutil

    proc = psutil.Process()
    base = proc.memory_info().rss
    peak = [base]
    stop = threading.Event()

    def sample():
        while not stop.wait(0.005):
            peak[0] = max(peak[0], proc.memory_info().rss)

    t = threading.Thread(target=sample, daemon=True)
    t.start()

    def finish() -> int:
        stop.set()
        t.join()
        return max(peak[0], proc.memory_info().rss) - base

    return finish
