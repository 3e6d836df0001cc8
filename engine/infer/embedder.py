"""The inference actor: loads a checkpoint once and computes, writes and commits parts of the output.

An `Embedder` is built from a `Plan` (what the driver resolved: checkpoint, store, transforms, gene and category
mapping). Ray builds a restarted actor from the same Plan, so what a run decides later (the output's layout, its
fingerprint, its arrays) comes with each part as a `Run`. Per part: read the cells straight from the store's
chunks, map genes and obs categories onto the checkpoint's, run the training transforms (without masking) and the
model batch by batch, then write, rename and commit the part (engine.infer.parts).
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from engine.errors import InferError
from engine.infer.parts import Layout, PartsOutput, checksum
from engine.infer.predict import (
    OBSM_KEY,
    PRED_KEY,
    PRED_PROB_KEY,
    PROBA_KEY,
    Head,
    classifier_head,
    predictions,
    probabilities,
)
from engine.infer.vocab import GeneMap, obs_codes
from engine.loading.tensors import copy_stream, to_torch
from engine.preprocess.transforms import Pipeline, parse_spec
from engine.store.format import CSRBlock, Store
from engine.train.checkpoint import load_checkpoint

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Plan:
    """What an actor is built from, resolved once by the driver (small: O(genes + shards)). A restarted actor is
    built from it again, so it holds nothing that the run decides later (that comes with each part: `Run`)."""

    checkpoint: str
    store: str
    transforms: list
    pipeline_store: str | None  # the store whose vocabulary and statistics the transforms bind to; None: no store
    genes: GeneMap
    categories: dict[str, list[str] | None]  # obs key the model reads -> training categories (None: numeric)
    out: str  # the output being built
    batch_size: int
    threads: int  # torch threads per actor (0: torch's default, for executor: local)
    use_gpu: bool
    fault_part: int | None = None
    part_delay_s: float = 0.0


@dataclass(frozen=True)
class Run:
    """The output a part belongs to: its layout, the run's fingerprint and the per-cell arrays it writes."""

    layout: Layout
    fingerprint: str
    rows: tuple[str, ...]


def inference_transforms(transforms: list, vocabulary: dict | None = None) -> list:
    """The training transforms minus masking (inference sees every value); a gene selection as the checkpoint
    recorded its genes (`selected_genes`, by id: no statistics needed to select them again)."""
    selected = (vocabulary or {}).get("selected_genes")
    out = []
    for t, step in zip(transforms, parse_spec(transforms)):
        if step.name == "mask":
            continue
        out.append({"select_genes": {"genes": selected}} if step.name == "select_genes" and selected else t)
    return out


_STATS_STEPS = ("rank_tokens", "scale")


def needs_stats(transforms: list) -> bool:
    """Whether a transform spec reads the store's gene statistics (HVGs, moments, medians, median library size)."""
    for step in parse_spec(transforms):
        median_library = step.name == "normalize_total" and step.params["target_sum"] is None
        if step.name in _STATS_STEPS or (step.name == "select_genes" and step.params["hvg"]) or median_library:
            return True
    return False


@dataclass
class _Vocabulary:
    """A stand-in store for transforms that need only the gene vocabulary (the training store is gone)."""

    gene_ids: pd.Index
    path: str = "checkpoint vocabulary"

    @property
    def n_genes(self) -> int:
        return len(self.gene_ids)


