"""The typed configuration of an inference run (`kind: embed`): what `cellray embed` and job specs parse into.

kind: embed
name: pbmc-embed
checkpoint: runs/vae-demo          # a checkpoint directory, or a run's train.output folder (its latest)
store: data/demo.store
out: runs/vae-demo/embeddings.zarr # AnnData zarr directory (parts per shard); .h5ad assembled on request
batch_size: 1024
part_cells: null                   # cells per output part; null: one store shard (capped at 256 MB of output)
min_gene_overlap: 0.5              # refuse a store holding fewer of the checkpoint's genes than this
resources: {workers: 2, cpus_per_worker: 1, gpus_per_worker: 0}
evaluate: {label_key: cell_type, batch_key: batch, baseline: pca}   # optional: scIB + kNN vs HVG-PCA-50
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from engine.config import Config, Section
from engine.errors import SpecError
from engine.runtime import Executor


class InferResources(Section):
    error: ClassVar[type[Exception]] = SpecError

    workers: int = Field(0, ge=0)  # inference actors; 0: as many as fit the cluster (at most one per shard)
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(0.0, ge=0)  # > 0: one actor per GPU share, the model on the GPU


class InferDebug(Section):
    """Drills for tests: an actor lost mid-part, slow parts (a driver to kill half way)."""

    error: ClassVar[type[Exception]] = SpecError

    fault_part: int | None = Field(None, ge=0)  # the actor writing this part exits hard once, before its commit
    part_delay_s: float = Field(0.0, ge=0)  # each part sleeps this long before its commit


class EvalConfig(Section):
    """What `cellray evaluate` (and an embed job's `evaluate:` section) scores; engine/infer/evaluate.py."""

    error: ClassVar[type[Exception]] = SpecError

    label_key: str = Field(min_length=1)  # obs column of cell types: bio conservation and kNN label transfer
    batch_key: str | None = None  # obs column of batches: batch-correction metrics (absent without it)
    baseline: Literal["pca", "none"] = "pca"  # HVG-PCA-50 of the same cells' counts, scored beside the embedding
    max_cells: int = Field(20_000, gt=0)  # a random sample of labelled cells (scIB's metrics are O(cells^2))
    k: int = Field(15, gt=0)  # kNN label transfer: neighbours ...
    folds: int = Field(5, ge=2)  # ... and cross-validation folds
    n_hvg: int = Field(2000, gt=0)
    n_pcs: int = Field(50, gt=0)
    seed: int = 0


class EmbedConfig(Config):
    error: ClassVar[type[Exception]] = SpecError

    kind: Literal["embed"] = "embed"
    name: str = Field("embed", min_length=1)
    checkpoint: str
    store: str
    out: str
    batch_size: int = Field(1024, gt=0)
    part_cells: int | None = Field(None, gt=0)
    min_gene_overlap: float = Field(0.5, ge=0, le=1)
    overwrite: bool = False
    # "ray": an actor pool; "local": one Embedder in this process (no Ray start-up); "auto": local for stores under
    # engine.runtime.LOCAL_MAX_BYTES of counts when no workers, GPUs or cluster address are asked for, else ray
    executor: Executor = "auto"
    resources: InferResources = Field(default_factory=InferResources)
    debug: InferDebug = Field(default_factory=InferDebug)
    evaluate: EvalConfig | None = None  # scored after the last part (engine.infer.evaluate); OUT.eval.json
    source: str | None = Field(None, exclude=True)  # the YAML file, for error messages

    def where(self, field: str) -> str:
        return f"{self.source or 'spec'}: {field}"
