"""Stores, outputs and checkpoints in a bucket, on a real S3 endpoint on 127.0.0.1 (moto's server behind
bench/s3proxy.py, which counts requests from the server's side and can be taken down)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from engine import objects
from engine.errors import CellrayError
from engine.loading.loader import Loader
from engine.loading.sampler import SamplerConfig
from engine.objects import location
from engine.store.format import Store
from engine.store.ingest import IngestConfig, ingest
from jobs.cli import main

BUCKET = "s3://cellray-test"  # the `s3` fixture's bucket (tests/conftest.py)
S3_SECRET = os.environ["AWS_SECRET_ACCESS_KEY"]
TINY = IngestConfig(shard_cells=400, obs_keys=("cell_type", "batch"))  # as the session's tiny_store
REPO = Path(__file__).resolve().parents[2]


def pretrain_spec(store: str, output: str, workers: int = 2) -> dict:
    """A probe of cell_type on a global batch: the same steps whatever the number of workers (the probe draws no
    random numbers)."""
    return {
        "kind": "pretrain",
        "name": "bucket-run",
        "data": {"store": store, "global_batch_size": 64, "obs_keys": ["cell_type"]},
        "model": {"name": "probe", "config": {"label_key": "cell_type", "n_hidden": 16}},
        "train": {"max_steps": 6, "lr": 1e-2, "checkpoint_every": 3, "report_every": 3, "output": output},
        "resources": {"workers": workers, "cpus_per_worker": 0.5, "readers_per_worker": 1, "cpus_per_reader": 0.5},
    }


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and S3_SECRET not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


def test_chain_in_a_bucket_equals_the_chain_on_disk(s3, tiny_store, tiny_h5ads, ray_local, tmp_path, capsys):
    """ingest -> verify -> stats -> 2-worker pretraining -> embed on s3:// gives what the same chain on disk gives
    (its pretraining in-process)."""
    from engine.infer.embed import embed
    from engine.preprocess.stats import compute_stats, load_stats
    from engine.store.format import open_group
    from engine.train.checkpoint import load_checkpoint
    from engine.train.driver import pretrain
    from jobs.spec import parse_spec

    uri = f"{BUCKET}/chain/tiny.store"
    args = [str(p) for p in tiny_h5ads] + ["--out", uri, "--obs", "cell_type,batch", "--shard-size", "400"]
    assert main(["ingest", *args]) == 0
    local, remote = Store.open(shutil.copytree(tiny_store, tmp_path / "tiny.store")), Store.open(uri)
    assert [s.checksum for s in remote.manifest.shards] == [s.checksum for s in local.manifest.shards]
    assert remote.gene_ids.equals(local.gene_ids) and remote.read_obs(1).equals(local.read_obs(1))
    assert main(["verify", uri]) == 0 and "OK" in capsys.readouterr().out
    from engine.store.lazy import gene_sums, open_anndata

    lazy = open_anndata(uri)
    assert (lazy.obs_names == open_anndata(local).obs_names).all()
    np.testing.assert_array_equal(gene_sums(lazy.X), gene_sums(open_anndata(local).X))

    compute_stats(uri), compute_stats(local)
    assert objects.exists(location(uri) / "stats" / "zarr.json")
    assert load_stats(uri).genes.equals(load_stats(local).genes)

    # in the bucket: 2 DDP workers with a reader actor each; on disk: the same spec in-process (they differ only in the
    # order of float32 reductions: the multi-node drill's bound)
    bucket_run = pretrain(parse_spec(pretrain_spec(uri, f"{BUCKET}/runs/r", workers=2)))
    pretrain(parse_spec(pretrain_spec(str(local.path), str(tmp_path / "run"), workers=0)))
    assert objects.exists(location(f"{BUCKET}/runs/r") / "metrics.jsonl") and bucket_run.final["step"] == 6
    disk_model, _ = load_checkpoint(tmp_path / "run")
    bucket_model, meta = load_checkpoint(f"{BUCKET}/runs/r")  # downloaded into the node's cache
    assert meta["step"] == 6 and meta["world_size"] == 2
    for a, b in zip(disk_model.state_dict().values(), bucket_model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4)

    embed(tmp_path / "run", local.path, tmp_path / "emb.zarr")
    embed(f"{BUCKET}/runs/r", uri, f"{BUCKET}/out/emb.zarr", num_actors=2)
    import anndata as ad

    on_disk = ad.read_zarr(tmp_path / "emb.zarr")
    in_bucket = ad.io.read_elem(open_group(location(f"{BUCKET}/out/emb.zarr")))
    assert (in_bucket.obs_names == on_disk.obs_names).all()
    np.testing.assert_allclose(in_bucket.obsm["X_cellray"], on_disk.obsm["X_cellray"], atol=1e-4)
    left = [o.name for o in objects.list_objects(location(f"{BUCKET}/out/emb.zarr"))]
    assert "zarr.json" in left and objects.WRITING_MARKER not in left and objects.LOCK_NAME not in left


@pytest.fixture(scope="module")
def bucket_store(s3, tiny_h5ads) -> str:
    uri = f"{BUCKET}/stores/tiny.store"
    ingest(tiny_h5ads, uri, TINY.model_copy(update={"overwrite": True}))
    return uri


def _epoch(store: str, **kw) -> list[int]:
    with Loader(store, SamplerConfig(batch_size=50, block_size=32, buffer_blocks=2), mode="local", **kw) as loader:
        return [int(i) for b in loader for i in b["index"]]


def test_cache_serves_epoch_two(s3, bucket_store, tiny_store, monkeypatch, tmp_path):
    monkeypatch.setenv("CELLRAY_CACHE_DIR", str(tmp_path / "cache"))
    s3.reset_counts()
    with Loader(bucket_store, SamplerConfig(batch_size=50, block_size=32, buffer_blocks=2), mode="local") as loader:
        first = [int(i) for b in loader for i in b["index"]]
        fetched = s3.counts["range_get"]
        s3.reset_counts()
        second = [int(i) for b in loader for i in b["index"]]
    with Loader(tiny_store, SamplerConfig(batch_size=50, block_size=32, buffer_blocks=2), mode="local") as loader:
        on_disk = [[int(i) for b in loader for i in b["index"]] for _ in range(2)]
    assert [first, second] == on_disk and first != second  # the same two epochs as from local disk
    assert fetched > 0 and s3.counts["GET"] == 0, dict(s3.counts)  # epoch 2 read local disk only
    # a new loader (another process would do the same) reads the cached bytes too, each chunk still checked
    s3.reset_counts()
    assert _epoch(bucket_store) == on_disk[0] and s3.counts["range_get"] == 0


def test_outage_mid_epoch_delivers_every_cell_once(s3, monkeypatch, tmp_path):
    """Shard files of several MB (many cache slots): the buffers after the outage's start go to the endpoint."""
    from engine.store.synthetic import synthetic_counts

    synthetic_counts(12_000, 1_000, nnz_per_cell=120, seed=3).write_h5ad(tmp_path / "wide.h5ad")
    local = ingest([tmp_path / "wide.h5ad"], tmp_path / "wide.store", IngestConfig(shard_cells=4000)).store
    uri = ingest([tmp_path / "wide.h5ad"], f"{BUCKET}/stores/wide.store", IngestConfig(shard_cells=4000)).store.path
    monkeypatch.setenv("CELLRAY_CACHE_DIR", str(tmp_path / "cache"))  # cold: every buffer goes to the endpoint
    s3.reset_counts()
    seen: list[int] = []
    with Loader(str(uri), SamplerConfig(batch_size=50, block_size=32, buffer_blocks=2), mode="local") as loader:
        for i, batch in enumerate(loader):
            seen += [int(j) for j in batch["index"]]
            if i == 2:  # the endpoint goes away for 2.5 s while the readers fetch the next buffers
                outage = threading.Thread(target=lambda: _down_for(s3, 2.5))
                outage.start()
        outage.join()
    assert s3.counts["refused"] > 0, "the outage never hit a request"
    assert seen == _epoch(local.path) and len(set(seen)) == len(seen)  # the epoch of local disk, each cell once


