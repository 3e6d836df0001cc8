"""A run with a global batch resumed at another number of workers continues at the next unseen global batch: the
same global batches, step by step, as a run at one size, and parameters within float tolerance of it (real Ray
Train, gloo DDP; the probe model has no randomness, so only DDP's reduction order differs; a constant learning
rate, as the schedule of a run depends on its max_steps)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from engine.errors import SpecError
from engine.train.config import DebugConfig
from engine.train.driver import pretrain
from jobs.spec import parse_spec

GLOBAL, EVERY = 60, 3


def spec(store: Path, out: Path, trace: Path, workers, steps: int):
    return parse_spec({
        "kind": "pretrain",
        "name": out.name,
        "data": {"store": str(store), "global_batch_size": GLOBAL, "obs_keys": ["cell_type"],
                 "loader": {"block_size": 64, "buffer_blocks": 2}},
        "model": {"name": "probe", "config": {"label_key": "cell_type", "n_hidden": 16}},
        "train": {"max_steps": steps, "lr": 3e-2, "min_lr_ratio": 1.0, "checkpoint_every": EVERY, "report_every": EVERY,
                  "output": str(out)},
        "resources": {"workers": workers, "cpus_per_worker": 0.5, "readers_per_worker": 0},
        "debug": {"trace_dir": str(trace)},
    })  # fmt: skip


def global_batches(trace: Path) -> dict[int, dict]:
    """step -> {cells of the global batch (ranks in order), world size, attempt}, the last attempt of each step."""
    ranks: dict[int, dict[int, dict]] = {}
    for f in sorted(trace.glob("rank*.jsonl")):
        for line in f.read_text().splitlines():
            e = json.loads(line)
            ranks.setdefault(e["step"], {})[int(f.stem[4:])] = e
    out = {}
    for step, by_rank in ranks.items():
        world = max(e["world_size"] for e in by_rank.values())
        mine = [by_rank[r] for r in range(world) if r in by_rank and by_rank[r]["world_size"] == world]
        assert len(mine) == world, f"step {step}: {len(mine)} of {world} ranks traced"
        out[step] = {"cells": [c for e in mine for c in e["cells"]], "world": world, "attempt": mine[0]["attempt"]}
    return out


def test_resume_at_another_size_continues_the_global_batches(tiny_store, ray_local, tmp_path):
    ref = pretrain(spec(tiny_store, tmp_path / "ref", tmp_path / "tref", 0, 12))
    pretrain(spec(tiny_store, tmp_path / "run", tmp_path / "t3", 3, 6))  # 3 workers, steps 1-6
    resumed = pretrain(spec(tiny_store, tmp_path / "run", tmp_path / "t2", 2, 12))  # 2 workers from step 7
    want = global_batches(tmp_path / "tref")
    three, two = global_batches(tmp_path / "t3"), global_batches(tmp_path / "t2")
    assert sorted(three) == list(range(1, 7)) and sorted(two) == list(range(7, 13))
    assert {b["world"] for b in three.values()} == {3} and {b["world"] for b in two.values()} == {2}
    got = {**three, **two}
    assert [got[s]["cells"] for s in range(1, 13)] == [want[s]["cells"] for s in range(1, 13)]
    assert all(len(got[s]["cells"]) == GLOBAL for s in got)
    epoch0 = [c for s in range(1, 13) for c in got[s]["cells"]]
    assert len(set(epoch0)) == len(epoch0), "no cell twice within the epoch"
    a = torch.load(tmp_path / "tref" / "final-rank0.pt")
    b = torch.load(tmp_path / "t2" / "final-rank0.pt")
    for k in a:  # float32 sums over 60 cells in another order: within 1e-4
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-4)
    assert [m["step"] for m in resumed.history] == [3, 6, 9, 12]
    assert [m["world_size"] for m in resumed.history] == [3, 3, 2, 2]
    assert ref.history[-1]["step"] == 12


def test_elastic_workers_need_a_global_batch(tiny_store, tmp_path):
    raw = {"kind": "pretrain", "name": "x", "data": {"store": str(tiny_store)}, "model": {"name": "vae"},
           "resources": {"workers": {"min": 2, "max": 4}}}  # fmt: skip
    with pytest.raises(SpecError, match="needs data.global_batch_size"):
        parse_spec(raw)
    with pytest.raises(SpecError, match=r"resources.workers.min: .*min \(5\) is more than max \(4\)|min \(5\)"):
        parse_spec({**raw, "resources": {"workers": {"min": 5, "max": 4}}})
    ok = parse_spec({**raw, "data": {"store": str(tiny_store), "global_batch_size": 64}})
    assert ok.resources.elastic and (ok.resources.min_workers, ok.resources.max_workers) == (2, 4)
    assert DebugConfig().trace_dir is None
