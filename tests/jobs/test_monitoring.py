"""Watching jobs run, as a user would: `cellray cluster start --prometheus` with Debian's real `prometheus` scraping
the cluster, live progress in `cellray job status/list`, and every series the README lists found through
Prometheus's HTTP API while a pretraining job (preempted and resumed) and an embed job run; every query of
jobs/grafana/cellray.json returns data. One cluster for the module (the dashboard test uses it too).
"""

from __future__ import annotations

import json
import re
import shutil
import time
import urllib.parse
import urllib.request
from pathlib import Path

import psutil
import pytest
import yaml

from tests.jobs.conftest import ROOT, running_head

pytestmark = pytest.mark.timeout(600)

STEPS, CHECKPOINT_EVERY = 200, 20


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    if shutil.which("prometheus") is None:
        pytest.skip("needs Debian's prometheus (.ci/run installs it)")
    with running_head(
        tmp_path_factory,
        "--num-cpus", "3", "--prometheus", "--scrape-interval", "1",
        "--system-config", json.dumps({"metrics_report_interval_ms": 500}),
    ) as h:  # fmt: skip
        yield h
        prometheus = h.info["prometheus_pid"]
        assert psutil.pid_exists(prometheus)
    assert not psutil.pid_exists(prometheus), "`cellray cluster stop` left Prometheus running"


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_h5ads) -> Path:
    from engine.store.ingest import IngestConfig, ingest

    out = tmp_path_factory.mktemp("mon_store") / "tiny.store"
    ingest(tiny_h5ads, out, IngestConfig(shard_cells=400, obs_keys=("cell_type", "batch"), executor="local"))
    return out


