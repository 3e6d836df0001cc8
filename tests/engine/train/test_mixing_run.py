"""data.sources in a run spec: one-line errors for bad mixes, and an in-process run over two stores of different
vocabularies whose step trace records each cell's source beside its row."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from engine.errors import SpecError
from engine.store.format import Store
from engine.store.ingest import IngestConfig, ingest
from engine.train.data import open_run_data
from engine.train.driver import pretrain
from jobs.spec import parse_spec

BATCH, STEPS = 32, 10


@pytest.fixture(scope="module")
def two_stores(tiny_h5ads, tmp_path_factory) -> list[Path]:
    """ds0 (700 cells, genes 0-299) and ds2 (333 cells, genes 20-319): a union vocabulary of 320 genes."""
    d = tmp_path_factory.mktemp("mixrun")
    out = []
    for i in (0, 2):
        config = IngestConfig(shard_cells=200, obs_keys=("cell_type",), executor="local", chunk_elements=1024)
        ingest([tiny_h5ads[i]], d / f"ds{i}.store", config)
        out.append(d / f"ds{i}.store")
    return out


def spec(data: dict, output: Path | None = None, trace: Path | None = None) -> object:
    return parse_spec(
        {
            "kind": "pretrain",
            "name": "mix",
            "data": {"batch_size": BATCH, "obs_keys": ["cell_type"], **data},
            "model": {"name": "vae", "config": {"n_latent": 4, "n_hidden": 16, "kl_warmup_steps": 2}},
            "train": {"max_steps": STEPS, "checkpoint_every": 5, "report_every": 5, "output": str(output or "runs/x")},
            "resources": {"workers": 0, "readers_per_worker": 1},
            "debug": {"trace_dir": str(trace) if trace else None},
        },
        source="mix.yaml",
    )


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"sources": []}, r"mix.yaml: data.sources: List should have at least 1 item"),
        (
            {"sources": [{"store": "a.store", "weight": 0}]},
            r"mix.yaml: data.sources\[0\].weight: Input should be greater than 0",
        ),
        (
            {"sources": [{"store": "a.store", "weight": -1}]},
            r"data.sources\[0\].weight: Input should be greater than 0",
        ),
        ({"store": "a.store", "sources": [{"store": "a.store"}]}, r"data: .*either store .* or sources .*not both"),
        ({}, r"data: .*either store .* or sources"),
        ({"store": "a.store", "epoch_cells": 10}, r"data: .*epoch_cells and genes go with sources"),
    ],
)
def test_bad_sources_are_one_line_errors(data, message):
    with pytest.raises(SpecError, match=message) as e:
        spec(data)
    assert "\n" not in str(e.value)


def test_submitted_sources_get_absolute_paths(tmp_path):
    from jobs.kinds import resolve_paths

    fixed = resolve_paths(spec({"sources": [{"store": "a.store", "weight": 2}, {"store": "s3://b/c.store"}]}), tmp_path)
    assert [s.store for s in fixed.data.sources] == [str(tmp_path / "a.store"), "s3://b/c.store"]
    assert [s.weight for s in fixed.data.sources] == [2.0, 1.0] and fixed.data.store is None


def test_an_unknown_store_names_its_source(two_stores, tmp_path):
    bad = spec({"sources": [{"store": str(two_stores[0])}, {"store": str(tmp_path / "nowhere.store")}]})
    with pytest.raises(SpecError, match=r"mix.yaml: data.sources\[1\].store: no such store '.*nowhere.store'") as e:
        open_run_data(bad)
    assert "\n" not in str(e.value)


def test_a_run_over_two_stores_traces_each_cells_source(two_stores, ray_local, tmp_path):
    data = {"sources": [{"store": str(two_stores[0]), "weight": 0.25}, {"store": str(two_stores[1]), "weight": 0.75}]}
    run = spec(data, tmp_path / "run", tmp_path / "trace")
    resolved = open_run_data(run)
    assert resolved.model_config["n_genes"] == 320  # the union of the two vocabularies
    result = pretrain(run)
    steps = [json.loads(line) for line in (tmp_path / "trace" / "rank0.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == list(range(1, STEPS + 1))
    cells = np.concatenate([s["cells"] for s in steps])
    sources = np.concatenate([s["sources"] for s in steps])
    assert len(cells) == len(sources) == BATCH * STEPS
    sizes = [Store.open(p).n_cells for p in two_stores]
    assert all(cells[sources == s].max() < sizes[s] for s in (0, 1))  # each a row of its own store
    share = np.mean(sources == 1)
    assert 0.6 < share < 0.9, share  # weight 0.75 over 320 cells
    meta = json.loads((result.checkpoint / "meta.json").read_text())
    assert len(meta["vocabulary"]["genes"]) == 320 and len(meta["vocabulary"]["store"]) == 2
