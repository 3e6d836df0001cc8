"""The scheduler from a client's side: find the cluster, reach (or create) the scheduler actor, call it.

The cluster is `--address`, else RAY_ADDRESS, else the local cluster `cellray cluster start` recorded in the state
directory (CELLRAY_STATE_DIR, default ~/.cellray). The client connects as a Ray driver with token auth on (the
token from ~/.ray/auth_token, RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH) and ships nothing: the scheduler runs the
project installed on the head.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from engine.errors import SchedulerError, cellray_cause
from engine.objects import store_path
from jobs.cluster.local import LocalCluster, default_state_dir, join_as_local
from jobs.scheduler.actor import NAME, NAMESPACE

log = logging.getLogger(__name__)

SCHEDULER_DIR = "scheduler"  # STATE_DIR/scheduler: the queue (scheduler.json, specs/)
NO_CLUSTER = (
    "no cluster: start one with `cellray cluster start`, or pass --address HOST:PORT "
    "(or set RAY_ADDRESS) for a running Ray cluster"
)


def use_token_auth() -> None:
    """Send Ray's auth token when one exists and the mode is not set (a token-auth head refuses clients without
    it, after ~24 s of retries)."""
    if os.environ.get("RAY_AUTH_MODE"):
        return
    has_token = (
        os.environ.get("RAY_AUTH_TOKEN")
        or os.environ.get("RAY_AUTH_TOKEN_PATH")
        or (Path.home() / ".ray" / "auth_token").exists()
    )
    if not has_token:
        return
    if "ray" not in sys.modules:
        os.environ["RAY_AUTH_MODE"] = "token"  # read when Ray loads
        return
    from ray._private.authentication.authentication_token_setup import _enable_token_auth

    _enable_token_auth()  # sets RAY_AUTH_MODE=token and refreshes Ray's config in this process


def resolve_address(address: str | None, state_dir: str | os.PathLike | None = None) -> str:
    if address:
        return address
    if os.environ.get("RAY_ADDRESS"):
        return os.environ["RAY_ADDRESS"]
    local = LocalCluster.load(state_dir or default_state_dir())
    if local is None or not local.alive():
        raise SchedulerError(NO_CLUSTER)
    return local.address


def connect(address: str | None = None, state_dir: str | os.PathLike | None = None) -> str:
    """Connect this process to the cluster as a driver (once); returns the address."""
    import ray

    if ray.is_initialized():  # already a driver of some cluster (a notebook, a test, `cluster start`): use it
        return ray.get_runtime_context().gcs_address
    addr = resolve_address(address, state_dir)
    use_token_auth()
    join_as_local(addr, state_dir)
    try:
        ray.init(address=addr, namespace=NAMESPACE, logging_level=logging.WARNING, log_to_driver=False)
    except (ConnectionError, RuntimeError) as e:
        raise SchedulerError(f"cannot reach the Ray cluster at {addr}: {str(e).splitlines()[0]}") from None
    return addr


def scheduler(create_in: str | None = None, queueing: str = "strict", capacity: dict[str, float] | None = None):
    """The scheduler actor of the connected cluster. With `create_in` (a state directory on the head), start it
    if it is not running; it keeps its queue in STATE_DIR/scheduler."""
    import ray

    try:
        return ray.get_actor(NAME, namespace=NAMESPACE)
    except ValueError:
        pass
    if create_in is None:
        create_in = os.environ.get("CELLRAY_STATE_DIR", "~/.cellray")  # expanded on the head
    from jobs.scheduler.actor import Scheduler

    actor = (
        ray.remote(Scheduler)
        .options(
            name=NAME,
            namespace=NAMESPACE,
            lifetime="detached",
            get_if_exists=True,
            max_restarts=-1,
            max_task_retries=0,
            max_concurrency=16,
            num_cpus=0,
            resources={"node:__internal_head__": 0.001},  # on the head: it outlives worker nodes
        )
        .remote(str(store_path(create_in) / SCHEDULER_DIR), queueing, capacity)
    )
    ray.get(actor.ping.remote(), timeout=120)
    return actor


def call(method: str, *args: Any, timeout: float = 60.0, retry: bool = True) -> Any:
    """scheduler().method(*args), re-raising the scheduler's CellrayError as itself. Read-only calls wait out a
    scheduler restart (Ray restarts it and it reloads its state)."""
    import ray

    deadline = time.monotonic() + timeout
    while True:
        actor = scheduler()
        try:
            return ray.get(getattr(actor, method).remote(*args), timeout=timeout)
        except ray.exceptions.RayTaskError as e:
            cause = cellray_cause(e)
            if cause is not None:
                raise cause from None
            raise
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as e:
            if not retry or time.monotonic() > deadline:
                raise SchedulerError(
                    f"the cellray scheduler is not answering ({type(e).__name__}); try again"
                ) from None
            time.sleep(0.5)
        except ray.exceptions.GetTimeoutError:
            raise SchedulerError(f"the cellray scheduler did not answer `{method}` within {timeout:g} s") from None
