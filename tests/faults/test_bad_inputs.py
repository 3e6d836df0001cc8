"""Bad inputs, as a new user would try them: each ends in one line per problem on stderr (`error: ...`), exit
status 2, no Python traceback, and nothing left behind (no output, no temporary, no lock)."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import yaml

from engine.errors import StoreError
from engine.store.ingest import IngestConfig
from engine.store.ingest import ingest as ingest_store
from engine.store.lazy import gene_sums, open_anndata
from jobs.cli import main
from tests.faults.conftest import chunk_files, flip_byte, swap_chunks


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


# ---------------------------------------------------------------------------------------------- round two (issue 23)
# Damage to every part of a store: obs and var (checked against the manifest's checksums, format v3) and chunks
# moved from their place (each chunk's own crc32c still valid). The store is `chunky_store`: 1,024-value chunks, so a
# shard file holds several. Each damage: (name, action(store), words every error about it holds, what reads it).


def garbage(path: Path) -> None:
    path.write_bytes(np.random.default_rng(0).bytes(max(64, path.stat().st_size)))


def swap_files(a: Path, b: Path) -> None:
    tmp = a.read_bytes()
    a.write_bytes(b.read_bytes())
    b.write_bytes(tmp)


def dup_gene_ids_v2(store: Path) -> None:
    """A format v2 store (no obs/var checksums) whose vocabulary repeats a gene id: refused on opening."""
    import zarr

    meta = json.loads((store / "zarr.json").read_text())
    m = meta["attributes"]["cellray"]
    m["version"], m["var_checksums"] = 2, {}
    for sh in m["shards"]:
        sh["files"], sh["obs"] = {}, {}
    (store / "zarr.json").write_text(json.dumps(meta))
    ids = zarr.open_array(str(store / "var/_index"), mode="r+")
    values = ids[:]
    values[5] = values[4]
    ids[:] = values


X_DAMAGE = [
    ("data chunks swapped", lambda s: swap_chunks(s / "shards/00001/X/data/c/0", 1, 2), "is not the one written"),
    ("indices chunks swapped", lambda s: swap_chunks(s / "shards/00001/X/indices/c/0", 0, 3), "is not the one"),
    (
        "data files of two shards swapped",
        lambda s: swap_files(s / "shards/00001/X/data/c/0", s / "shards/00002/X/data/c/0"),
        "is not the one written there",
    ),
    (
        "indptr file of another shard",
        lambda s: shutil.copy(s / "shards/00002/X/indptr/c/0", s / "shards/00001/X/indptr/c/0"),
        "shards/00001/X/indptr: chunk file c/0 is not the one",
    ),
    ("shard directory deleted", lambda s: shutil.rmtree(s / "shards/00002"), "shards/00002"),
]
VAR_DAMAGE = [
    ("var _index chunk deleted", lambda s: (s / "var/_index/c/0").unlink(), "var/_index"),
    ("var _index chunk garbage", lambda s: garbage(s / "var/_index/c/0"), "/var"),
    ("var group deleted", lambda s: shutil.rmtree(s / "var"), "/var"),
    ("duplicate gene id in a v2 store", dup_gene_ids_v2, "duplicate gene ids"),
]
OBS_DAMAGE = [
    ("obs_name chunk deleted", lambda s: (s / "shards/00001/obs/obs_name/c/0").unlink(), "shards/00001/obs/obs_name"),
    ("obs _index chunk deleted", lambda s: (s / "shards/00001/obs/_index/c/0").unlink(), "shards/00001/obs/_index"),
    ("obs _index chunk garbage", lambda s: garbage(s / "shards/00001/obs/_index/c/0"), "shards/00001/obs"),
    ("obs group deleted", lambda s: shutil.rmtree(s / "shards/00001/obs"), "shards/00001/obs"),
]
CODES_DAMAGE = [
    (
        "cell_type codes deleted",
        lambda s: (s / "shards/00001/obs/cell_type/codes/c/0").unlink(),
        "shards/00001/obs/cell_type",
    ),
    ("cell_type codes garbage", lambda s: garbage(s / "shards/00001/obs/cell_type/codes/c/0"), "shards/00001/obs"),
]
ALL_DAMAGE = X_DAMAGE + VAR_DAMAGE + OBS_DAMAGE + CODES_DAMAGE


def damaged(action, argv):
    def setup(d, store):
        action(store)
        return [a.format(store=store, d=d) for a in argv]

    return setup


STATS = ["stats", "{store}", "--executor", "local"]
EXPORT = [*STATS, "--export", "{d}/genes.csv"]
CHUNKY_CASES = (
    [(f"stats: {n}", damaged(a, STATS), e) for n, a, e in X_DAMAGE + VAR_DAMAGE]
    + [(f"stats --export: {n}", damaged(a, EXPORT), e) for n, a, e in X_DAMAGE + VAR_DAMAGE]
    + [(f"info: {n}", damaged(a, ["info", "{store}"]), e) for n, a, e in VAR_DAMAGE]
    + [(f"stats --batch-key: {n}", damaged(a, [*STATS, "--batch-key", "cell_type"]), e) for n, a, e in CODES_DAMAGE]
    + [
        (
            f"run --check: {n}",
            lambda d, s, a=a: a(s) or ["run", str(write_spec(d, spec(str(s)))), "--check"],
            e,
        )
        for n, a, e in VAR_DAMAGE
    ]
)


def bad_gene_index(d: Path, value: int) -> Path:
    """A valid h5ad whose CSR X then gets one gene index outside [0, n_vars) (as a broken writer leaves it)."""
    import h5py

    path = h5ad(d, "b.h5ad", counts())
    with h5py.File(path, "r+") as f:
        indices = f["X/indices"][:].astype(np.int64)
        del f["X/indices"]
        indices[7] = value
        f["X/indices"] = indices
    return path


def nonfinite_spec(path: str, value):
    return lambda d, s: ["run", str(write_spec(d, spec(str(s), **{path: value}))), "--check"]


CASES += [
    ("ingest: gene index >= n_vars", ingest(lambda d: bad_gene_index(d, 8)), "gene index 8 at row"),
    ("ingest: gene index far out", ingest(lambda d: bad_gene_index(d, 10**6)), "outside [0, 8)"),
    ("ingest: negative gene index", ingest(lambda d: bad_gene_index(d, -1)), "gene index -1"),
    (
        "cluster start --num-cpus -1",
        lambda d, s: ["cluster", "start", "--num-cpus", "-1", "--state-dir", str(d / "c")],
        "--num-cpus -1: expected an integer >= 1",
    ),  # fmt: skip
    (
        "cluster start --num-gpus -2",
        lambda d, s: ["cluster", "start", "--num-gpus", "-2", "--state-dir", str(d / "c")],
        "--num-gpus -2",
    ),  # fmt: skip
    (
        "cluster start --object-store-mb 0",
        lambda d, s: ["cluster", "start", "--object-store-mb", "0", "--state-dir", str(d / "c")],
        "--object-store-mb 0",
    ),
    ("spec: lr .inf", nonfinite_spec("train.lr", float("inf")), "train.lr: inf is not a finite number"),  # YAML .inf
    ("spec: lr .nan", nonfinite_spec("train.lr", float("nan")), "train.lr: nan is not a finite number"),
    ("spec: lr -.inf", nonfinite_spec("train.lr", float("-inf")), "train.lr: -inf is not a finite number"),
    ("spec: weight decay .inf", nonfinite_spec("train.weight_decay", float("inf")), "train.weight_decay"),
    ("spec: model config .inf", nonfinite_spec("model.config.beta", float("inf")), "model.config.beta"),
    ("spec: val fraction .nan", nonfinite_spec("data.val_fraction", float("nan")), "data.val_fraction"),
    (
        "ingest: empty gene id",
        ingest(lambda d: h5ad(d, "b.h5ad", counts(), var=[""] + [f"G{i}" for i in range(1, 8)])),
        "empty gene ids",
    ),  # fmt: skip
    (
        "ingest: blank gene id",
        ingest(lambda d: h5ad(d, "b.h5ad", counts(), var=["G0", "  "] + [f"G{i}" for i in range(2, 8)])),
        "empty gene ids",
    ),
    (
        "ingest: empty cell name",
        ingest(lambda d: h5ad(d, "b.h5ad", counts(), obs=[f"c{i}" for i in range(29)] + [""])),
        "empty cell names (1, the first at position 29)",
    ),
]


def run_case(argv_of, store: Path, tmp_path: Path, capsys, monkeypatch, code: int = 2) -> str:
    """Run `cellray ARGV` in-process in an empty work folder: one `error:` line per problem, exit `code`, no
    traceback, nothing left in the folder nor beside the store."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    argv = argv_of(work, store)
    before = {p.name for p in work.iterdir()}
    store_before = sorted(p.name for p in store.parent.iterdir())
    capsys.readouterr()
    got = main(argv)
    err = capsys.readouterr().err
    assert got == code, err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith(("INFO", "WARNING"))]
    assert lines and all(line.startswith("error: ") for line in lines), err
    assert "Traceback" not in err and "Task was destroyed" not in err
    left = {p.name for p in work.iterdir()} - before
    assert not left, f"left behind: {left}"
    assert sorted(p.name for p in store.parent.iterdir()) == store_before  # no temporary beside the store
    return err