def _down_for(s3, seconds: float) -> None:
    with s3.outage():
        time.sleep(seconds)


@pytest.fixture(scope="module")
def small_checkpoint(tiny_store, ray_local, tmp_path_factory) -> Path:
    """A probe trained in-process for a few steps on the tiny store (the bucket stores share its vocabulary)."""
    from engine.train.driver import pretrain
    from jobs.spec import parse_spec

    spec = pretrain_spec(str(tiny_store), str(tmp_path_factory.mktemp("ckpt") / "probe"), workers=0)
    spec["train"]["max_steps"] = 3
    return pretrain(parse_spec(spec)).output


def test_corrupted_object_is_one_line_error_everywhere(s3, tiny_h5ads, small_checkpoint, tmp_path, capsys):
    uri = f"{BUCKET}/stores/corrupt.store"
    store = ingest(tiny_h5ads, uri, TINY.model_copy(update={"overwrite": True})).store
    obj = location(uri) / store.manifest.shards[1].path / "X" / "data" / "c" / "0"
    raw = bytearray(objects.read_bytes(obj))
    raw[40] ^= 0xFF  # inside the first chunk's bytes: its crc32c no longer matches
    objects.write_bytes(obj, bytes(raw))
    want = f"{uri}/shards/00001/X/data: chunk 0 (file c/0) fails its crc32c checksum"
    assert main(["stats", uri]) == 2 and want in one_line_error(capsys)
    assert main(["verify", uri]) == 1 and want in capsys.readouterr().err
    spec = tmp_path / "spec.yaml"
    import yaml

    spec.write_text(yaml.safe_dump(pretrain_spec(uri, str(tmp_path / "run"), workers=0)))
    assert main(["run", str(spec)]) == 2 and want in one_line_error(capsys)
    out = f"{BUCKET}/out/corrupt.zarr"
    assert main(["embed", "--checkpoint", str(small_checkpoint), "--store", uri, "--out", out]) == 2
    assert want in one_line_error(capsys)
    assert not objects.exists(location(out) / "zarr.json")  # nothing committed


