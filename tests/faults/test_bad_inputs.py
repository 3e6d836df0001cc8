"""Bad inputs, as a new user would try them: each ends in one line per problem on stderr (`error: ...`), exit
status 2, no Python traceback, and nothing left behind (no output, no temporary, no lock)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import yaml

from jobs.cli import main
from tests.faults.conftest import chunk_files, flip_byte


def h5ad(d: Path, name: str, X, var=None, obs=None) -> Path:
    n, g = X.shape
    a = ad.AnnData(
        X=X,
        obs=pd.DataFrame(index=obs or [f"c{i}" for i in range(n)]),
        var=pd.DataFrame(index=var or [f"G{i}" for i in range(g)]),
    )
    a.write_h5ad(d / name)
    return d / name


def counts(n=30, g=8, seed=0):
    X = sp.random(n, g, density=0.5, format="csr", random_state=seed, dtype=np.float32)
    X.data = np.ceil(X.data * 5)
    return X


def with_value(value):
    X = counts()
    X.data[3] = value
    return X


def spec(store: str, **edits) -> dict:
    d = {
        "kind": "pretrain",
        "name": "bad",
        "data": {"store": store, "batch_size": 32, "obs_keys": ["cell_type"]},
        "model": {"name": "vae", "config": {"n_latent": 4}},
        "train": {"max_steps": 3, "output": "runs/never"},
        "resources": {"workers": 1, "cpus_per_worker": 0.5},
    }
    for path, value in edits.items():
        *parents, last = path.split(".")
        node = d
        for p in parents:
            node = node[p]
        node[last] = value
    return d


# Each case: (name, setup(d, store) -> argv, expected words in the message). `d` is an empty work folder, `store`
# a private copy of a small real store (tiny_store). Commands run in-process: main(argv) is the `cellray` CLI.
def ingest(*inputs, extra=()):
    return lambda d, store: ["ingest", *[str(p(d)) for p in inputs], "--out", str(d / "out.store"), *extra]


def good(d):
    return h5ad(d, "good.h5ad", counts())


def write_spec(d, raw) -> Path:
    (d / "spec.yaml").write_text(yaml.safe_dump(raw) if not isinstance(raw, str) else raw)
    return d / "spec.yaml"


def corrupt(action):
    def setup(d, store):
        action(store)
        return ["stats", str(store), "--executor", "local"]

    return setup


def manifest_cells(store: Path, n: int) -> None:
    meta = json.loads((store / "zarr.json").read_text())
    meta["attributes"]["cellray"]["n_cells"] = n
    (store / "zarr.json").write_text(json.dumps(meta))


def manifest_version(store: Path, v) -> None:
    meta = json.loads((store / "zarr.json").read_text())
    meta["attributes"]["cellray"]["version"] = v
    (store / "zarr.json").write_text(json.dumps(meta))


CASES = [
    # ingest: inputs
    ("missing input", ingest(lambda d: d / "absent.h5ad"), "no such file"),
    ("text file as input", ingest(lambda d: (d / "x.h5ad").write_text("hello") and d / "x.h5ad"), "cannot be read"),
    (
        "truncated h5ad",
        ingest(lambda d: (d / "t.h5ad").write_bytes(good(d).read_bytes()[:3000]) and d / "t.h5ad"),
        "cannot be read",
    ),
    ("non-integer counts", ingest(lambda d: h5ad(d, "b.h5ad", with_value(2.5))), "non-integer"),
    ("negative counts", ingest(lambda d: h5ad(d, "b.h5ad", with_value(-1.0))), "negative"),
    ("NaN counts", ingest(lambda d: h5ad(d, "b.h5ad", with_value(np.nan))), "NaN"),
    ("inf counts", ingest(lambda d: h5ad(d, "b.h5ad", with_value(np.inf))), "inf"),
    (
        "duplicate genes",
        ingest(lambda d: h5ad(d, "b.h5ad", counts(), var=["G0"] * 2 + [f"G{i}" for i in range(2, 8)])),
        "duplicate",
    ),
    ("duplicate cell names", ingest(lambda d: h5ad(d, "b.h5ad", counts(), obs=["c0"] * 30)), "duplicate"),
    ("missing layer", ingest(good, extra=("--layer", "counts")), "layers/counts"),
    (
        "vocabulary without overlap",
        lambda d, s: [
            "ingest",
            str(good(d)),
            "--out",
            str(d / "out.store"),
            "--vocab",
            str((d / "v.txt").write_text("X1\nX2\n") and d / "v.txt"),
        ],
        "none of",
    ),
    (
        "empty intersection",
        ingest(
            good,
            lambda d: h5ad(d, "o.h5ad", counts(), var=[f"Z{i}" for i in range(8)]),
            extra=("--vocab", "intersection"),
        ),
        "intersection",
    ),
    ("shard size 0", ingest(good, extra=("--shard-size", "0")), "--shard-size"),
    ("shard size -5", ingest(good, extra=("--shard-size=-5",)), "--shard-size"),
    ("shard size -5MB", ingest(good, extra=("--shard-size=-5MB",)), "--shard-size"),
    ("shard size 1B", ingest(good, extra=("--shard-size", "1B")), "--shard-size"),
    ("shard size unit", ingest(good, extra=("--shard-size", "12XB")), "--shard-size"),
    ("shard size fraction of a cell", ingest(good, extra=("--shard-size", "1.5")), "--shard-size"),
    ("obs key no input has", ingest(good, extra=("--obs", "donor")), "donor"),
    ("reserved obs key", ingest(good, extra=("--obs", "dataset")), "added by cellray"),
    ("output exists", lambda d, s: ["ingest", str(good(d)), "--out", str(s)], "already exists"),
    (
        "overwrite a non-store",
        lambda d, s: ["ingest", str(good(d)), "--out", str((d / "mine").mkdir() or d / "mine"), "--overwrite"],
        "not a cellray store",
    ),
    (
        "output under a file",
        lambda d, s: ["ingest", str(good(d)), "--out", str(good(d) / "x.store")],
        "is not a directory",
    ),
    (
        "zero-cell input only",
        ingest(lambda d: h5ad(d, "z.h5ad", sp.csr_matrix((0, 8), dtype=np.float32))),
        "zero cells",
    ),
    # reading stores
    ("info of a missing store", lambda d, s: ["info", str(d / "absent.store")], "no such store"),
    ("info of a plain folder", lambda d, s: ["info", str((d / "f").mkdir() or d / "f")], "not a zarr"),
    ("store of a future version", lambda d, s: manifest_version(s, 99) or ["info", str(s)], "'version' is 99"),
    ("manifest disagrees with shards", lambda d, s: manifest_cells(s, 5) or ["info", str(s)], "shards hold"),
    ("stats: missing chunk", corrupt(lambda s: chunk_files(s)[0].unlink()), "missing"),
    ("stats: flipped bits", corrupt(lambda s: flip_byte(chunk_files(s, 2, "indices")[0])), "corrupt"),
    (
        "stats: truncated shard file",
        corrupt(lambda s: chunk_files(s, 0)[0].write_bytes(chunk_files(s, 0)[0].read_bytes()[:50])),
        "shards/00000/X/data",
    ),
    ("stats: deleted indptr", corrupt(lambda s: shutil.rmtree(s / "shards/00003/X/indptr")), "shards/00003/X"),
    ("stats: --hvg 0", lambda d, s: ["stats", str(s), "--hvg", "0", "--executor", "local"], "--hvg"),
    ("stats: unknown batch key", lambda d, s: ["stats", str(s), "--batch-key", "nope", "--executor", "local"], "nope"),
    (
        "stats: export suffix",
        lambda d, s: ["stats", str(s), "--export", str(d / "g.txt"), "--executor", "local"],
        ".csv or .parquet",
    ),
    # job specs (`cellray run SPEC --check` validates the spec against its store; starts nothing)
    ("missing spec", lambda d, s: ["run", str(d / "absent.yaml"), "--check"], "no such job spec"),
    ("invalid YAML", lambda d, s: ["run", str(write_spec(d, "kind: [pretrain\n")), "--check"], "not valid YAML"),
    ("unknown kind", lambda d, s: ["run", str(write_spec(d, spec(str(s), kind="finetune"))), "--check"], "kind"),
    (
        "unknown model",
        lambda d, s: ["run", str(write_spec(d, spec(str(s), **{"model.name": "gpt9"}))), "--check"],
        "unknown model",
    ),
    (
        "boolean step count",
        lambda d, s: ["run", str(write_spec(d, spec(str(s), **{"train.max_steps": True}))), "--check"],
        "max_steps",
    ),
    (
        "unknown field",
        lambda d, s: ["run", str(write_spec(d, spec(str(s), **{"train.max_stesp": 3}))), "--check"],
        "max_stesp",
    ),
    (
        "batch larger than a rank's share",
        lambda d, s: ["run", str(write_spec(d, spec(str(s), **{"data.batch_size": 5000}))), "--check"],
        "share of the training",
    ),
    (
        "obs key the store lacks",
        lambda d, s: ["run", str(write_spec(d, spec(str(s), **{"data.obs_keys": ["donor"]}))), "--check"],
        "donor",
    ),
    (
        "unknown transform",
        lambda d, s: ["run", str(write_spec(d, spec(str(s), **{"data.transforms": ["normalise_total"]}))), "--check"],
        "normalise_total",
    ),
    (
        "store missing in spec",
        lambda d, s: ["run", str(write_spec(d, spec(str(d / "absent.store")))), "--check"],
        "no such store",
    ),
    (
        "val fraction 1",
        lambda d, s: ["run", str(write_spec(d, spec(str(s), **{"data.val_fraction": 1.0}))), "--check"],
        "val_fraction",
    ),
    # inference
    (
        "embed without a checkpoint",
        lambda d, s: ["embed", "--checkpoint", str(d), "--store", str(s), "--out", str(d / "e.h5ad")],
        "no checkpoint",
    ),
]


@pytest.mark.parametrize("setup, expect", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_one_line_exit_2_nothing_left(setup, expect, fresh_store, tmp_path, capsys, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    argv = setup(work, fresh_store)
    before = {p.name for p in work.iterdir()}
    store_before = sorted(p.name for p in fresh_store.parent.iterdir())
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith(("INFO", "WARNING"))]
    assert lines and all(line.startswith("error: ") for line in lines), err
    assert "Traceback" not in err
    assert expect in err, err
    left = {p.name for p in work.iterdir()} - before
    assert not left, f"left behind: {left}"
    assert sorted(p.name for p in fresh_store.parent.iterdir()) == store_before  # no temporary beside the store


def test_the_table_is_large():
    assert len(CASES) >= 40
