"""Shared fixtures: one embedded Ray for the whole session, tiny inputs and stores in a temp dir."""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from bench.s3proxy import S3Endpoint, free_port

# Ray Train's controller polls workers; a short interval keeps 2-worker tests fast.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

# The local S3 endpoint of the `s3` fixture, in the standard AWS environment before Ray starts, so every worker
# process sees it as a user's would; and a node cache of this process's own, removed when it exits (every process
# that imports this file makes one: pytest's, each xdist worker's, a test's helper process).
CACHE_DIR = tempfile.mkdtemp(prefix="cellray-cache-")
atexit.register(shutil.rmtree, CACHE_DIR, True)
S3_BUCKET = "cellray-test"
S3_ACCESS_KEY = "cellray-test-key"
S3_SECRET = "cellray-test-secret-do-not-print"
os.environ.update(
    AWS_ENDPOINT_URL=f"http://127.0.0.1:{free_port()}",
    AWS_ACCESS_KEY_ID=S3_ACCESS_KEY,
    AWS_SECRET_ACCESS_KEY=S3_SECRET,
    AWS_REGION="us-east-1",
    AWS_ALLOW_HTTP="true",
    CELLRAY_CACHE_DIR=CACHE_DIR,
)

ROOT = Path(__file__).resolve().parents[1]  # the repository
SHARED_DATA_SCRIPT = ROOT.parent / "shared" / "data" / "fetch_real.sh"


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray with 4 logical CPUs (readers and 2 trainers must fit on 2 cores at once)."""
    import ray

    ray.init(
        address="local",
        num_cpus=4,
        include_dashboard=True,  # serves the state API Ray Train polls; bound to 127.0.0.1
        dashboard_host="127.0.0.1",
        object_store_memory=512 * 2**20,
        logging_level="WARNING",
    )
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture(scope="session")
def s3() -> S3Endpoint:
    """A real S3 endpoint on 127.0.0.1 (moto's server behind bench/s3proxy.py, which counts requests and can be
    taken down), with the bucket `cellray-test`; the AWS_* environment already points at it."""
    port = int(os.environ["AWS_ENDPOINT_URL"].rsplit(":", 1)[1])
    with S3Endpoint(port=port, access_key=S3_ACCESS_KEY, bucket=S3_BUCKET) as endpoint:
        yield endpoint


@pytest.fixture(scope="session")
def real_data_dir(tmp_path_factory) -> Path:
    """The real datasets of ../shared/data/fetch_real.sh (Kang PBMC, pbmc68k_reduced), fetched once."""
    dest = Path(os.environ.get("CELLRAY_DATA", Path.home() / ".cache" / "cellray-data"))
    if not SHARED_DATA_SCRIPT.exists():
        pytest.skip(f"{SHARED_DATA_SCRIPT} not found: real datasets unavailable on this machine")
    subprocess.run(["bash", str(SHARED_DATA_SCRIPT), str(dest)], check=True, capture_output=True)
    return dest


@pytest.fixture(scope="session")
def kang_sample(real_data_dir, tmp_path_factory):
    """A factory: `kang_sample(n, seed)` writes n random real Kang cells of each of ctrl and stim to h5ad files."""

    def make(n_per_dataset: int, seed: int) -> list[Path]:
        import anndata as ad
        import numpy as np

        d = tmp_path_factory.mktemp(f"kang_{n_per_dataset}_{seed}")
        rng = np.random.default_rng(seed)
        paths = []
        for name in ("kang_ctrl", "kang_stim"):
            a = ad.read_h5ad(real_data_dir / f"{name}.h5ad")
            a = a[np.sort(rng.choice(a.n_obs, n_per_dataset, replace=False))].copy()
            a.write_h5ad(d / f"{name}.h5ad")
            paths.append(d / f"{name}.h5ad")
        return paths

    return make


@pytest.fixture(scope="session")
def tiny_h5ads(tmp_path_factory) -> list[Path]:
    """Three small h5ad files with overlapping vocabularies and obs columns, as real inputs would have."""
    from engine.store.synthetic import synthetic_counts

    d = tmp_path_factory.mktemp("inputs")
    paths = []
    for i, (n_cells, n_genes) in enumerate([(700, 300), (450, 280), (333, 300)]):
        a = synthetic_counts(n_cells, n_genes, nnz_per_cell=40, seed=i, dataset=f"ds{i}")
        a.var_names = [f"ENSG{g + 10 * i:011d}" for g in range(n_genes)]  # shifted: partial overlap
        if i == 2:
            del a.obs["batch"]  # a column missing from one input
        p = d / f"ds{i}.h5ad"
        a.write_h5ad(p)
        paths.append(p)
    return paths


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory, tiny_h5ads, ray_local) -> Path:
    """The three tiny inputs ingested (union vocabulary, shuffled, 4+ shards)."""
    from engine.store.ingest import IngestConfig, ingest

    out = tmp_path_factory.mktemp("stores") / "tiny.store"
    ingest(tiny_h5ads, out, IngestConfig(shard_cells=400, obs_keys=("cell_type", "batch")))
    return out


@pytest.fixture(scope="session")
def multinode_drill(tiny_store, tmp_path_factory) -> dict:
    """What tests/multinode_drill.py saw on its `ray.cluster_utils.Cluster`, a head and two worker nodes (reader
    placement, then an elastic run that loses a node and gains one), run once for the tests that check it (one
    cluster start for both; their two files share an xdist worker, see `SHARED_SESSION_FIXTURE_GROUPS`)."""
    import json
    import sys

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("RAY_ADDRESS", None)
    work = tmp_path_factory.mktemp("multinode")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "multinode_drill.py"), str(tiny_store), str(work)],
        env=env, capture_output=True, text=True, timeout=850,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def listening_beyond_loopback(marker: str) -> list[str]:
    """TCP ports listened on at an address other than 127.0.0.1 by the Ray whose processes name `marker` (its temp or
    session dir) and their descendants. Ray Train's workers are left out: torch's DDP rendezvous store listens on all
    interfaces and torch has no setting for it (a training run's worker only)."""
    import psutil

    pids = set()
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(marker in a for a in p.info["cmdline"] or ()):
                pids |= {p.pid, *(c.pid for c in p.children(recursive=True))}
        except psutil.NoSuchProcess:
            continue
    found = []
    for c in psutil.net_connections(kind="tcp"):
        if c.status == psutil.CONN_LISTEN and c.pid in pids and c.laddr.ip not in ("127.0.0.1", "::ffff:127.0.0.1"):
            try:
                name = psutil.Process(c.pid).name()
            except psutil.NoSuchProcess:
                continue
            if not name.startswith("ray::RayTrainWo"):
                found.append(f"{name} (pid {c.pid}) on {c.laddr.ip}:{c.laddr.port}")
    return found


# `make test` runs the suite on 2 pytest-xdist workers (`-n 2 --dist loadfile`, scheduled by `FileGroupScheduling`): a
# file's tests run on one worker, so its module fixtures (a cluster, a trained run) start once; the files that share a
# costly session fixture share a worker; and the costliest groups start first, so neither worker is left with one at the
# end. (xdist's own `loadgroup` marks no longer reach its scheduler under pytest 9: it renames `item._nodeid`.)
SHARED_SESSION_FIXTURE_GROUPS = {
    "tests/engine/loading/test_placement.py": "multinode_drill",
    "tests/faults/test_elastic.py": "multinode_drill",
    "tests/engine/infer/": "infer",  # tests/engine/infer/conftest.py's trained checkpoints and embeddings
}
COSTLIEST_GROUPS_FIRST = [  # by their seconds in a serial run (`make test TEST_WORKERS=0 PYTEST_ARGS=--durations=0`)
    "tests/jobs/test_scheduler.py",
    "tests/engine/test_objects.py",
    "tests/jobs/test_monitoring.py",
    "multinode_drill",
    "tests/faults/test_recovery.py",
    "infer",
    "tests/engine/train/test_train.py",
]


def xdist_group_of(path: str) -> str:
    """The xdist work unit of a test file (its path relative to the repository, or its shared group)."""
    for prefix, group in SHARED_SESSION_FIXTURE_GROUPS.items():
        if path.startswith(prefix):
            return group
    return path


def pytest_collection_modifyitems(config, items):
    """The costliest groups first (a stable sort: the order within a file stays)."""
    rank = {g: i for i, g in enumerate(COSTLIEST_GROUPS_FIRST)}
    items.sort(key=lambda item: rank.get(xdist_group_of(item.path.resolve().relative_to(ROOT).as_posix()), len(rank)))


@pytest.hookimpl(optionalhook=True)  # a known hook only where pytest-xdist is installed
def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadScopeScheduling

    class FileGroupScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return xdist_group_of(nodeid.split("::", 1)[0])

    config.option.loadscopereorder = False  # keep the collection's order: costliest first
    return FileGroupScheduling(config, log)