@pytest.mark.parametrize("setup, expect", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_one_line_exit_2_nothing_left(setup, expect, fresh_store, tmp_path, capsys, monkeypatch):
    err = run_case(setup, fresh_store, tmp_path, capsys, monkeypatch)
    assert expect in err, err


@pytest.fixture(scope="module")
def chunky_store(tiny_h5ads, tmp_path_factory) -> Path:
    """The tiny inputs in 1,024-value chunks (several per shard file), ingested in this process."""
    out = tmp_path_factory.mktemp("chunky") / "chunky.store"
    config = IngestConfig(shard_cells=400, obs_keys=("cell_type", "batch"), chunk_elements=1024, executor="local")
    ingest_store(tiny_h5ads, out, config)
    return out


@pytest.fixture
def chunky(chunky_store, tmp_path) -> Path:
    return Path(shutil.copytree(chunky_store, tmp_path / "copy.store"))


@pytest.mark.parametrize("setup, expect", [c[1:] for c in CHUNKY_CASES], ids=[c[0] for c in CHUNKY_CASES])
def test_damaged_store_one_line_exit_2(setup, expect, chunky, tmp_path, capsys, monkeypatch):
    err = run_case(setup, chunky, tmp_path, capsys, monkeypatch)
    assert expect in err, err


@pytest.mark.parametrize("action, expect", [d[1:] for d in ALL_DAMAGE], ids=[d[0] for d in ALL_DAMAGE])
def test_verify_finds_the_damage(action, expect, chunky, capsys):
    action(chunky)
    capsys.readouterr()
    code = main(["verify", str(chunky)])
    out = capsys.readouterr()
    text = out.out + out.err
    assert code in (1, 2), text  # 1: findings; 2: a store that cannot even be opened (its manifest)
    assert expect in text and "Traceback" not in text and "Task was destroyed" not in text, text


@pytest.mark.parametrize("action, expect", [d[1:] for d in ALL_DAMAGE], ids=[d[0] for d in ALL_DAMAGE])
def test_open_anndata_raises_store_error(action, expect, chunky):
    action(chunky)
    with pytest.raises(StoreError, match=expect.replace("(", r"\(")) as e:
        a = open_anndata(chunky)
        gene_sums(a.X)  # X is lazy: its chunks are read here
    assert "\n" not in str(e.value)


@pytest.fixture(scope="module")
def chunky_checkpoint(chunky_store, ray_local, tmp_path_factory) -> Path:
    """A VAE trained in-process (resources.workers: 0) for two steps on the intact chunky store."""
    out = tmp_path_factory.mktemp("ckpt") / "vae"
    raw = spec(str(chunky_store), **{"train.max_steps": 2, "train.output": str(out), "resources": {"workers": 0}})
    assert main(["run", str(write_spec(out.parent, raw))]) == 0
    return out


TRAINING_DAMAGE = [X_DAMAGE[0], X_DAMAGE[3], VAR_DAMAGE[0], CODES_DAMAGE[0]]


@pytest.mark.parametrize("action, expect", [d[1:] for d in TRAINING_DAMAGE], ids=[d[0] for d in TRAINING_DAMAGE])
def test_run_on_a_damaged_store(action, expect, chunky, ray_local, tmp_path, capsys, monkeypatch):
    """`cellray run` (in-process training) stops at the damage with its one line, not a vocabulary of empty ids."""
    side = tmp_path / "side"  # apart from the work folder and the store: a run may leave its (empty) output folder
    side.mkdir()
    out = side / "run"
    raw = spec(str(chunky), **{"train.max_steps": 4, "train.output": str(out), "resources": {"workers": 0}})

    def setup(d, s):
        action(s)
        return ["run", str(write_spec(side, raw))]

    assert expect in run_case(setup, chunky, tmp_path, capsys, monkeypatch)
    assert not list(out.rglob("model.pt")), "no checkpoint saved from damaged data"


def test_diverging_run_ends_with_exit_2_naming_the_step(chunky_store, ray_local, tmp_path, capsys, monkeypatch):
    """A finite but absurd learning rate: the loss turns inf/NaN after the first update, and the run stops there."""
    side = tmp_path / "side"
    side.mkdir()
    raw = spec(
        str(chunky_store),
        **{"train.lr": 1e30, "train.max_steps": 6, "train.output": str(side / "run"), "resources": {"workers": 0}},
    )
    err = run_case(lambda d, s: ["run", str(write_spec(side, raw))], chunky_store, tmp_path, capsys, monkeypatch)
    assert re.search(r"the loss is (nan|inf|-inf) at step [2-6]: training diverged", err), err
    assert not list((side / "run").rglob("model.pt")), "no checkpoint of NaN weights"


EMBED_DAMAGE = [X_DAMAGE[0], OBS_DAMAGE[0], OBS_DAMAGE[1], VAR_DAMAGE[0]]


@pytest.mark.parametrize("action, expect", [d[1:] for d in EMBED_DAMAGE], ids=[d[0] for d in EMBED_DAMAGE])
def test_embed_of_a_damaged_store(action, expect, chunky, chunky_checkpoint, tmp_path, capsys, monkeypatch):
    """`cellray embed` stops at the damage with its one line and leaves no output and no `.OUT.parts/`."""

    def setup(d, s):
        action(s)
        return ["embed", "--checkpoint", str(chunky_checkpoint), "--store", str(s), "--out", str(d / "e.h5ad"),
                "--executor", "local"]  # fmt: skip

    assert expect in run_case(setup, chunky, tmp_path, capsys, monkeypatch)


def test_embed_with_an_unknown_label_key_writes_nothing(chunky, chunky_checkpoint, tmp_path, capsys, monkeypatch):
    def setup(d, s):
        return ["embed", "--checkpoint", str(chunky_checkpoint), "--store", str(s), "--out", str(d / "e.h5ad"),
                "--executor", "local", "--label-key", "nope"]  # fmt: skip

    assert "nope" in run_case(setup, chunky, tmp_path, capsys, monkeypatch)


def first_checkpoint(run: Path) -> Path:
    return sorted(run.glob("checkpoint_*"))[-1]


CHECKPOINT_DAMAGE = [
    ("model.pt garbage", lambda c: garbage(first_checkpoint(c) / "model.pt"), "model.pt: not a readable checkpoint"),
    (
        "model.pt truncated",
        lambda c: (first_checkpoint(c) / "model.pt").write_bytes((first_checkpoint(c) / "model.pt").read_bytes()[:500]),
        "model.pt: not a readable checkpoint file, garbage or truncated",
    ),
    (
        "meta.json garbled",
        lambda c: (first_checkpoint(c) / "meta.json").write_text("{step: 2,"),
        "meta.json: not valid",
    ),
    (
        "meta.json of a directory given",
        lambda c: (first_checkpoint(c) / "meta.json").write_text("[1, 2]"),
        "meta.json: not a checkpoint's meta",
    ),
    ("model.pt missing", lambda c: (first_checkpoint(c) / "model.pt").unlink(), "incomplete checkpoint"),
]


@pytest.mark.parametrize("action, expect", [d[1:] for d in CHECKPOINT_DAMAGE], ids=[d[0] for d in CHECKPOINT_DAMAGE])
def test_embed_with_a_damaged_checkpoint(action, expect, chunky, chunky_checkpoint, tmp_path, capsys, monkeypatch):
    side = tmp_path / "side"
    run = Path(shutil.copytree(chunky_checkpoint, side / "run"))
    action(run)
    given = first_checkpoint(run) if "directory given" in expect or "meta" in expect else run

    def setup(d, s):
        return ["embed", "--checkpoint", str(given), "--store", str(s), "--out", str(d / "e.h5ad"), "--executor",
                "local"]  # fmt: skip

    assert expect in run_case(setup, chunky, tmp_path, capsys, monkeypatch)


def test_resuming_from_another_models_checkpoint(chunky_store, chunky_checkpoint, tmp_path, capsys, monkeypatch):
    """A run whose output holds another model's checkpoint: its whole cause in one line (the config fields that
    differ), exit 2, no retries."""
    side = tmp_path / "side"
    run = Path(shutil.copytree(chunky_checkpoint, side / "run"))
    raw = spec(str(chunky_store), **{"model.config": {"n_latent": 9}, "train.max_steps": 4, "train.output": str(run),
                                     "resources": {"workers": 0}})  # fmt: skip
    err = run_case(lambda d, s: ["run", str(write_spec(side, raw))], chunky_store, tmp_path, capsys, monkeypatch)
    assert "does not fit this run's model" in err and "size mismatch" in err, err
    trained = json.loads((first_checkpoint(run) / "meta.json").read_text())["model"]["config"]["n_latent"]
    assert f"its model config differs (n_latent: 9 here, {trained} there)" in err, err
    assert "attempt" not in err and "lost a process" not in err


def test_cluster_start_with_token_auth_turned_off(fresh_store, tmp_path, capsys, monkeypatch):
    """RAY_AUTH_MODE=disabled: refused at once (the cluster would start with token auth, this client without)."""
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    argv = ["cluster", "start", "--state-dir", str(tmp_path / "side" / "c")]
    assert "RAY_AUTH_MODE=disabled" in run_case(lambda d, s: argv, fresh_store, tmp_path, capsys, monkeypatch)
    assert not (tmp_path / "side").exists()


def test_verify_of_a_bad_many_chunk_array_prints_no_asyncio_noise(chunky):
    """zarr-python stops at the first bad chunk while its other reads are pending: at exit they used to be destroyed
    with ~1,000 lines of "Task was destroyed but it is pending!". A subprocess: the noise came at interpreter exit."""
    import subprocess
    import sys

    import zarr
    from zarr.codecs import Crc32cCodec, ZstdCodec

    codes = chunky / "shards/00003/obs/cell_type/codes"  # the last shard: verify exits right after it
    values = zarr.open_array(str(codes), mode="r")[:]
    attrs = dict(zarr.open_array(str(codes), mode="r").attrs)
    shutil.rmtree(codes)
    arr = zarr.create_array(str(codes), shape=values.shape, chunks=(1,), dtype=values.dtype,
                            compressors=[ZstdCodec(), Crc32cCodec()])  # fmt: skip
    arr[:] = values
    arr.attrs.update(attrs)
    garbage(codes / "c" / "3")
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-m", "jobs.cli", "verify", str(chunky)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(root)}, timeout=120)  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    assert "shards/00003/obs" in proc.stdout + proc.stderr
    assert "Task was destroyed" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]