def test_interrupted_ingest_is_cleaned_by_the_next_and_a_live_writer_refused(s3, tiny_h5ads, tmp_path, caplog):
    """A writer killed mid-upload leaves shards and its lock: a second writer is refused while the lock's lease
    runs, then takes over, removes what the dead one left (with a line) and commits a store with nothing stray."""
    uri = f"{BUCKET}/stores/interrupted.store"
    env = {**os.environ, "PYTHONPATH": str(REPO), "CELLRAY_LOCK_LEASE_S": "3"}
    cmd = [sys.executable, "-m", "jobs.cli", "ingest", *map(str, tiny_h5ads), "--out", uri, "--shard-size", "60"]
    s3.reset_counts()
    writer = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not any("/shards/" in p for p in s3.puts) and time.time() < deadline and writer.poll() is None:
        time.sleep(0.05)
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    assert any("/shards/" in p for p in s3.puts), writer.stderr.read().decode()[-2000:]
    assert objects.exists(location(uri) / objects.WRITING_MARKER)
    with pytest.raises(CellrayError, match="another cellray process .* is writing it"):
        ingest(tiny_h5ads, uri, TINY)
    with pytest.raises(CellrayError, match="no such store"):  # readers never see the half-written store
        Store.open(uri)
    os.environ["CELLRAY_LOCK_LEASE_S"] = "3"
    try:
        time.sleep(3.5)
        with caplog.at_level("WARNING"):
            store = ingest(tiny_h5ads, uri, TINY).store
    finally:
        del os.environ["CELLRAY_LOCK_LEASE_S"]
    assert "left by an interrupted writer" in caplog.text and "took over the lock" in caplog.text
    listed = {str(o) for o in objects.list_objects(location(uri))}
    shards = {s.path for s in store.manifest.shards} | {"shards/zarr.json"}
    stray = [k for k in listed if "/shards/" in k and "shards/" + k.split("/shards/")[1].split("/")[0] not in shards]
    assert not stray and not any(objects.WRITING_MARKER in k or objects.LOCK_NAME in k for k in listed)
    assert store.n_cells == sum(s.n_cells for s in store.manifest.shards) == 1483