class Embedder:
    """Loads a checkpoint once; computes and writes parts of the output. A Ray actor in `run_embed`."""

    def __init__(self, plan: Plan, actor_index: int = 0):
        import torch

        from engine.loading.chunks import StoreBlocks
        from engine.store import chunk_kernel

        if plan.threads:
            torch.set_num_threads(plan.threads)
        self.plan = plan
        self.device = torch.device("cuda") if plan.use_gpu and torch.cuda.is_available() else torch.device("cpu")
        if plan.use_gpu and self.device.type == "cpu":
            log.warning("a GPU was asked for, but torch sees no CUDA device here: running on CPU")
        self.model, self.meta = load_checkpoint(plan.checkpoint)
        self.model.to(self.device)
        self._copy_stream = copy_stream(self.device)  # CUDA: a batch is copied while the previous one computes
        self.store = Store.open(plan.store)
        self.blocks = StoreBlocks(self.store)
        chunk_kernel.warm()  # numba's start-up here, not inside the first part's time
        bind: Any = (
            Store.open(plan.pipeline_store)
            if plan.pipeline_store
            else _Vocabulary(pd.Index(self.meta["vocabulary"]["genes"]))
        )
        self.pipeline = Pipeline.from_spec(plan.transforms, bind) if plan.transforms else None
        self.obs_keys = tuple(plan.categories)
        self.head = classifier_head(self.model, plan.categories)
        self.output = PartsOutput(plan.out)
        self._obs_cache: collections.OrderedDict[int, pd.DataFrame] = collections.OrderedDict()
        # An actor runs two parts at once (max_concurrency=2): one computes while the other writes its output.
        # The model runs for one part at a time, so an actor keeps to about its one CPU or GPU.
        self._compute_lock = threading.Lock()
        self._obs_lock = threading.Lock()
        self.actor_index = actor_index
        self._metrics = _Metrics(actor_index)
        self.compute(0, min(2, self.store.n_cells))  # warm up (numba's kernels, torch's first call) before any part

    # -- reading

    def _segments(self, start: int, stop: int) -> np.ndarray:
        """Rows (shard, first, stop) covering global cells [start, stop) in store order."""
        offsets = self.store.cell_offsets
        segs = []
        shard = int(np.searchsorted(offsets, start, side="right") - 1)
        while start < stop:
            hi = min(stop, int(offsets[shard + 1]))
            segs.append((shard, start - int(offsets[shard]), hi - int(offsets[shard])))
            start, shard = hi, shard + 1
        return np.asarray(segs, dtype=np.int64).reshape(-1, 3)

    def _obs(self, start: int, stop: int) -> pd.DataFrame:
        parts = []
        for shard, a, b in self._segments(start, stop):
            shard = int(shard)
            with self._obs_lock:
                if shard not in self._obs_cache:
                    self._obs_cache[shard] = self.store.read_obs(shard)
                    while len(self._obs_cache) > 2:
                        self._obs_cache.popitem(last=False)
                obs = self._obs_cache[shard]
            parts.append(obs.iloc[a:b])
        return pd.concat(parts) if len(parts) > 1 else parts[0]

    def _batch(self, start: int, stop: int, codes: dict[str, np.ndarray]) -> dict:
        """Cells [start, stop) of the store (global ids), with their obs codes, as the model's torch batch."""
        indptr, indices, data = self.blocks.read(self._segments(start, stop))
        block = self.plan.genes.apply(CSRBlock(indptr=indptr, indices=indices, data=data, n_genes=self.store.n_genes))
        index = np.arange(start, stop, dtype=np.int64)
        out = self.pipeline(block, index) if self.pipeline is not None else {"X": block}
        cuda = self.device.type == "cuda"
        if not cuda and isinstance(out["X"], CSRBlock):  # on CPU scipy densifies ~2x faster than torch's sparse CSR
            out = {**out, "X": _dense(out["X"])}
        return to_torch({**out, **codes, "index": index}, self.obs_keys, device=self.device, stream=self._copy_stream)

    # -- computing

    def compute(self, start: int, stop: int, obs: pd.DataFrame | None = None) -> dict[str, np.ndarray]:
        """The model's outputs for cells [start, stop): embedding, and class probabilities for a classifier."""
        import torch

        obs = self._obs(start, stop) if obs is None else obs
        codes = {k: obs_codes(obs, k, cats) for k, cats in self.plan.categories.items()}
        embs, probas = [], []
        with self._compute_lock, torch.inference_mode():
            for a in range(start, stop, self.plan.batch_size):
                b = min(stop, a + self.plan.batch_size)
                # read on the host while the device still computes the previous batch: outputs stay where they
                # are computed until the part's last batch is queued
                batch = self._batch(a, b, {k: v[a - start : b - start] for k, v in codes.items()})
                embs.append(self.model.embed(batch).float())
                if self.head is not None:
                    probas.append(probabilities(self.model, batch))
            out = {OBSM_KEY: torch.cat(embs).cpu().numpy()}
            if probas:
                out[PROBA_KEY] = torch.cat(probas).cpu().numpy()
        return out

    def describe(self) -> tuple[dict[str, int], Head | None]:
        """Output widths (from the model run on the store's first cells) and the classifier head, if any."""
        out = self.compute(0, min(2, self.store.n_cells))
        return {k: int(v.shape[1]) for k, v in out.items()}, self.head

    def run_part(self, part: int, run: Run) -> dict[str, Any]:
        """Compute, write and commit one part; returns its commit record."""
        t0, started = time.perf_counter(), time.time()
        plan = self.plan
        start, stop = run.layout.bounds(part)
        obs = self._obs(start, stop).copy()
        out = self.compute(start, stop, obs)
        head = self.head
        if head is not None:
            pred, prob = predictions(out[PROBA_KEY], len(head.categories))
            obs[PRED_KEY] = pd.Categorical.from_codes(pred, categories=head.categories)
            obs[PRED_PROB_KEY] = prob
        arrays = self.output.obs_arrays(obs)
        arrays.update({f"obsm/{k}": v for k, v in out.items()})
        missing = set(run.rows) ^ set(arrays)
        if missing:
            raise InferError(f"{plan.out}: part {part} does not match the output's arrays ({sorted(missing)})")
        record = {
            "fingerprint": run.fingerprint,
            "checksum": checksum(out),
            "started": started,
            "compute_s": round(time.perf_counter() - t0, 4),
        }

        def before_commit() -> None:
            if plan.part_delay_s:
                time.sleep(plan.part_delay_s)
            if plan.fault_part == part:
                marker = Path(plan.out) / ".cellray" / f"fault-{part}"
                if not marker.exists():
                    marker.touch()
                    os._exit(1)  # an actor lost after renaming its chunks, before committing them

        record = self.output.write_part(part, run.layout, arrays, record, before_commit)
        self._metrics.part(stop - start, time.perf_counter() - t0)
        return record


