"""Weighted mixing of several real stores (engine/loading/mixing.py): quotas per source, draws, ranks, resume, gene
vocabularies mapped by id, class balance over the union of categories, and one-line errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from engine.errors import CellrayError
from engine.loading.loader import Loader
from engine.loading.mixing import Mix, Source
from engine.loading.readers import ReadOptions
from engine.loading.sampler import SamplerConfig
from engine.store.format import Store
from engine.store.ingest import IngestConfig, ingest

PLAN = dict(block_size=16, buffer_blocks=4)
WEIGHTS = (0.5, 0.3, 0.2)
EPOCH = 2048  # a multiple of the batch: no remainder is dropped


def ingest_one(inputs: list[Path], out: Path, shuffle: bool = True, **kw) -> Path:
    kw = {"shard_cells": 200, "chunk_elements": 1024, **kw}
    config = IngestConfig(obs_keys=("cell_type",), executor="local", shuffle=shuffle, **kw)
    ingest(inputs, out, config)
    return out


@pytest.fixture(scope="module")
def stores(tiny_h5ads, tmp_path_factory) -> list[Path]:
    """The tiny inputs as three stores of their own (vocabularies partly overlapping): 333, 450 and 700 cells, so
    with weights 0.5/0.3/0.2 of 2,048 cells the first is repeated 3-4 times, the second 1-2, the third subsampled."""
    d = tmp_path_factory.mktemp("mix")
    return [ingest_one([tiny_h5ads[i]], d / f"ds{i}.store") for i in (2, 1, 0)]


def mix_of(stores, **kw) -> Mix:
    return Mix([Source(s, w) for s, w in zip(stores, WEIGHTS)], **kw)


def epoch(loader: Loader, *keys: str) -> dict[str, np.ndarray]:
    batches = list(loader)
    return {k: np.concatenate([b[k].numpy() for b in batches]) for k in ("index", "source", *keys)}


def test_an_epoch_draws_each_source_by_weight_each_cell_once_per_draw(stores):
    sizes = [Store.open(s).n_cells for s in stores]
    loader = Loader(mix_of(stores, epoch_cells=EPOCH), SamplerConfig(batch_size=32, **PLAN), mode="local")
    for e in (0, 1):
        loader.set_epoch(e)
        got = epoch(loader)
        counts = np.bincount(got["source"], minlength=3)
        assert counts.sum() == EPOCH
        assert np.all(np.abs(counts - EPOCH * np.array(WEIGHTS)) <= PLAN["block_size"]), counts
        for s, n in enumerate(sizes):
            times = np.bincount(got["index"][got["source"] == s], minlength=n)
            q = counts[s]  # every cell drawn floor(q / n) or ceil(q / n) times: once per draw
            assert set(np.unique(times)) <= {q // n, -(-q // n)}, (s, np.unique(times))
        if e == 0:
            first = got
    assert not np.array_equal(first["index"], got["index"])  # a new draw each epoch


def test_ranks_get_equal_batches_and_together_the_epoch(stores):
    mix = mix_of(stores, epoch_cells=EPOCH)
    one = epoch(Loader(mix, SamplerConfig(batch_size=32, **PLAN), mode="local"))
    per_rank = []
    for rank in range(3):
        loader = Loader(mix, SamplerConfig(batch_size=32, **PLAN), rank=rank, world_size=3, mode="local")
        per_rank.append(epoch(loader))
        assert len(per_rank[-1]["index"]) == len(loader) * 32
    assert len({len(r["index"]) for r in per_rank}) == 1
    pairs = lambda d: sorted(zip(d["source"].tolist(), d["index"].tolist()))  # noqa: E731
    every = sorted(p for r in per_rank for p in pairs(r))
    assert len(every) >= EPOCH - 3 * 33  # the documented drop: < batch_size + 1 per rank
    assert not (set(every) - set(pairs(one)))  # the ranks split the one stream


def test_resume_mid_epoch_continues_the_same_sequence(stores):
    def loader():
        return Loader(mix_of(stores, epoch_cells=EPOCH), SamplerConfig(batch_size=32, seed=3, **PLAN), mode="local")

    full = [(b["source"].numpy().copy(), b["index"].numpy().copy()) for b in loader()]
    first = loader()
    it = iter(first)
    head = [next(it) for _ in range(21)]
    assert np.array_equal(head[-1]["index"].numpy(), full[20][1])
    state = first.state_dict()
    first.close()
    resumed = loader()
    resumed.load_state_dict(state)
    rest = [(b["source"].numpy(), b["index"].numpy()) for b in resumed]
    assert len(rest) == len(full) - 21
    for (s, i), (fs, fi) in zip(rest, full[21:]):
        assert np.array_equal(s, fs) and np.array_equal(i, fi)
    other = Loader(mix_of(stores, epoch_cells=EPOCH // 2), SamplerConfig(batch_size=32, seed=3, **PLAN), mode="local")
    with pytest.raises(CellrayError, match="plan settings differ"):
        other.load_state_dict(state)


def test_stores_of_different_gene_orders_give_the_rows_of_one_store_of_both(tiny_h5ads, tmp_path):
    """Store B holds its genes in reverse order: mixed with A (each cell once: weights as their sizes), every cell
    has the same counts per gene id as in one store ingested from both inputs."""
    import anndata as ad

    a_in, b_in = tiny_h5ads[0], tmp_path / "reversed.h5ad"
    b = ad.read_h5ad(tiny_h5ads[1])
    b[:, b.var_names[::-1]].copy().write_h5ad(b_in)
    a, bs = ingest_one([a_in], tmp_path / "a.store"), ingest_one([b_in], tmp_path / "b.store")
    both = ingest_one([a_in, b_in], tmp_path / "both.store")
    n_a, n_b = Store.open(a).n_cells, Store.open(bs).n_cells
    mix = Mix([Source(a, n_a), Source(bs, n_b)])
    plan = SamplerConfig(batch_size=25, remainder="pad", **PLAN)

    def obs_names(path: Path) -> np.ndarray:
        st = Store.open(path)
        return np.concatenate([st.read_obs(i, ["obs_name"])["obs_name"].to_numpy(str) for i in range(st.n_shards)])

    def rows(loader: Loader, genes, names: list[np.ndarray]) -> dict[str, np.ndarray]:
        """obs_name -> dense counts in sorted gene-id order."""
        order = np.argsort(np.asarray(genes, dtype=str))
        out = {}
        for batch in loader:
            src = batch["source"].numpy() if "source" in batch else np.zeros(len(batch["index"]), int)
            for x, i, s in zip(batch["X"].numpy(), batch["index"].numpy(), src):
                out[names[s][i]] = x[order]
        return out

    mixed_loader = Loader(mix, plan, mode="local")
    assert mixed_loader.mix.gene_maps[0] is None and mixed_loader.mix.gene_maps[1] is not None
    mixed = rows(mixed_loader, mixed_loader.mix.genes, [obs_names(a), obs_names(bs)])
    one = rows(Loader(both, plan, mode="local"), Store.open(both).gene_ids, [obs_names(both)])
    assert len(mixed) == len(one) == n_a + n_b
    assert all(np.array_equal(mixed[k], one[k]) for k in one)


@pytest.mark.parametrize("float_first", [True, False])
def test_sources_of_other_count_dtypes_keep_their_values(tiny_h5ads, tmp_path, float_first):
    """A store of float counts (halved) mixed with one of the same cells' integer counts. Float first: the integer
    cells are cast into the float store's pool; integer first: its pool cannot hold halves, so both are copied into
    float32. Either way every cell comes out with its own store's values, as its own Loader gives them."""
    import anndata as ad

    ints, halved = tiny_h5ads[0], tmp_path / "halved.h5ad"
    h = ad.read_h5ad(ints)
    h.X = h.X.astype(np.float32) * 0.5
    h.write_h5ad(halved)
    inputs = (halved, ints) if float_first else (ints, halved)
    paths = [ingest_one([p], tmp_path / f"{p.stem}.store", allow_non_integer=True) for p in inputs]
    dtypes = [Store.open(p).manifest.count_dtype for p in paths]
    at_float = 0 if float_first else 1
    assert dtypes[at_float] == "float32" and dtypes[1 - at_float].startswith("uint")
    n = [Store.open(p).n_cells for p in paths]
    plan = SamplerConfig(batch_size=25, remainder="pad", **PLAN)
    own = [{}, {}]
    for s, path in enumerate(paths):
        for batch in Loader(path, plan, mode="local"):
            own[s].update(zip(batch["index"].tolist(), batch["X"].numpy()))
    seen = np.zeros(2, dtype=int)
    for batch in Loader(Mix([Source(p, k) for p, k in zip(paths, n)]), plan, mode="local"):
        for x, i, s in zip(batch["X"].numpy(), batch["index"].tolist(), batch["source"].tolist()):
            assert np.array_equal(x, own[s][i])
            seen[s] += 1
    assert (seen >= n).all()
    assert any((x % 1).any() for x in own[at_float].values())  # the halves are there to lose


