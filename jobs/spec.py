"""Job specs: a YAML file validated into typed objects, with errors that name the file and the field path.

    kind: pretrain
    name: vae-demo
    data: {store: data/demo.store, batch_size: 512, transforms: [], obs_keys: [dataset]}
    model: {name: vae, config: {n_latent: 16}}
    train: {max_steps: 200, lr: 1.0e-3, checkpoint_every: 50, output: runs/vae-demo}
    resources: {workers: 2, cpus_per_worker: 1, gpus_per_worker: 0}

Relative paths are relative to the directory the command runs in.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

import models
from engine.errors import CellrayError


class SpecError(CellrayError):
    """A job spec that cannot run as written."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataSpec(_Section):
    store: str
    batch_size: int = Field(512, gt=0)
    transforms: list[Any] = Field(default_factory=list)  # engine.transforms pipeline steps, as in its docs
    obs_keys: list[str] = Field(default_factory=list)
    val_fraction: float = Field(0.0, ge=0.0, lt=1.0)
    seed: int = 0
    loader: dict[str, Any] = Field(default_factory=dict)  # extra engine.loader.Loader keyword arguments


class ModelSpec(_Section):
    name: str
    config: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in models.REGISTRY:
            raise ValueError(f"unknown model {v!r}: expected one of {models.names()}")
        return v

    @model_validator(mode="after")
    def _config(self) -> ModelSpec:
        try:
            models.make_config(self.name, self.config)
        except models.ModelError as e:
            raise ValueError(str(e)) from None
        return self


class TrainSpec(_Section):
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


class ResourcesSpec(_Section):
    workers: int = Field(1, ge=0)  # 0: the loop runs in this process (Ray Train local mode)
    cpus_per_worker: float = Field(1.0, ge=0)
    gpus_per_worker: float = Field(0.0, ge=0)
    readers_per_worker: int = Field(1, ge=0)
    cpus_per_reader: float = Field(0.5, ge=0)


class PretrainSpec(_Section):
    kind: Literal["pretrain"]
    name: str = Field(min_length=1)
    data: DataSpec
    model: ModelSpec
    train: TrainSpec = Field(default_factory=TrainSpec)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    source: str | None = Field(None, exclude=True)  # the YAML file, for error messages

    def where(self, field: str) -> str:
        return f"{self.source or 'spec'}: {field}"


def _field_path(loc: tuple) -> str:
    parts: list[str] = []
    for p in loc:
        parts.append(f"[{p}]" if isinstance(p, int) else ("." if parts else "") + str(p))
    return "".join(parts) or "(top level)"


def parse_spec(raw: Any, source: str = "spec") -> PretrainSpec:
    """Validate a spec dict; every problem is reported as `source: field.path: message`."""
    if not isinstance(raw, dict):
        raise SpecError(f"{source}: expected a mapping with 'kind', 'name', 'data', 'model', got {type(raw).__name__}")
    kind = raw.get("kind")
    if kind != "pretrain":
        raise SpecError(f"{source}: kind: is {kind!r}, expected 'pretrain'")
    try:
        spec = PretrainSpec.model_validate(raw)
    except ValidationError as e:
        lines = [f"{source}: {_field_path(err['loc'])}: {err['msg'].removeprefix('Value error, ')}" for err in e.errors()]
        raise SpecError("\n".join(lines)) from None
    return spec.model_copy(update={"source": source})


def load_spec(path: str | os.PathLike, check_data: bool = True) -> PretrainSpec:
    """Read and validate a YAML job spec; with `check_data`, also the store and the transform pipeline."""
    path = Path(path)
    if not path.exists():
        raise SpecError(f"{path}: no such job spec")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise SpecError(f"{path}: not valid YAML ({e})") from None
    spec = parse_spec(raw, source=str(path))
    if check_data:
        check_data_section(spec)
    return spec


def check_data_section(spec: PretrainSpec) -> None:
    """The store exists and has the obs keys; the transforms build against it (unknown steps fail here)."""
    from engine.store import Store

    store_path = Path(spec.data.store)
    if not store_path.exists():
        raise SpecError(f"{spec.where('data.store')}: no such store {str(store_path)!r} (run `cellray ingest` first)")
    try:
        store = Store.open(store_path)
    except CellrayError as e:
        raise SpecError(f"{spec.where('data.store')}: {e}") from None
    missing = [k for k in spec.data.obs_keys if k not in store.manifest.obs_schema]
    if missing:
        raise SpecError(
            f"{spec.where('data.obs_keys')}: the store has no obs column(s) {missing}; it has {list(store.manifest.obs_schema)}"
        )
    for field in ("batch_key", "label_key"):
        key = spec.model.config.get(field)
        if key is not None and key not in spec.data.obs_keys:
            raise SpecError(f"{spec.where(f'model.config.{field}')}: {key!r} must also be listed in data.obs_keys")
    if spec.data.transforms:
        build_pipeline(spec, store)


def build_pipeline(spec: PretrainSpec, store):
    """The data.transforms pipeline for `store` (None when empty), errors naming data.transforms."""
    if not spec.data.transforms:
        return None
    from engine.transforms import Pipeline

    try:
        return Pipeline.from_spec(spec.data.transforms, store)
    except CellrayError as e:
        raise SpecError(f"{spec.where('data.transforms')}: {e}") from None
    except (ValueError, KeyError, TypeError) as e:
        raise SpecError(f"{spec.where('data.transforms')}: {e}") from None