def _dense(block: CSRBlock) -> np.ndarray:
    """A CSR block as a dense float32 matrix (what the models' `dense_x` would make of it)."""
    import scipy.sparse as sp

    data = block.data if block.data.dtype == np.float32 else block.data.astype(np.float32)
    return sp.csr_matrix((data, block.indices, block.indptr), shape=(block.n_cells, block.n_genes)).toarray()


class _Metrics:
    """cellray_embed_* series on Ray's metrics endpoint (the dashboard), tagged by actor."""

    def __init__(self, actor_index: int):
        self.enabled = False
        try:
            import ray

            if not ray.is_initialized():
                return
            from ray.util.metrics import Counter, Gauge, Histogram

            tags = ("actor",)
            self.cells = Counter("cellray_embed_cells", "cells embedded and committed", tags)
            self.parts = Counter("cellray_embed_parts", "output parts committed", tags)
            self.rate = Gauge("cellray_embed_cells_per_s", "cells per second of the last part", tags)
            self.seconds = Histogram("cellray_embed_part_seconds", "seconds per part", [1, 5, 15, 60, 300, 1200], tags)
            self.tags = {"actor": str(actor_index)}
            self.enabled = True
        except Exception as e:  # metrics are an aid, never a reason to fail
            log.debug("no metrics: %s", e)

    def part(self, n_cells: int, seconds: float) -> None:
        if not self.enabled:
            return
        self.cells.inc(n_cells, self.tags)
        self.parts.inc(1, self.tags)
        self.rate.set(n_cells / max(seconds, 1e-9), self.tags)
        self.seconds.observe(seconds, self.tags)
