"""`cellray job submit|list|status|logs|stop|wait`: the queue, as `ray job` would have it with a scheduler."""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime
from pathlib import Path

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def register(sub: argparse._SubParsersAction) -> None:
    job = sub.add_parser("job", help="queue jobs on a cluster: priorities, gang admission, preemption, retries")
    jobs = job.add_subparsers(dest="job_command", required=True, metavar="COMMAND")

    def add(name: str, help: str, func, id_arg: bool = True) -> argparse.ArgumentParser:
        p = jobs.add_parser(name, help=help)
        if id_arg:
            p.add_argument("id", help="the job id `cellray job submit` printed (e.g. j0003)")
        p.add_argument(
            "--address", default=None, help="Ray cluster (default: RAY_ADDRESS, else `cellray cluster start`'s)"
        )
        p.set_defaults(func=func)
        return p

    p = add("submit", "queue a job spec; prints its id and returns at once", run_submit, id_arg=False)
    p.add_argument("spec", type=Path, help="a YAML job spec (kind: pretrain, embed, stats, ingest, sleep)")
    p.add_argument("--priority", type=int, default=0, help="higher runs first and may preempt lower (default 0)")
    p.add_argument("--name", default=None, help="job name (default: the spec's name)")
    p.add_argument(
        "--max-retries",
        type=int,
        default=0,
        metavar="N",
        help="rerun after a lost process or node, at most N times (never after a spec or data error)",
    )
    p.add_argument("--no-preempt", action="store_true", help="never preempt this job (pretrain and embed jobs can be)")

    p = add(
        "list", "every job: id, name, kind, priority, state, demand, times, attempts, progress", run_list, id_arg=False
    )
    p.add_argument("--json", action="store_true")
    p = add("status", "one job's state, live progress and history", run_status)
    p.add_argument("--json", action="store_true")
    p = add("logs", "the job's driver log (from Ray Jobs)", run_logs)
    p.add_argument("--follow", "-f", action="store_true", help="keep printing until the job ends")
    p.add_argument("--attempt", type=int, default=None, help="this attempt's log (default: the latest)")
    add("stop", "stop a job (a queued job never reaches Ray)", run_stop)
    p = add("wait", "wait for a job to end: exit 0 when it SUCCEEDED, 1 when FAILED or STOPPED", run_wait)
    p.add_argument("--timeout", type=float, default=None, metavar="S", help="give up after S seconds (exit 2)")


def _connect(args: argparse.Namespace) -> None:
    from jobs.scheduler.client import connect

    connect(args.address)


def run_submit(args: argparse.Namespace) -> int:
    import yaml

    from engine.errors import SpecError
    from jobs.kinds import KINDS, bundles, demand, resolve_paths
    from jobs.scheduler.client import call
    from jobs.spec import load_spec

    if args.max_retries < 0:
        raise SpecError(f"--max-retries {args.max_retries}: expected 0 or more")
    spec = load_spec(args.spec)  # its fields; the data are checked where the job runs
    if args.name:
        spec = spec.model_copy(update={"name": args.name})
    spec = resolve_paths(spec, Path.cwd())
    kind = KINDS[spec.kind]
    request = {
        "name": spec.name,
        "kind": spec.kind,
        "priority": args.priority,
        "max_retries": args.max_retries,
        "preemptible": kind.preemptible and not args.no_preempt,
        "demand": demand(spec),
        "bundles": bundles(spec),
        "driver": kind.driver(spec),
        "sizes": kind.sizes(spec),
        "spec": yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False),
    }
    _connect(args)
    job = call("submit", request, retry=False)
    print(job["id"])
    return 0


def _time(t: float | None) -> str:
    return datetime.fromtimestamp(t).strftime("%H:%M:%S") if t else "-"


def _demand(d: dict) -> str:
    from jobs.scheduler.admission import describe

    return describe(d).replace(" CPU", "C").replace(" GPU", "G").replace(", ", " ")


