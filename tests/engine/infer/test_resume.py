"""Exactly once, resumable: a lost actor, a killed driver, a missing commit record, a changed fingerprint, and the
driver's memory on a 200k-cell store."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from engine.errors import InferError
from engine.infer.embed import OBSM_KEY, embed
from engine.store.format import Store
from jobs.cli import main

N_PARTS = 10  # the tiny store's 1483 cells in parts of 150


def _staging(out: Path) -> Path:
    return out.parent / f".{out.name}.parts"


def _assert_equals_reference(out: Path, reference) -> None:
    import anndata as ad

    a = ad.read_zarr(out)
    assert list(a.obs_names) == list(reference.obs_names) and a.obs_names.is_unique  # every cell, exactly once
    pd.testing.assert_frame_equal(a.obs, reference.obs)
    np.testing.assert_allclose(a.obsm[OBSM_KEY], reference.obsm[OBSM_KEY], atol=1e-5)
    records = sorted((out / ".cellray" / "parts").glob("*.json"))
    assert len(records) == N_PARTS
    assert sum(json.loads(r.read_text())["rows"] for r in records) == a.n_obs
    assert not list(out.rglob(".*.tmp-*"))  # no half-written file of a lost writer outlives the run


def _unfinished_copy(reference_dir: Path, out: Path) -> Path:
    """A finished output copied back to its unfinished (staging) name, as an interrupted run leaves it."""
    staging = _staging(out)
    shutil.copytree(reference_dir, staging)
    run = json.loads((staging / ".cellray" / "run.json").read_text())
    (staging / ".cellray" / "run.json").write_text(json.dumps({**run, "complete": False}))
    return staging


def test_actor_lost_after_renaming_before_commit_is_retried(vae_checkpoint, tiny_store, reference_embedding, tmp_path):
    out = tmp_path / "emb.zarr"
    res = embed(vae_checkpoint, tiny_store, out, num_actors=2, part_cells=150, debug={"fault_part": 3})
    assert (out / ".cellray" / "fault-3").exists()  # the actor did exit hard (os._exit) in the middle of part 3
    assert res.parts_run == N_PARTS
    _assert_equals_reference(out, reference_embedding)


def test_driver_killed_half_way_rerun_completes(vae_checkpoint, tiny_store, reference_embedding, tmp_path, helpers):
    out = tmp_path / "emb.zarr"
    records = _staging(out) / ".cellray" / "parts"
    proc = helpers.driver_subprocess(
        "from engine.infer.embed import embed\n"
        f"embed({str(vae_checkpoint)!r}, {str(tiny_store)!r}, {str(out)!r}, num_actors=2, part_cells=150,"
        " debug={'part_delay_s': 1.0})\n"
    )
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            if records.is_dir() and len(list(records.glob("*.json"))) >= 3:
                break
            time.sleep(0.1)
        assert proc.poll() is None, f"the driver ended before it was killed: {proc.communicate()[1][-2000:]}"
        os.kill(proc.pid, signal.SIGKILL)  # kill -9 half way
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    committed = len(list(records.glob("*.json")))
    assert 3 <= committed < N_PARTS and not out.exists()
    res = embed(vae_checkpoint, tiny_store, out, part_cells=150)  # the rerun (in-process): same fingerprint, no delay
    assert 1 <= res.parts_run <= N_PARTS - 3
    _assert_equals_reference(out, reference_embedding)


def test_part_without_commit_record_is_redone(
    vae_checkpoint, tiny_store, reference_output, reference_embedding, tmp_path
):
    import zarr

    out = tmp_path / "emb.zarr"
    staging = _unfinished_copy(reference_output, out)
    (staging / ".cellray" / "parts" / "00004.json").unlink()  # part 4 was written but never committed
    zarr.open_array(str(staging / "obsm" / OBSM_KEY), mode="r+")[600:750] = 7.0  # ... and holds garbage
    (staging / ".cellray" / "tmp" / "00004.dead").mkdir(parents=True)  # an orphan of its killed writer
    (staging / ".cellray" / "parts" / ".00004.json.tmp-1@host-0123abcd.json").write_text('{"par')  # its record, cut
    res = embed(vae_checkpoint, tiny_store, out, part_cells=150)  # in-process (a small store)
    assert res.parts_run == 1
    _assert_equals_reference(out, reference_embedding)
    assert not (out / ".cellray" / "tmp").exists()


def test_another_fingerprint_is_refused_in_one_line(
    vae_checkpoint, probe_checkpoint, tiny_store, reference_output, tmp_path, capsys
):
    out = tmp_path / "emb.zarr"
    _unfinished_copy(reference_output, out)
    with pytest.raises(InferError, match="unfinished run with another layout"):
        embed(vae_checkpoint, tiny_store, out, part_cells=100)
    args = [
        "embed",
        "--checkpoint",
        str(probe_checkpoint),
        "--store",
        str(tiny_store),
        "--out",
        str(out),
        "--part-cells",
        "150",
    ]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and len(err.splitlines()) == 1
    assert "another checkpoint and transforms" in err and "--overwrite" in err
    assert _staging(out).exists()  # nothing was touched


def _write_store(path: Path, n_cells: int, shard_cells: int, genes: list[str], seed: int = 0) -> Store:
    """A store of random counts written with the store format's own writer (faster than ingest for 200k cells)."""
    import zarr

    from engine.store.format import Codec, Manifest
    from engine.store.write import write_root, write_shard

    rng = np.random.default_rng(seed)
    root = zarr.open_group(str(path), mode="w", zarr_format=3)
    root.attrs.update({"encoding-type": "anndata", "encoding-version": "0.1.0"})
    schema = {
        "dataset": {"dtype": "category", "categories": ["big"]},
        "obs_name": {"dtype": "string"},
        "batch": {"dtype": "category", "categories": ["b0", "b1"]},
    }
    shards, nnz_per_cell = [], 10
    for k, start in enumerate(range(0, n_cells, shard_cells)):
        n = min(shard_cells, n_cells - start)
        stride = len(genes) // nnz_per_cell  # nnz_per_cell distinct genes per cell
        cols = (rng.integers(0, len(genes), (n, 1)) + stride * np.arange(nnz_per_cell)) % len(genes)
        indices = np.sort(cols, axis=1).astype(np.uint16).ravel()
        data = rng.integers(1, 20, n * nnz_per_cell).astype(np.uint16)
        indptr = np.arange(0, n * nnz_per_cell + 1, nnz_per_cell, dtype=np.int64)
        names = [f"cell{i}" for i in range(start, start + n)]
        obs = pd.DataFrame(
            {
                "dataset": pd.Categorical(["big"] * n, categories=["big"]),
                "obs_name": names,
                "batch": pd.Categorical.from_codes(rng.integers(0, 2, n), categories=["b0", "b1"]),
            },
            index=[f"big:{x}" for x in names],
        )
        shards.append(write_shard(root, k, indptr, indices, data, obs, pd.Index(genes), Codec()))
    manifest = Manifest(
        n_cells=n_cells,
        n_genes=len(genes),
        count_dtype="uint16",
        index_dtype="uint16",
        codec=Codec(),
        chunk_elements=1 << 16,
        shards=shards,
        obs_schema=schema,
        provenance=[],
    )
    write_root(root, manifest, pd.DataFrame({"gene_symbols": genes}, index=pd.Index(genes)))
    return Store.open(path)


