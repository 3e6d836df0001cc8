"""What a run reads: its store, its transform pipeline, and the data summary each model sizes itself from."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import models
from engine.errors import CellrayError, SpecError
from engine.loading.sampler import Sampler, SamplerConfig
from engine.objects import ObjectPath, store_path
from engine.preprocess.transforms import Pipeline
from engine.store.format import Store
from engine.train.config import DataConfig, PretrainConfig


@dataclass
class RunData:
    store: Store
    pipeline: Pipeline | None
    model_config: dict[str, Any]  # the model's config with the data-dependent sizes filled in


def open_run_data(config: PretrainConfig) -> RunData:
    """Check the data section against its store (store, obs keys, transforms) and size the model from it."""
    try:
        where = store_path(config.data.store)
        if not isinstance(where, ObjectPath) and not where.exists():
            raise SpecError(f"{config.where('data.store')}: no such store {str(where)!r} (run `cellray ingest` first)")
        store = Store.open(where)
    except SpecError:
        raise
    except CellrayError as e:
        raise SpecError(f"{config.where('data.store')}: {e}") from None
    schema = store.manifest.obs_schema
    missing = [k for k in config.data.obs_keys if k not in schema]
    if missing:
        raise SpecError(
            f"{config.where('data.obs_keys')}: the store has no obs column(s) {missing}; it has {list(schema)}"
        )
    for key in config.model.obs_keys():
        if key not in config.data.obs_keys:
            raise SpecError(
                f"{config.where('model.config')}: the model reads obs column {key!r}: list it in data.obs_keys too"
            )
    check_progress(config, store)
    pipeline = build_pipeline(config, store)
    return RunData(store=store, pipeline=pipeline, model_config=resolve_model_config(config, store, pipeline))


def sampler_config(data: DataConfig, split: str) -> SamplerConfig:
    """The read plan of the training or validation split: data's settings, then data.loader's (validation is
    never shuffled and always padded, so a small split still gives every rank a batch)."""
    options = data.loader.model_dump(exclude_none=True, exclude={"prefetch"})
    batch = data.batch_size
    if split == "val":
        options.update(remainder="pad", shuffle=False, balance_by=None, class_weights=None)
    elif data.global_batch_size is not None:  # resize-invariant: each worker takes its slice of a global batch
        batch, options["global_batch"] = data.global_batch_size, True
    return SamplerConfig(batch_size=batch, seed=data.seed, split=split, val_fraction=data.val_fraction, **options)


def check_progress(config: PretrainConfig, store: Store) -> None:
    """Refuse a run that can make no progress: a rank whose share of the training split is less than one batch
    (it would loop over empty epochs forever)."""
    world = max(1, config.resources.max_workers)
    try:
        plan = sampler_config(config.data, "train")
    except CellrayError as e:
        raise SpecError(f"{config.where('data.loader')}: {e}") from None
    balance = plan.balance_by
    if balance is not None and "categories" not in store.manifest.obs_schema.get(balance, {}):
        raise SpecError(
            f"{config.where('data.loader.balance_by')}: {balance!r} is not a categorical obs column of the store; "
            f"it has {list(store.manifest.obs_schema)}"
        )
    try:  # the class weights need a pass over the obs codes: the workers do it, the count here needs none
        train = Sampler.for_store(store, plan.model_copy(update={"balance_by": None, "class_weights": None}))
    except CellrayError as e:
        raise SpecError(f"{config.where('data')}: {e}") from None
    n_train = train.n_split_cells
    if train.config.global_batch:
        if train.config.remainder == "drop" and n_train < train.config.batch_size:
            raise SpecError(
                f"{config.where('data.global_batch_size')}: {train.config.batch_size} is more than the training split "
                f"({n_train} cells after data.val_fraction {config.data.val_fraction:g})"
            )
        return
    per_rank = n_train // world
    if train.config.remainder == "drop" and per_rank < config.data.batch_size:
        raise SpecError(
            f"{config.where('data.batch_size')}: {config.data.batch_size} is more than a rank's share of the training "
            f"split ({n_train} cells after data.val_fraction {config.data.val_fraction:g}, over {world} worker(s): "
            f"{per_rank} each): lower data.batch_size or resources.workers"
        )


def build_pipeline(config: PretrainConfig, store: Store) -> Pipeline | None:
    """The data.transforms pipeline for `store` (None when empty), errors naming data.transforms."""
    if not config.data.transforms:
        return None
    try:
        return Pipeline.from_spec(config.data.transforms, store)
    except CellrayError as e:
        raise SpecError(f"{config.where('data.transforms')}: {e}") from None
    except (ValueError, KeyError, TypeError) as e:
        raise SpecError(f"{config.where('data.transforms')}: {e}") from None


def data_summary(store: Store, pipeline: Pipeline | None) -> models.DataSummary:
    """What a model may know of its data: input width, obs categories, the tokeniser's parameters."""
    schema = store.manifest.obs_schema
    categories = {k: len(v["categories"]) if "categories" in v else None for k, v in schema.items()}
    tokeniser, n_bins, offset = None, None, 0
    if pipeline is not None and pipeline.binning is not None:
        tokeniser, n_bins = "binning", int(pipeline.binning.params["n_bins"])
        offset = int(pipeline.binning.params["offset"])
    elif pipeline is not None and pipeline.rank is not None:
        tokeniser, offset = "rank", int(pipeline.rank.params["offset"])
    width = pipeline.n_genes_out if pipeline is not None else store.n_genes
    return models.DataSummary(
        n_genes=width, obs_categories=categories, tokeniser=tokeniser, n_bins=n_bins, token_offset=offset
    )


def resolve_model_config(config: PretrainConfig, store: Store, pipeline: Pipeline | None) -> dict[str, Any]:
    """The model's config with the sizes that come from the data filled in (each model knows which)."""
    import dataclasses

    try:
        resolved = models.make_config(config.model.name, config.model.config).resolve(data_summary(store, pipeline))
    except (ValueError, models.ModelError) as e:
        raise SpecError(f"{config.where('model.config')}: {e}") from None
    return dataclasses.asdict(resolved)