def test_a_mix_read_through_zarr_gives_the_batches_of_direct_reads(stores):
    """With direct reads off every source is read through zarr-python and copied into the buffer's pool, where
    direct reads decode the sources of the run's vocabulary in place: the batches are the same, cell for cell."""
    plan = SamplerConfig(batch_size=64, **PLAN)
    mix = mix_of(stores, epoch_cells=EPOCH)
    direct_loader = Loader(mix, plan, mode="local", output="dense")
    direct = list(direct_loader)
    stats = direct_loader.decode_stats()  # every source's decoding, summed
    assert stats["decoded"] >= stats["used"] > 0
    through_zarr = list(Loader(mix, plan, mode="local", output="dense", reading=ReadOptions(direct_io=False)))
    assert len(direct) == len(through_zarr) == EPOCH // 64
    for a, b in zip(direct, through_zarr):
        assert torch.equal(a["index"], b["index"]) and torch.equal(a["source"], b["source"])
        assert torch.equal(a["X"], b["X"])
    assert any(b["X"].any() for b in direct)


@pytest.fixture(scope="module", params=[1024, 512], ids=["one chunk size", "another chunk size for one"])
def one_vocabulary(request, tiny_h5ads, tmp_path_factory) -> tuple[list[Path], list]:
    """One input's 700 cells cut into three stores of one vocabulary and dtypes, in input order, the last one's
    chunks of `request.param` values; and the three parts."""
    import anndata

    d = tmp_path_factory.mktemp("one-vocabulary")
    whole = anndata.read_h5ad(tiny_h5ads[0])
    parts = [whole[rows].copy() for rows in np.array_split(np.arange(whole.n_obs), 3)]
    stores = []
    for i, part in enumerate(parts):
        part.write_h5ad(d / f"part{i}.h5ad")
        chunk = request.param if i == 2 else 1024
        out = d / f"part{i}.store"
        stores.append(ingest_one([d / f"part{i}.h5ad"], out, shuffle=False, chunk_elements=chunk))
    return stores, parts