def test_driver_memory_does_not_grow_with_the_store(vae_checkpoint, tiny_store, tmp_path, helpers):
    """200k cells in 10 parts of 20k: the driver holds the layout and the records, never the embeddings or obs."""
    store = _write_store(tmp_path / "big.store", 200_000, 20_000, [str(g) for g in Store.open(tiny_store).gene_ids])
    out = tmp_path / "big.zarr"
    proc = helpers.driver_subprocess(  # the driver's RSS sampled every 5 ms while embed runs
        "import json, threading, time, psutil, anndata, zarr, scipy.sparse\n"
        "from engine.infer.embed import embed\n"
        "rss = lambda: psutil.Process().memory_info().rss\n"
        "base, peak, running = rss(), [0], [True]\n"
        "def sample():\n"
        "    while running[0]:\n"
        "        peak[0] = max(peak[0], rss()); time.sleep(0.005)\n"
        "t = threading.Thread(target=sample); t.start()\n"
        f"res = embed({str(vae_checkpoint)!r}, {str(store.path)!r}, {str(out)!r}, num_actors=1, batch_size=4096)\n"
        "running[0] = False; t.join()\n"
        "print(json.dumps({'base': base, 'peak': peak[0], 'parts': res.parts, 'cells': res.n_cells}))\n"
    )
    stdout, stderr = proc.communicate(timeout=400)
    assert proc.returncode == 0, stderr[-3000:]
    m = json.loads(stdout.strip().splitlines()[-1])
    assert m["parts"] == 10 and m["cells"] == 200_000
    growth_mb = (m["peak"] - m["base"]) / 2**20
    print(f"driver RSS {m['base'] / 2**20:.0f} MB before embed, peak {m['peak'] / 2**20:.0f} MB (+{growth_mb:.0f} MB)")
    # Gathering would hold 200k x 3 float32 embeddings and 200k obs rows (~40 MB of strings); the driver reads one
    # shard's obs (20k rows) for the skeleton and keeps the layout and small records, nothing per cell.
    assert growth_mb < 40
    import anndata as ad

    a = ad.read_zarr(out)
    assert a.n_obs == 200_000 and a.obs_names[-1] == "big:cell199999" and np.isfinite(a.obsm[OBSM_KEY]).all()


def test_finishing_removes_the_half_written_record_of_a_lost_writer(tmp_path):
    """An actor runs two parts at once: lost while committing one, it leaves that record's temporary behind, and
    Ray redoes the part elsewhere. The finished output keeps the redone record, not the temporary."""
    import zarr

    from engine.atomic import temporary_sibling
    from engine.infer.parts import PartsOutput

    zarr.open_group(str(tmp_path / "o.zarr"), mode="w")
    output = PartsOutput(tmp_path / "o.zarr")
    output.records.mkdir(parents=True)
    record = output.records / "00002.json"
    cut = temporary_sibling(record, ".json")
    cut.write_text('{"par')
    record.write_text('{"part": 2}')
    output.finish({"cellray": {}})
    assert not cut.exists() and record.read_text() == '{"part": 2}'
