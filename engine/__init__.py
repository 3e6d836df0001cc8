"""cellray's engine: the stages of the data flow, one sub-package each, in the order data moves through them.

    store/       the on-disk format, ingest (h5ad/zarr -> sharded store), verify
    preprocess/  numba kernels, per-cell transforms, corpus-wide gene statistics (an offline stage)
    loading/     sampler (read plan) -> chunks (direct chunk reads) -> readers (Ray actors) -> loader (batches)
    train/       pretraining on Ray Train: config, driver, worker loop, checkpoint, metrics
    infer/       embeddings of every cell from a checkpoint

plus runtime.py (where work runs: in-process or Ray), errors.py, config.py (the config base) and the shared
helpers atomic.py, hashing.py, progress.py. A stage imports only the stages above it in this list.

The public entry points are importable from here without importing torch or Ray up front:
`Store`, `open_anndata`, `ingest`, `Pipeline`, `compute_stats`, `Loader` (with `SamplerConfig`, `ReadOptions`),
`pretrain`, `embed`.
"""

from __future__ import annotations

import importlib
from typing import Any

_PUBLIC = {
    "Store": "engine.store.format",
    "ingest": "engine.store.ingest",
    "IngestConfig": "engine.store.ingest",
    "verify_store": "engine.store.verify",
    "open_anndata": "engine.store.lazy",
    "Pipeline": "engine.preprocess.transforms",
    "compute_stats": "engine.preprocess.stats",
    "StatsConfig": "engine.preprocess.stats",
    "load_stats": "engine.preprocess.stats",
    "Loader": "engine.loading.loader",
    "SamplerConfig": "engine.loading.sampler",
    "ReadOptions": "engine.loading.readers",
    "PretrainConfig": "engine.train.config",
    "pretrain": "engine.train.driver",
    "load_checkpoint": "engine.train.checkpoint",
    "embed": "engine.infer.embed",
    "run_embed": "engine.infer.embed",
    "EmbedConfig": "engine.infer.config",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
