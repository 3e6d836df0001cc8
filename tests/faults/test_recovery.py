"""Killed processes and corrupted data, with real processes, a real Ray and real stores.

- a killed ingest leaves a temporary that the next ingest removes (saying so); two writers of one store never race;
- a killed `cellray run` reruns to the end with its whole metrics history, and the next command stops the Ray
  processes the killed one left listening, and leaves Ray's token file private (0600);
- a corrupted chunk under stats (Ray tasks) and training (Ray Train workers + reader actors) ends the run at once
  with the store error, not after retries;
- a 3-epoch soak in Ray mode: every delivered cell's values equal the store's.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from engine.errors import CellrayError, StoreError
from engine.preprocess.stats import StatsConfig, compute_stats
from engine.store.format import Store
from tests.conftest import listening_beyond_loopback
from tests.faults.conftest import chunk_files, flip_byte

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}


def cellray(*args: str, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "jobs.cli", *args],
        cwd=cwd,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def big_input(tmp_path_factory) -> Path:
    """An input whose ingest takes a few seconds: long enough to kill it half way."""
    from engine.store.synthetic import synthetic_counts

    path = tmp_path_factory.mktemp("big") / "big.h5ad"
    synthetic_counts(150_000, 2_000, nnz_per_cell=60, seed=3).write_h5ad(path)
    return path


def test_killed_ingest_leaves_a_temporary_the_next_ingest_removes(big_input, tmp_path):
    out = tmp_path / "s.store"
    args = ("ingest", str(big_input), "--out", str(out), "--shard-size", "20000", "--executor", "local")
    proc = cellray(*args, cwd=tmp_path)
    wait_for(lambda: list(tmp_path.glob(".s.store.tmp-*/shards")) or proc.poll() is not None, 120, "the temporary")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    debris = list(tmp_path.glob(".s.store.tmp-*"))
    assert debris and not out.exists()  # what a kill -9 leaves
    rerun = cellray(*args, cwd=tmp_path)
    _, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err
    assert "no longer running" in err and str(debris[0].name) in err
    assert not list(tmp_path.glob(".s.store*")) and Store.open(out).n_cells == 150_000


def test_a_second_writer_of_one_store_fails_at_once(big_input, tmp_path):
    out = tmp_path / "s.store"
    first = cellray("ingest", str(big_input), "--out", str(out), "--executor", "local", cwd=tmp_path)
    wait_for(lambda: (tmp_path / ".s.store.lock").exists(), 60, "the first writer's lock")
    second = cellray("ingest", str(big_input), "--out", str(out), "--overwrite", "--executor", "local", cwd=tmp_path)
    _, err = second.communicate(timeout=120)
    assert second.returncode == 2 and "another cellray process" in err and f"pid {first.pid}" in err, err
    assert first.wait(timeout=300) == 0
    assert Store.open(out).n_cells == 150_000 and not (tmp_path / ".s.store.lock").exists()


def ray_processes(session_dir: str) -> list[int]:
    import psutil

    found = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any(session_dir in a for a in p.info["cmdline"] or ()):
                found.append(p.info["pid"])
        except psutil.NoSuchProcess:
            continue
    return found


@pytest.mark.timeout(900)
def test_killed_run_resumes_with_its_whole_history(tiny_store, tmp_path, ray_local):
    """ray_local: another Ray on this machine, as when two users' runs share it."""
    spec = {
        "kind": "pretrain",
        "name": "killed",
        "data": {"store": str(tiny_store), "batch_size": 64},
        "model": {"name": "vae", "config": {"n_latent": 4, "n_hidden": 16}},
        "train": {"max_steps": 20, "checkpoint_every": 5, "report_every": 5, "output": str(tmp_path / "run")},
        "resources": {"workers": 1, "cpus_per_worker": 0.5, "readers_per_worker": 0},
        "debug": {"min_step_seconds": 0.4},  # 8 s of steps: the kill lands mid-run however fast the machine
    }
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    metrics = tmp_path / "run" / "metrics.jsonl"

    def steps() -> list[int]:
        return [json.loads(line)["step"] for line in metrics.read_text().splitlines()] if metrics.exists() else []

    proc = cellray("run", "spec.yaml", cwd=tmp_path)
    wait_for(lambda: len(steps()) >= 2 or proc.poll() is not None, 240, "two reports")
    records = list((Path.home() / ".cache/cellray/embedded-ray").glob(f"{proc.pid}.json"))
    assert records, "the embedded Ray's session was not recorded"
    session = json.loads(records[0].read_text())["session_dir"]
    assert listening_beyond_loopback(session) == []  # the embedded Ray serves this machine only
    os.kill(proc.pid, signal.SIGKILL)  # the driver alone, as `kill -9 PID` does: its Ray processes live on
    proc.wait()
    seen = steps()
    assert 10 <= seen[-1] < 20
    token = Path.home() / ".ray" / "auth_token"
    token.chmod(0o644)  # as Ray writes it: readable by everyone
    rerun = cellray("run", "spec.yaml", cwd=tmp_path)
    out, err = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, err
    assert "Traceback" not in err and "multiple active Ray instances" not in err, err  # Ray Train's state polls
    assert "PreemptionWatcher" not in err, err  # Ray Train's controller's benign C++ ERROR line is not streamed here
    assert token.stat().st_mode & 0o077 == 0, "an embedded run leaves the token file private (0600)"
    assert steps() == list(range(5, 21, 5)), steps()  # step 5 to the end: the first attempt's steps are kept
    assert "20 steps" in out
    assert ray_processes(session) == []  # the killed command's Ray no longer runs