def test_undamaged_chunky_store_reads_back(chunky):
    """The damage tests' control: the same reads of the intact store succeed, and match its inputs' totals."""
    assert main(["verify", str(chunky)]) == 0
    a = open_anndata(chunky)
    assert a.obs.index.is_unique and (a.obs["obs_name"] != "").all() and (a.var.index != "").all()
    assert gene_sums(a.X).sum() > 0


def test_obs_column_of_numbers_and_text_is_stored_as_strings(tmp_path):
    """Issue 23: a column categorical in one input and float in another kept every value (as strings)."""
    X = counts(20, 8)
    for name, values in (("a", pd.Categorical(["young", "old"] * 10)), ("b", np.arange(20) * 1.5)):
        a = ad.AnnData(X=X, obs=pd.DataFrame({"age": values}, index=[f"c{i}" for i in range(20)]),
                       var=pd.DataFrame(index=[f"G{i}" for i in range(8)]))  # fmt: skip
        a.write_h5ad(tmp_path / f"{name}.h5ad")
    config = IngestConfig(obs_keys=("age",), executor="local")
    store = ingest_store([tmp_path / "a.h5ad", tmp_path / "b.h5ad"], tmp_path / "s.store", config).store
    obs = pd.concat([store.read_obs(i) for i in range(store.n_shards)])
    assert not obs["age"].isna().any()
    assert obs.loc["b:c3", "age"] == "4.5" and obs.loc["a:c0", "age"] == "young"
    assert set(store.manifest.obs_schema["age"]["categories"]) == set(obs["age"].astype(str))


def test_the_table_is_large():
    n = (
        len(CASES)
        + len(CHUNKY_CASES)
        + 2 * len(ALL_DAMAGE)
        + len(TRAINING_DAMAGE)
        + len(EMBED_DAMAGE)
        + len(CHECKPOINT_DAMAGE)
        + 2
    )
    assert n >= 120, n
