"""The elastic spec's rules (no Ray). Runs resized mid-epoch are checked on real clusters: tests/faults/
test_elastic.py (a node lost and one added, Ray Train resizing) and tests/jobs/test_scheduler.py (the scheduler
shrinking and growing a job, each time a resume at another size from the checkpoint)."""

from __future__ import annotations

import pytest

from engine.errors import SpecError
from engine.train.data import sampler_config
from jobs.spec import parse_spec


def test_elastic_workers_need_a_global_batch_and_a_valid_range(tmp_path):
    raw = {"kind": "pretrain", "name": "x", "data": {"store": str(tmp_path)}, "model": {"name": "vae"},
           "resources": {"workers": {"min": 2, "max": 4}}}  # fmt: skip
    with pytest.raises(SpecError, match="needs data.global_batch_size"):
        parse_spec(raw)
    with pytest.raises(SpecError, match=r"resources.workers.*min \(5\) is more than max \(4\)"):
        parse_spec({**raw, "resources": {"workers": {"min": 5, "max": 4}}})
    with pytest.raises(SpecError, match=r"global_batch_size \(3\) is less than the 4 workers"):
        parse_spec({**raw, "data": {"store": str(tmp_path), "global_batch_size": 3}})
    for bad in (-1, True):
        with pytest.raises(SpecError, match="resources.workers: Input should be greater than or equal to 0"):
            parse_spec({**raw, "resources": {"workers": bad}})
    ok = parse_spec({**raw, "data": {"store": str(tmp_path), "global_batch_size": 64, "val_fraction": 0.1}})
    assert ok.resources.elastic and (ok.resources.min_workers, ok.resources.max_workers) == (2, 4)
    train, val = sampler_config(ok.data, "train"), sampler_config(ok.data, "val")
    assert (train.batch_size, train.global_batch) == (64, True)
    assert (val.batch_size, val.global_batch) == (512, False), "validation keeps its per-rank plan"
    fixed = parse_spec({**raw, "resources": {"workers": 3}})
    assert not fixed.resources.elastic and fixed.resources.max_workers == 3