def test_corrupted_chunk_under_stats_on_ray_tasks(fresh_store, ray_local):
    flip_byte(chunk_files(fresh_store, 2, "data")[0])
    with pytest.raises(StoreError, match=r"shards/00002/X/data"):
        compute_stats(fresh_store, StatsConfig(executor="ray"))


def test_corrupted_chunk_under_training_fails_at_once(fresh_store, ray_local, tmp_path, capfd):
    from engine.train.driver import pretrain
    from jobs.spec import parse_spec

    chunk_files(fresh_store, 1, "indices")[0].unlink()
    config = parse_spec({
        "kind": "pretrain",
        "name": "corrupt",
        "data": {"store": str(fresh_store), "batch_size": 64},
        "model": {"name": "vae", "config": {"n_latent": 4, "n_hidden": 16}},
        "train": {"max_steps": 50, "output": str(tmp_path / "run"), "max_failures": 3},
        # one worker: its reader actor meets the missing chunk within the first epoch
        "resources": {"workers": 1, "cpus_per_worker": 0.5, "readers_per_worker": 1, "cpus_per_reader": 0.5},
    })  # fmt: skip
    t0 = time.monotonic()
    with pytest.raises(CellrayError, match=r"shards/00001/X/indices") as e:
        pretrain(config)
    assert "attempt" not in str(e.value)  # the data error itself, not "failed after 4 attempts"
    assert time.monotonic() - t0 < 120
    # the worker's traceback is kept in the run's log, not streamed to this terminal (Ray's log monitor prints a
    # worker's stderr here within a second or so)
    time.sleep(2)
    logged = (tmp_path / "run" / "worker-errors.log").read_text()
    assert "Traceback" in logged and "shards/00001/X/indices" in logged
    shown = capfd.readouterr()
    assert "Error in training function" not in shown.out + shown.err


def test_soak_three_epochs_in_ray_mode_every_cell_matches_the_store(tiny_store, ray_local):
    from engine.loading.loader import Loader
    from engine.loading.readers import ReadOptions
    from engine.loading.sampler import SamplerConfig

    store = Store.open(tiny_store)
    expected = {}
    for shard in range(store.n_shards):
        block = store.read_csr(shard)
        first = int(store.cell_offsets[shard])
        for i in range(block.n_cells):
            a, b = block.indptr[i], block.indptr[i + 1]
            expected[first + i] = row_hash(block.indices[a:b], block.data[a:b])
    checked = 0
    plan = SamplerConfig(batch_size=50, remainder="pad")
    with Loader(tiny_store, plan, mode="ray", output="csr", reading=ReadOptions(readers=2)) as loader:
        for epoch in range(3):
            loader.set_epoch(epoch)
            seen = set()
            for batch in loader:
                x = batch["X"]
                indptr, indices, values = (t.numpy() for t in (x.crow_indices(), x.col_indices(), x.values()))
                for row, cell in enumerate(batch["index"].tolist()):
                    a, b = indptr[row], indptr[row + 1]
                    assert row_hash(indices[a:b], values[a:b]) == expected[cell], f"cell {cell}, epoch {epoch}"
                    seen.add(cell)
                    checked += 1
            assert seen == set(expected)  # every cell, every epoch
    assert checked >= 3 * store.n_cells


def row_hash(indices: np.ndarray, values: np.ndarray) -> str:
    return hashlib.sha1(np.asarray(indices, np.int64).tobytes() + np.asarray(values, np.float64).tobytes()).hexdigest()


def test_embedded_ray_refuses_to_start_without_token_auth(tiny_store, tmp_path):
    env = {**ENV, "RAY_AUTH_MODE": "disabled"}
    proc = subprocess.run(
        [sys.executable, "-m", "jobs.cli", "stats", str(tiny_store), "--executor", "ray"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(lines) == 1 and "--insecure" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_checkpoints_keep_every_report_since_the_previous_one(tiny_store, ray_local, tmp_path):
    """What a rerun takes from the checkpoints when its killed driver wrote metrics.jsonl last before the final
    reports: every step's report (issue 23: a killed and resumed run's metrics.jsonl missed a step)."""
    from engine.train.checkpoint import checkpoint_metrics
    from engine.train.driver import pretrain
    from jobs.spec import parse_spec

    config = parse_spec({
        "kind": "pretrain",
        "name": "reports",
        "data": {"store": str(tiny_store), "batch_size": 64},
        "model": {"name": "vae", "config": {"n_latent": 4, "n_hidden": 16}},
        "train": {"max_steps": 7, "checkpoint_every": 3, "report_every": 1, "keep_checkpoints": 5,
                  "output": str(tmp_path / "run")},
        "resources": {"workers": 0},
    })  # fmt: skip
    result = pretrain(config)
    assert [m["step"] for m in result.history] == list(range(1, 8))
    kept = sorted({m["step"] for m in checkpoint_metrics(result.output)})
    assert kept == list(range(1, 8)), kept  # checkpoints at 3, 6, 7 hold the reports of 1-3, 4-6, 7