def test_uris_cellray_cannot_serve_and_bad_credentials_are_one_line(s3, bucket_store, tmp_path, monkeypatch, capsys):
    h5ad = tmp_path / "x.h5ad"
    assert main(["synth", "--out", str(h5ad), "--cells", "50", "--genes", "20"]) == 0
    capsys.readouterr()
    cases = {
        ("ingest", str(h5ad), "--out", "ftp://host/x.store"): "URI scheme 'ftp://' is not supported",
        ("ingest", str(h5ad), "--out", "s3:/cellray-test/x.store"): "malformed URI",
        ("ingest", f"{BUCKET}/x.h5ad", "--out", f"{BUCKET}/y.store"): "inputs are read from local files",
        ("info", f"{BUCKET}/no/such.store"): "no such store",
        ("info", "s3://no-such-bucket/x.store"): "bucket 'no-such-bucket' does not exist",
        ("verify", "hdfs://nn/x.store"): "URI scheme 'hdfs://' is not supported",
        ("stats", f"{BUCKET}/stores/tiny.store", "--export", f"{BUCKET}/t.csv"): "written to a local file",
    }
    for args, want in cases.items():
        assert main(list(args)) == 2, args
        assert want in one_line_error(capsys), args
    assert not Path("ftp:").exists() and not Path("s3:").exists()  # nothing written as a local directory
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "someone-else")
    objects.reset_clients()
    try:
        assert main(["info", bucket_store]) == 2
        assert "access denied" in one_line_error(capsys)
    finally:
        monkeypatch.undo()
        objects.reset_clients()


def test_endpoint_down_fails_in_one_line_after_bounded_retries(s3, bucket_store, monkeypatch, capsys):
    from bench.s3proxy import free_port

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    monkeypatch.setenv("CELLRAY_OBJECT_RETRIES", "2")
    monkeypatch.setenv("CELLRAY_OBJECT_RETRY_TIMEOUT_S", "3")
    objects.reset_clients()
    try:
        t0 = time.time()
        assert main(["info", bucket_store]) == 2
        line = one_line_error(capsys)
        assert "object storage request failed after retries" in line and "zarr.json" in line
        assert time.time() - t0 < 30
    finally:
        monkeypatch.undo()
        objects.reset_clients()


def test_scheduler_state_and_specs_in_a_bucket(s3):
    """A queue kept in a bucket (no shared filesystem): records and specs round-trip, and a spec is loaded from its
    URI as a job's `cellray run` does."""
    from jobs.scheduler.state import JobRecord, StateStore
    from jobs.spec import load_spec

    store = StateStore(f"{BUCKET}/cellray/scheduler")
    assert store.load() == ({}, 1)
    spec_uri = store.write_spec("j0001", "kind: sleep\nname: nap\nseconds: 1\n")
    assert spec_uri == f"{BUCKET}/cellray/scheduler/specs/j0001.yaml"
    job = JobRecord(id="j0001", seq=1, name="nap", kind="sleep", priority=0, preemptible=True, max_retries=0,
                    demand={"CPU": 1.0}, driver={"CPU": 1.0}, spec_file=spec_uri)  # fmt: skip
    store.save({"j0001": job}, 2)
    jobs, next_seq = StateStore(f"{BUCKET}/cellray/scheduler").load()
    assert next_seq == 2 and jobs["j0001"].to_dict() == job.to_dict()
    assert load_spec(spec_uri).name == "nap"
    with pytest.raises(CellrayError, match="no such job spec"):
        load_spec(f"{BUCKET}/cellray/scheduler/specs/j9999.yaml")