def _eta(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    m, s = divmod(int(round(seconds)), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}" if m >= 60 else f"{m}:{s:02d}"


def progress_text(p: dict | None, short: bool = False) -> str:
    """What a running job last reported (jobs/kinds/metrics.py): `step 40/120 (33%) ...`; `-` when nothing yet."""
    if not p:
        return "-"
    noun = {"steps": "step", "parts": "parts"}.get(p["unit"], p["unit"])
    head = f"{noun} {p['done']}/{p['total']} ({100 * p['fraction']:.0f}%)"
    if short:
        return f"{head} ETA {_eta(p['eta_s'])}"
    figures = [
        f"loss {p['loss']:.4g}" if p.get("loss") is not None else "",
        f"{p['cells_per_s']:,.0f} cells/s" if p.get("cells_per_s") is not None else "",
        f"data wait {100 * p['data_wait']:.0f}%" if p.get("data_wait") is not None else "",
        f"ETA {_eta(p['eta_s'])}",
        f"(attempt {p['attempt']}, reported {max(0.0, time.time() - p['updated']):.0f} s ago)",
    ]
    return "   ".join(f for f in [head, *figures] if f)


def run_list(args: argparse.Namespace) -> int:
    from jobs.scheduler.client import call

    _connect(args)
    jobs = call("list")
    if args.json:
        print(json.dumps(jobs, indent=1))
        return 0
    header = ("ID", "NAME", "KIND", "PRIO", "STATE", "DEMAND", "SUBMITTED", "STARTED", "ENDED", "ATTEMPTS", "PROGRESS")
    rows = [
        (
            j["id"],
            j["name"],
            j["kind"],
            str(j["priority"]),
            j["state"],
            _demand(j["demand"]),
            _time(j["submitted"]),
            _time(j["started"]),
            _time(j["ended"]),
            str(j["attempts"]),
            progress_text(j.get("progress"), short=True),
        )
        for j in jobs
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    return 0


def run_status(args: argparse.Namespace) -> int:
    from jobs.scheduler.client import call

    _connect(args)
    j = call("get", args.id)
    if args.json:
        print(json.dumps(j, indent=1))
        return 0
    wait = (
        (j["admitted"] or time.time()) - j["queued_since"]
        if j["state"] != "QUEUED"
        else time.time() - j["queued_since"]
    )
    print(
        f"{j['id']}  {j['name']}  ({j['kind']}, priority {j['priority']}"
        f"{', preemptible' if j['preemptible'] else ''}, max retries {j['max_retries']})"
    )
    print(
        f"state      {j['state']}"
        + (f" (Ray: {j['ray_status']})" if j["ray_status"] else "")
        + (f"  {j['message']}" if j["message"] else "")
    )
    print(f"demand     {_demand(j['demand'])}")
    if j.get("sizes"):
        now = f"{j['workers']} now" if j["workers"] else "none now"
        print(f"workers    {now}, allowed {j['sizes'][0]}-{j['sizes'][1]} (elastic; {j['resizes']} resizes)")
    print(
        f"submitted  {_time(j['submitted'])}   started {_time(j['started'])}   ended {_time(j['ended'])}"
        f"   queued {wait:.1f} s"
    )
    print(
        f"attempts   {j['attempts']} (retries {j['retries']}, preemptions {j['preemptions']})"
        + (f"  Ray jobs: {', '.join(j['ray_ids'])}" if j["ray_ids"] else "")
    )
    print(f"progress   {progress_text(j.get('progress'))}")
    print(f"spec       {j['spec_file']}")
    for e in j.get("events", []):
        print(f"  {e}")
    return 0


def run_logs(args: argparse.Namespace) -> int:
    from jobs.scheduler.client import call

    _connect(args)
    if not args.follow:
        r = call("logs", args.id, args.attempt)
        if not r["attempt"]:
            print(f"{args.id} is {r['job']['state']}: it has not run yet, no log", file=sys.stderr)
        sys.stdout.write(r["text"])
        return 0
    shown_attempt, shown = 0, 0
    while True:
        r = call("logs", args.id, None)
        if r["attempt"] != shown_attempt:
            if r["attempt"]:
                print(f"--- {args.id} attempt {r['attempt']} ---", flush=True)
            shown_attempt, shown = r["attempt"], 0
        sys.stdout.write(r["text"][shown:])
        sys.stdout.flush()
        shown = len(r["text"])
        state = r["job"]["state"]
        if state in TERMINAL:
            # one more read: lines written just before the end
            r = call("logs", args.id, None)
            sys.stdout.write(r["text"][shown:] if r["attempt"] == shown_attempt else "")
            return 0
        time.sleep(1.0)


def run_stop(args: argparse.Namespace) -> int:
    from jobs.scheduler.client import call

    _connect(args)
    j = call("stop", args.id)
    print(f"{j['id']}: {j['state'] if j['state'] in TERMINAL else 'stopping'}")
    return 0


def run_wait(args: argparse.Namespace) -> int:
    from engine.errors import SchedulerError
    from jobs.scheduler.client import call

    _connect(args)
    deadline = None if args.timeout is None else time.monotonic() + args.timeout
    while True:
        j = call("get", args.id)
        if j["state"] in TERMINAL:
            print(f"{j['id']}: {j['state']}" + (f" ({j['message']})" if j["message"] else ""))
            return 0 if j["state"] == "SUCCEEDED" else 1
        if deadline is not None and time.monotonic() > deadline:
            raise SchedulerError(f"{args.id}: still {j['state']} after {args.timeout:g} s")
        time.sleep(0.5)