def test_stores_of_one_vocabulary_are_read_as_one_store(one_vocabulary):
    """Sources of the run's genes and one dtype pair are planned and decoded as one store's shards (one pool, one
    decoding call, cells in order as decoded); a buffer with a source of another chunk size is planned source by
    source. Either way every cell is its source's row, and the batches are those of zarr-python's path, which copies
    each source into the pool."""
    stores, parts = one_vocabulary
    plan = SamplerConfig(batch_size=64, **PLAN)
    mix = mix_of(stores, epoch_cells=EPOCH)
    loader = Loader(mix, plan, mode="local", output="dense")
    batches = list(loader)
    blocks = loader._reader.blocks
    one_size = Store.open(stores[2]).manifest.chunk_elements == Store.open(stores[0]).manifest.chunk_elements
    by_source = sum(p.stats["used"] for p in blocks.parts)  # cells decoded on the general path
    assert blocks._joined_stats["used"] > 0 and (by_source == 0) == one_size
    assert max(len(torch.unique(b["source"])) for b in batches) == 3  # buffers of all three sources
    for b in batches:
        want = np.stack([parts[s].X[i].toarray()[0] for s, i in zip(b["source"].tolist(), b["index"].tolist())])
        np.testing.assert_array_equal(b["X"].numpy(), want)
    through_zarr = list(Loader(mix, plan, mode="local", output="dense", reading=ReadOptions(direct_io=False)))
    assert len(batches) == len(through_zarr) == EPOCH // 64
    for a, b in zip(batches, through_zarr):
        assert torch.equal(a["index"], b["index"]) and torch.equal(a["source"], b["source"])
        assert torch.equal(a["X"], b["X"])


