"""Shuffle quality (bench/shuffle.py's measure): on a store sorted by cell type, the Loader's batches at the default
block size carry nearly the label entropy of truly random batches; reading blocks without mixing them does not."""

from __future__ import annotations

import numpy as np
import pytest

from bench.shuffle import mean_batch_entropy, random_batch_entropy
from engine.loading.loader import Loader
from engine.loading.sampler import SamplerConfig
from engine.store.format import Store
from engine.store.ingest import IngestConfig, ingest

BATCH = 256


@pytest.fixture(scope="module")
def sorted_store(tmp_path_factory):
    """6,000 cells of 5 types, ~300 non-zeros each, lying sorted by type (no ingest shuffle)."""
    from engine.store.synthetic import synthetic_counts

    d = tmp_path_factory.mktemp("entropy")
    a = synthetic_counts(6000, 2000, nnz_per_cell=300, seed=4)
    a = a[np.argsort(a.obs["cell_type"].to_numpy(), kind="stable")].copy()
    a.write_h5ad(d / "sorted.h5ad")
    ingest(
        [d / "sorted.h5ad"], d / "sorted.store", IngestConfig(obs_keys=("cell_type",), shuffle=False, executor="local")
    )
    return d / "sorted.store"


def batches(store, **plan) -> list[np.ndarray]:
    with Loader(store, SamplerConfig(batch_size=BATCH, **plan), mode="local", obs_keys=("cell_type",)) as loader:
        out = []
        for e in range(2):
            loader.set_epoch(e)
            out += [b["cell_type"].numpy() for b in loader]
        return out


def test_default_blocks_reach_nearly_random_entropy_on_a_sorted_store(sorted_store):
    store = Store.open(sorted_store)
    codes = np.concatenate([store.obs_codes(s, "cell_type") for s in range(store.n_shards)])
    assert np.all(np.diff(codes) >= 0)  # the store really is sorted by type
    random = random_batch_entropy(codes, BATCH)
    assert random > 2.2  # 5 types of about equal size: log2(5) = 2.32 bits
    loader = Loader(sorted_store, SamplerConfig(batch_size=BATCH), mode="local")
    assert loader.config.block_size < store.n_cells / 8  # the default block is small against the store
    loader.close()
    assert mean_batch_entropy(batches(sorted_store)) >= 0.8 * random
    # blocks read in order, one per buffer: batches hold one or two types
    unmixed = mean_batch_entropy(batches(sorted_store, buffer_blocks=1, shuffle=False))
    assert unmixed < 0.3 * random