def readme_series() -> list[str]:
    """Every cellray_* series the README's "Dashboard metrics" section lists (its table's first column)."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("### Dashboard metrics") :]
    section = section[: section.index("\n### ", 5)]
    rows = [line.split("|")[1] for line in section.splitlines() if line.startswith("| `cellray_")]  # its table
    return sorted({name for row in rows for name in re.findall(r"`(cellray_[a-z_]+)`", row)})


def prom(head, path: str, **params) -> list[dict]:
    url = f"{head.info['prometheus_url']}/api/v1/{path}?{urllib.parse.urlencode(params)}"
    with urllib.request.urlopen(url, timeout=30) as r:
        body = json.loads(r.read())
    assert body["status"] == "success", body
    return body["data"]["result"]


def instant(head, query: str) -> dict[str, float]:
    """query -> {job or '' : value}."""
    return {r["metric"].get("job", ""): float(r["value"][1]) for r in prom(head, "query", query=query)}


def spec_file(head, name: str, spec: dict) -> Path:
    path = head.work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def pretrain(store: Path, output: Path) -> dict:
    """A VAE on one Ray Train worker with one reader actor (the loader's Ray mode, its gauges included)."""
    return {
        "kind": "pretrain",
        "name": output.name,
        "data": {"store": str(store), "batch_size": 64, "obs_keys": ["cell_type", "batch"], "seed": 3},
        "model": {"name": "vae", "config": {"n_latent": 4, "n_hidden": 32, "dropout": 0.0}},
        "train": {
            "max_steps": STEPS,
            "checkpoint_every": CHECKPOINT_EVERY,
            "report_every": 5,
            "output": str(output),
            "max_failures": 0,
            "keep_checkpoints": STEPS // CHECKPOINT_EVERY + 1,  # the embeds below read a checkpoint while it trains
        },
        "resources": {"workers": 1, "cpus_per_worker": 1, "readers_per_worker": 1, "cpus_per_reader": 0.5},
        "debug": {"min_step_seconds": 0.05},  # 10 s of steps at least: preempted well before the end
    }


def status_step(head, job: str) -> int | None:
    """The step `cellray job status` prints (its text, as a user reads it)."""
    m = re.search(rf"^progress   step (\d+)/{STEPS} ", head.cli.ok("job", "status", job), re.MULTILINE)
    return int(m.group(1)) if m else None


def wait_for_step(head, job: str, above: int, timeout: float = 120) -> int:
    deadline = time.monotonic() + timeout
    while (step := status_step(head, job)) is None or step <= above:
        assert time.monotonic() < deadline, head.cli.ok("job", "status", job)
        time.sleep(0.2)
    return step


def kill_driver(spec: str) -> None:
    """As the OOM killer or a lost node would: the job's driver process, by its spec file."""
    drivers = [
        p
        for p in psutil.process_iter(["cmdline"])
        if spec in " ".join(p.info["cmdline"] or []) and "jobs.cli" in " ".join(p.info["cmdline"] or [])
    ]
    assert drivers, "the job's driver process was not found"
    for p in drivers:
        p.kill()


@pytest.fixture(scope="module")
def ran(head, store, tmp_path_factory) -> dict:
    """A pretraining job, preempted by an urgent one and resumed; a job whose driver is lost and retried; an embed
    job and a `cellray run` embed of its checkpoint beside the resumed attempt. Returns what the tests check: job
    ids, and the time window they ran in."""
    from engine.train.checkpoint import latest_checkpoint

    t0 = time.time()
    out = tmp_path_factory.mktemp("mon_runs")
    train = head.submit(spec_file(head, "vae-mon", pretrain(store, out / "vae-mon")))
    head.running(train)

    # live progress, read from what the job reports: the step rises between two calls of `cellray job status`
    first = wait_for_step(head, train, 0)
    second = wait_for_step(head, train, first)
    assert second > first
    listed = head.cli.ok("job", "list")
    assert re.search(rf"^{train} .*step \d+/{STEPS} \(\d+%\) ETA ", listed, re.MULTILINE), listed
    text = head.cli.ok("job", "status", train)
    assert re.search(r"loss \d.*cells/s   data wait \d+%   ETA \d+:\d\d", text), text

    deadline = time.monotonic() + 120
    while latest_checkpoint(out / "vae-mon", required=False) is None:  # a checkpoint to resume from
        assert time.monotonic() < deadline, head.job(train)
        time.sleep(0.2)
    urgent = head.submit(head.spec("urgent", seconds=2, resources={"cpus": 3}), "--priority", "10")
    head.wait_for(train, lambda j: j["preemptions"] == 1, "was preempted", timeout=120)
    # queued behind the preempted job, in this order: a job whose driver will be lost, then an embed job of the
    # preempted job's checkpoint (it runs beside the resumed attempt once the lost job is stopped)
    fragile = head.submit(head.spec("fragile", seconds=60, resources={"cpus": 1}), "--max-retries", "1")
    # it evaluates its embedding too (`evaluate:`): the embedding-quality panels (cellray_eval_*), from a driver
    # that disconnects right after
    evaluate = {"label_key": "cell_type", "batch_key": "batch"}
    embed_spec = {"kind": "embed", "name": "embed-mon", "checkpoint": str(out / "vae-mon"), "store": str(store),
                  "out": str(out / "emb.zarr"), "part_cells": 200, "resources": {"workers": 1},
                  "evaluate": evaluate}  # fmt: skip
    embed = head.submit(spec_file(head, "embed-mon", embed_spec))
    assert head.ended(urgent)["state"] == "SUCCEEDED"
    kill_driver(head.running(fragile)["spec_file"])
    head.wait_for(fragile, lambda j: j["attempts"] == 2, "was retried")
    head.cli.ok("job", "stop", fragile)

    je = head.ended(embed)
    assert je["state"] == "SUCCEEDED", head.cli.ok("job", "logs", embed)
    assert je["progress"]["done"] == je["progress"]["total"] == 8, je["progress"]
    assert "parts 8/8 (100%)" in head.cli.ok("job", "status", embed)

    # `cellray run SPEC --address`: the same kind's run in this client's process, its series tagged by the name
    direct = {**embed_spec, "name": "embed-direct", "out": str(out / "emb-direct.zarr"), "evaluate": None}
    head.cli.ok("run", spec_file(head, "embed-direct", direct), "--address", head.info["address"])

    j = head.ended(train, timeout=300)
    assert j["state"] == "SUCCEEDED" and j["attempts"] == 2, j
    assert j["progress"]["done"] == STEPS and j["progress"]["attempt"] == 2, j["progress"]
    time.sleep(3)  # the last reports: Ray's 0.5 s report interval, then a 1 s scrape
    return {"train": train, "embed": embed, "start": t0, "end": time.time()}


def test_every_readme_series_is_in_prometheus_with_plausible_values(head, ran):
    listed = readme_series()
    assert len(listed) >= 20, listed
    window = f"[{int(time.time() - ran['start']) + 30}s]"
    missing = [
        s
        for s in listed
        if not prom(head, "query", query=f"max_over_time({{__name__=~'ray_{s}(_total|_bucket)?'}}{window})")
    ]
    assert missing == [], f"listed in the README, never seen by Prometheus: {missing}"

    def peak(series: str, job: str) -> float:
        return instant(head, f"max_over_time(ray_{series}{{job='{job}'}}{window})")[job]

    train, embed = ran["train"], ran["embed"]
    assert peak("cellray_train_step", train) == STEPS
    assert peak("cellray_job_progress", train) == 1.0 and peak("cellray_job_progress", embed) == 1.0
    assert peak("cellray_infer_parts_done", embed) == peak("cellray_infer_parts", embed) == 8
    assert peak("cellray_infer_parts_done", "embed-direct") == peak("cellray_job_progress", "embed-direct") * 8 == 8
    assert 0 < peak("cellray_eval_knn_accuracy", embed) <= 1 and peak("cellray_eval_scib_vs_baseline", embed) > 0
    assert peak("cellray_train_cells_per_s", train) > 0
    assert 0 <= peak("cellray_train_data_wait_fraction", train) <= 1
    waits = prom(  # one series per rank (each attempt's driver exports its own: max over them)
        head,
        "query",
        query=f"max by (rank) (max_over_time(ray_cellray_train_rank_data_wait_fraction{{job='{train}'}}{window}))",
    )
    assert [r["metric"]["rank"] for r in waits] == ["0"] and 0 <= float(waits[0]["value"][1]) <= 1
    queued = {
        r["metric"]["priority"]: float(r["value"][1])
        for r in prom(head, "query", query=f"max by (priority) (max_over_time(ray_cellray_queue_length{window}))")
    }
    assert queued.get("0", 0) >= 1, queued  # the preempted job waited at priority 0
    assert instant(head, "sum(ray_cellray_preemptions_total)")[""] == 1
    assert instant(head, "sum(ray_cellray_retries_total)")[""] == 1


def test_a_resumed_jobs_step_series_continues(head, ran):
    """Preempted after a checkpoint and resumed: the second attempt's steps start from that checkpoint, not 0."""
    rows = prom(
        head, "query_range", query=f"ray_cellray_train_step{{job='{ran['train']}'}}",
        start=ran["start"], end=ran["end"], step="1s",
    )  # fmt: skip
    steps = [float(v) for r in rows for _, v in sorted(r["values"])]
    assert steps and steps[-1] == STEPS
    drops = [(a, b) for a, b in zip(steps, steps[1:]) if b < a]
    assert all(a - b <= CHECKPOINT_EVERY for a, b in drops), drops  # at most the steps after the last checkpoint
    past_checkpoint = next(i for i, s in enumerate(steps) if s >= CHECKPOINT_EVERY)
    assert min(steps[past_checkpoint:]) >= CHECKPOINT_EVERY, steps  # a restart at 0 would report step 5 again


def test_every_grafana_query_returns_data(head, ran):
    board = json.loads((ROOT / "jobs" / "grafana" / "cellray.json").read_text())
    exprs = [t["expr"] for p in board["panels"] for t in p.get("targets", []) if t.get("expr")]
    assert len(exprs) >= 20
    empty = [
        e for e in exprs
        if not prom(head, "query_range", query=e, start=ran["start"], end=time.time(), step="2s")
    ]  # fmt: skip
    assert empty == [], f"panels whose query found nothing while the jobs ran: {empty}"


def test_the_dashboard_queries_this_prometheus(head):
    """The head was started with RAY_PROMETHEUS_HOST: the dashboard reports Prometheus as reachable."""
    token = (Path.home() / ".ray" / "auth_token").read_text().strip()
    req = urllib.request.Request(
        f"{head.info['dashboard_url']}/api/prometheus_health", headers={"Authorization": f"Bearer {token}"}
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        assert r.status == 200 and json.loads(r.read())["result"] is True


def test_the_dashboard_jobs_page_shows_each_attempt_with_its_cellray_metadata(head, ran, tmp_path):
    """Headless Chromium opens the Ray dashboard, passes its token login as a user would (types the token, clicks
    Submit), and finds the preempted job's second attempt on the Jobs page with its cellray id, kind, priority and
    attempt; the screenshot is kept with the test's files, and in $CELLRAY_ARTIFACTS when set (README:
    docs/dashboard-jobs.png)."""
    import asyncio
    import os

    from tests.jobs.browser import chromium

    token = os.environ.get("RAY_AUTH_TOKEN") or (Path.home() / ".ray" / "auth_token").read_text().strip()
    train, login = ran["train"], "input[placeholder='Enter your authentication token']"

    async def journey() -> tuple[str, str, Path]:
        async with chromium(f"{head.info['dashboard_url']}/#/jobs") as page:
            await page.wait_for(f'!!document.querySelector("{login}")', "the token login")
            await page.js(f'document.querySelector("{login}").focus()')
            await page.type(token)
            submit = "[...document.querySelectorAll('button')].find(b => b.textContent.trim() === 'Submit')"
            await page.js(f"{submit}.click()")
            rows = "[...document.querySelectorAll('tr')].map(r => r.innerText)"
            row = await page.wait_for(f"{rows}.find(t => t.includes('cellray-{train}-2'))", f"cellray-{train}-2")
            first = await page.js(f"{rows}.find(t => t.includes('cellray-{train}-1'))")
            return row, first, await page.screenshot(tmp_path / "dashboard-jobs.png")

    row, first, shot = asyncio.run(journey())
    assert f"{train} vae-mon (pretrain, priority 0, attempt 2)" in row and "SUCCEEDED" in row, row
    assert "Log" in row  # its driver's log, one click away
    assert f"{train} vae-mon (pretrain, priority 0, attempt 1)" in first and "STOPPED" in first, first
    assert shot.stat().st_size > 20_000  # a rendered page, not a blank one
    if os.environ.get("CELLRAY_ARTIFACTS"):  # CI keeps it (pytest's own temp dirs rotate away)
        Path(os.environ["CELLRAY_ARTIFACTS"]).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(os.environ["CELLRAY_ARTIFACTS"]) / shot.name)


def test_prometheus_missing_is_one_line_and_starts_nothing(tmp_path):
    """Without a prometheus binary on PATH, `cellray cluster start --prometheus` says how to install it, exit 2."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PATH": str(Path(sys.executable).parent), "CELLRAY_STATE_DIR": str(tmp_path)}
    r = subprocess.run(
        [sys.executable, "-m", "jobs.cli", "cluster", "start", "--prometheus"],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0, r.stderr
    assert "apt-get install prometheus" in r.stderr and not (tmp_path / "cluster.json").exists()
