"""The typed configuration of a pretraining run: what `cellray run SPEC.yaml` parses a spec into.

    kind: pretrain
    name: vae-demo
    data: {store: data/demo.store, batch_size: 512, transforms: [], obs_keys: [dataset]}
    # or several stores mixed by weight: data: {sources: [{store: a.store, weight: 0.7}, {store: b.store, weight: 0.3}]}
    model: {name: vae, config: {n_latent: 16}}
    train: {max_steps: 200, lr: 1.0e-3, checkpoint_every: 50, output: runs/vae-demo}
    resources: {workers: 2, cpus_per_worker: 1, gpus_per_worker: 0}   # or elastic: workers: {min: 2, max: 4}
    debug: {trace_dir: null, fault: null}

Every section refuses unknown fields; an error names the file and the field path. Relative paths are relative
to the directory the command runs in.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

import models
from engine.config import Config, Section
from engine.errors import SpecError


class _Section(Section):
    error: ClassVar[type[Exception]] = SpecError


class LoaderOptions(_Section):
    """data.loader: the read plan's and the readers' settings beyond data's own (null: the engine's default)."""

    block_size: int | None = Field(None, gt=0)  # contiguous cells per read (default: picked for the store)
    buffer_blocks: int | None = Field(None, gt=0)  # blocks shuffled together
    remainder: Literal["drop", "pad"] | None = None  # the training split's policy (validation always pads)
    balance_by: str | None = None  # a categorical obs column: class-balanced batches
    class_weights: dict[str, float] | None = None  # with balance_by (default: inverse frequency)
    prefetch: int | None = Field(None, gt=0)  # batches read ahead


class SourceChoice(_Section):
    """One of data.sources: a store and its weight (its share of each epoch is weight / sum of weights)."""

    store: str
    weight: float = Field(1.0, gt=0)


class DataConfig(_Section):
    store: str | None = None  # one store; or, for several mixed by weight:
    sources: list[SourceChoice] | None = Field(None, min_length=1)
    epoch_cells: int | None = Field(None, gt=0)  # with sources: cells per epoch (default: all sources' together)
    genes: list[str] | None = Field(None, min_length=1)  # with sources: the run's genes (default: their union)
    batch_size: int = Field(512, gt=0)  # cells per step and worker
    # Cells per step of all workers together, planned independently of the number of workers (each takes its
    # slice): the same batches at any size. Elastic runs (resources.workers: {min, max}) need it; batch_size is unused.
    global_batch_size: int | None = Field(None, gt=0)
    transforms: list[Any] = Field(default_factory=list)  # engine.preprocess.transforms pipeline steps
    obs_keys: list[str] = Field(default_factory=list)
    val_fraction: float = Field(0.0, ge=0.0, lt=1.0)
    seed: int = 0
    loader: LoaderOptions = Field(default_factory=LoaderOptions)

    @model_validator(mode="after")
    def _one_kind_of_source(self) -> DataConfig:
        if (self.store is None) == (self.sources is None):
            raise ValueError("give either store (one store) or sources (several, mixed by weight), not both")
        if self.sources is None and (self.epoch_cells is not None or self.genes is not None):
            raise ValueError("epoch_cells and genes go with sources (several stores)")
        return self


class ModelChoice(_Section):
    name: str
    config: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in models.REGISTRY:
            raise ValueError(f"unknown model {v!r}: expected one of {models.names()}")
        return v

    @model_validator(mode="after")
    def _config(self) -> ModelChoice:
        try:
            models.make_config(self.name, self.config)
        except models.ModelError as e:
            raise ValueError(str(e)) from None
        return self

    def obs_keys(self) -> tuple[str, ...]:
        """The obs columns this model reads from a batch (the model's config says which)."""
        return models.make_config(self.name, self.config).obs_keys()


class TrainConfig(_Section):
    max_steps: int = Field(200, gt=0)  # optimizer steps; the run ends at max_steps or after `epochs`
    epochs: int | None = Field(None, gt=0)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    warmup_steps: int = Field(0, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)  # the cosine ends at lr * min_lr_ratio
    grad_clip: float = Field(1.0, ge=0)  # 0: off
    grad_accum: int = Field(1, gt=0)
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 autocast on GPU, fp32 on CPU
    checkpoint_every: int = Field(50, gt=0)
    keep_checkpoints: int = Field(2, gt=0)
    report_every: int = Field(10, gt=0)  # metrics to the driver (Ray Train gets them with each checkpoint)
    val_every: int = Field(0, ge=0)  # 0: validate only at the end (when data.val_fraction > 0)
    max_failures: int = Field(2, ge=0)
    seed: int = 0
    output: str = "runs/run"


class WorkerRange(_Section):
    """resources.workers: {min, max}: an elastic run, at as many workers as the cluster holds within the range."""

    min: int = Field(gt=0)
    max: int = Field(gt=0)

    @model_validator(mode="after")
    def _ordered(self) -> WorkerRange:
        if self.min > self.max:
            raise ValueError(f"min ({self.min}) is more than max ({self.max})")
        return self


class ResourcesConfig(_Section):
    workers: int | WorkerRange = Field(1)  # 0: the loop runs in this process (Ray Train local mode)
    cpus_per_worker: float = Field(1.0, ge=0)
    gpus_per_worker: float = Field(0.0, ge=0)
    readers_per_worker: int = Field(1, ge=0)
    cpus_per_reader: float = Field(0.5, ge=0)
    # elastic runs: how often Ray Train looks for room to grow (seconds; it resizes at the next checkpoint report)
    resize_interval_s: float = Field(30.0, gt=0)

    @field_validator("workers", mode="before")
    @classmethod
    def _workers(cls, v: Any) -> Any:
        if isinstance(v, bool) or (isinstance(v, int) and v < 0):
            raise ValueError(
                f"Input should be greater than or equal to 0 (0: in this process), or {{min, max}} (elastic); got {v!r}"
            )
        return v

    @property
    def elastic(self) -> bool:
        return isinstance(self.workers, WorkerRange)

    @property
    def min_workers(self) -> int:
        return self.workers.min if isinstance(self.workers, WorkerRange) else self.workers

    @property
    def max_workers(self) -> int:
        return self.workers.max if isinstance(self.workers, WorkerRange) else self.workers

    def per_worker(self) -> dict[str, float]:
        """What one worker and its readers reserve."""
        cpu = self.cpus_per_worker + self.readers_per_worker * self.cpus_per_reader
        return {"CPU": cpu, "GPU": self.gpus_per_worker}


class FaultConfig(_Section):
    rank: int = Field(ge=0)
    step: int = Field(gt=0)


class DebugConfig(_Section):
    """Drills and traces for tests and debugging; off by default."""

    trace_dir: str | None = None  # every rank logs the cell ids of each step and its final parameters here
    fault: FaultConfig | None = None  # rank `rank` exits hard once, at optimizer step `step`
    min_step_seconds: float = Field(0.0, ge=0)  # pace each step to last at least this long (kill drills mid-run)


class PretrainConfig(Config):
    error: ClassVar[type[Exception]] = SpecError

    kind: Literal["pretrain"] = "pretrain"
    name: str = Field(min_length=1)
    data: DataConfig
    model: ModelChoice
    train: TrainConfig = Field(default_factory=TrainConfig)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    debug: DebugConfig = Field(default_factory=DebugConfig)
    source: str | None = Field(None, exclude=True)  # the YAML file, for error messages

    @model_validator(mode="after")
    def _elastic_needs_a_global_batch(self) -> PretrainConfig:
        if self.resources.elastic and self.data.global_batch_size is None:
            raise ValueError(
                "resources.workers: {min, max} (elastic) needs data.global_batch_size: the batches must not depend "
                "on the number of workers"
            )
        g = self.data.global_batch_size
        if g is not None and g < max(1, self.resources.max_workers):
            raise ValueError(f"data.global_batch_size ({g}) is less than the {self.resources.max_workers} workers")
        return self

    def where(self, field: str) -> str:
        return f"{self.source or 'spec'}: {field}"