def test_balance_by_over_the_union_of_categories_with_ranks_and_readers(stores):
    """Each store holds one dataset: their categories are mapped onto the union, and balance_by equalises them
    whatever the weights, on every rank."""
    plan = SamplerConfig(batch_size=32, balance_by="dataset", block_size=16, buffer_blocks=16)
    codes = []
    for rank in range(2):
        loader = Loader(
            mix_of(stores, epoch_cells=4 * EPOCH),
            plan,
            rank=rank,
            world_size=2,
            mode="local",
            obs_keys=("dataset",),
            reading=ReadOptions(readers=2),
        )
        got = epoch(loader, "dataset")
        names = np.array(loader.mix.categories("dataset"))[got["dataset"]]
        assert all(names == [f"ds{(2, 1, 0)[s]}" for s in got["source"]])  # each source's own dataset
        codes.append(got["dataset"])
    share = np.bincount(np.concatenate(codes), minlength=3) / len(np.concatenate(codes))
    assert np.all(np.abs(share - 1 / 3) < 0.05), share  # unbalanced, the weights would give 0.5 / 0.3 / 0.2


@pytest.mark.parametrize("output", ["dense", "csr"])
def test_ray_reader_actors_give_a_mix_the_batches_threads_give(stores, ray_local, output):
    """mode="ray": each reader actor opens the mix itself (its stores by path, the run's genes and categories) and
    hands batches over in shared memory; the batches are those of mode="local", byte for byte."""
    plan = SamplerConfig(batch_size=32, balance_by="dataset", seed=5, **PLAN)

    def batches(mode: str) -> tuple[list[dict], int]:
        reading = ReadOptions(readers=2, cpus_per_reader=0.25)
        kw = dict(rank=1, world_size=2, output=output, obs_keys=("cell_type",), mode=mode, reading=reading)
        with Loader(mix_of(stores, epoch_cells=EPOCH), plan, **kw) as loader:
            out = [
                {k: (v.to_dense() if k == "X" and output == "csr" else v).clone() for k, v in b.items()} for b in loader
            ]
            return out, len(loader.reader_processes())

    local, ray_batches = batches("local"), batches("ray")
    assert local[1] == 0 and ray_batches[1] == 2, "threads read the first, two reader actors the second"
    assert len(local[0]) == len(ray_batches[0]) > 0
    for a, b in zip(local[0], ray_batches[0]):
        assert a.keys() == b.keys() and {"X", "index", "source", "cell_type"} <= a.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    assert local[0][0]["X"].shape[1] == Mix([Source(s) for s in stores]).open().n_genes  # the union vocabulary


@pytest.mark.parametrize(
    ("mix", "message"),
    [
        (lambda s: Mix([]), "at least one source"),
        (lambda s: Mix([Source(s[0], 0.0)]), r"sources\[0\].weight is 0.0: expected a positive number"),
        (lambda s: Mix([Source(s[0], 1.0), Source("/no/such.store", 1.0)]), "no.such.store"),
    ],
)
def test_bad_mixes_are_one_line_errors(stores, mix, message):
    with pytest.raises(CellrayError, match=message) as e:
        Loader(mix(stores), SamplerConfig(batch_size=8), mode="local")
    assert "\n" not in str(e.value)
