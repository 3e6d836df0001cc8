"""What a run reads: its store, its transform pipeline, and the data summary each model sizes itself from."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import models
from engine.errors import CellrayError, SpecError
from engine.loading.mixing import Mix, OpenMix, Source
from engine.loading.sampler import Sampler, SamplerConfig
from engine.objects import ObjectPath, store_path
from engine.preprocess.transforms import Pipeline
from engine.store.format import Store
from engine.train.config import DataConfig, PretrainConfig


@dataclass
class RunData:
    store: Store  # the store, or a mix's first
    pipeline: Pipeline | None
    model_config: dict[str, Any]  # the model's config with the data-dependent sizes filled in
    mix: OpenMix | None = None  # data.sources: the stores, the run's genes and categories

    @property
    def source(self) -> str | Mix:
        """What every worker's Loader reads: the store's absolute path, or the mix of absolute paths."""
        if self.mix is None:
            return str(self.store.path.resolve())
        m = self.mix.mix
        paths = [Source(str(st.path.resolve()), s.weight) for st, s in zip(self.mix.stores, m.sources)]
        return Mix(paths, m.epoch_cells, m.genes)


def open_store(config: PretrainConfig, field: str, path: str) -> Store:
    """The store a spec names, or an error naming the field."""
    try:
        where = store_path(path)
        if not isinstance(where, ObjectPath) and not where.exists():
            raise SpecError(f"{config.where(field)}: no such store {str(where)!r} (run `cellray ingest` first)")
        return Store.open(where)
    except SpecError:
        raise
    except CellrayError as e:
        raise SpecError(f"{config.where(field)}: {e}") from None


def open_run_data(config: PretrainConfig) -> RunData:
    """Check the data section against its store(s) (stores, obs keys, transforms) and size the model from it."""
    d = config.data
    mix = None
    if d.sources is None:
        store = open_store(config, "data.store", d.store)
    else:
        stores = [open_store(config, f"data.sources[{i}].store", s.store) for i, s in enumerate(d.sources)]
        try:
            mix = Mix([Source(st, s.weight) for st, s in zip(stores, d.sources)], d.epoch_cells, d.genes).open()
        except CellrayError as e:
            raise SpecError(f"{config.where('data.sources')}: {e}") from None
        store = stores[0]
    for st in mix.stores if mix is not None else [store]:
        schema = st.manifest.obs_schema
        missing = [k for k in d.obs_keys if k not in schema]
        if missing:
            raise SpecError(
                f"{config.where('data.obs_keys')}: the store{'' if mix is None else f' {st.path}'} has no obs "
                f"column(s) {missing}; it has {list(schema)}"
            )
    for key in config.model.obs_keys():
        if key not in d.obs_keys:
            raise SpecError(
                f"{config.where('model.config')}: the model reads obs column {key!r}: list it in data.obs_keys too"
            )
    check_progress(config, store, mix)
    pipeline = build_pipeline(config, store if mix is None else mix.vocabulary_store)
    summary = data_summary(store, pipeline, mix)
    return RunData(store=store, pipeline=pipeline, model_config=resolve_model_config(config, summary), mix=mix)


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


def check_progress(config: PretrainConfig, store: Store, mix: OpenMix | None = None) -> None:
    """Refuse a run that can make no progress: a rank whose share of the training split is less than one batch
    (it would loop over empty epochs forever)."""
    world = max(1, config.resources.max_workers)
    try:
        plan = sampler_config(config.data, "train")
    except CellrayError as e:
        raise SpecError(f"{config.where('data.loader')}: {e}") from None
    balance = plan.balance_by
    for st in mix.stores if mix is not None else [store]:
        if balance is not None and "categories" not in st.manifest.obs_schema.get(balance, {}):
            raise SpecError(
                f"{config.where('data.loader.balance_by')}: {balance!r} is not a categorical obs column of the store "
                f"{st.path}; it has {list(st.manifest.obs_schema)}"
            )
    try:  # the class weights need a pass over the obs codes: the workers do it, the count here needs none
        unbalanced = plan.model_copy(update={"balance_by": None, "class_weights": None})
        train = Sampler.for_store(store, unbalanced) if mix is None else mix.sampler(unbalanced)
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


def build_pipeline(config: PretrainConfig, store: Store | None) -> Pipeline | None:
    """The data.transforms pipeline for `store` (None when empty), errors naming data.transforms. With data.sources,
    `store` is one whose vocabulary is the run's, or None: then only steps that need no store's statistics work."""
    if not config.data.transforms:
        return None
    try:
        return Pipeline.from_spec(config.data.transforms, store)
    except CellrayError as e:
        hint = "" if store is not None else " (data.sources of different vocabularies: no store's statistics apply)"
        raise SpecError(f"{config.where('data.transforms')}: {e}{hint}") from None
    except (ValueError, KeyError, TypeError) as e:
        raise SpecError(f"{config.where('data.transforms')}: {e}") from None


def data_summary(store: Store, pipeline: Pipeline | None, mix: OpenMix | None = None) -> models.DataSummary:
    """What a model may know of its data: input width, obs categories, the tokeniser's parameters."""
    if mix is None:
        schema = store.manifest.obs_schema
        categories = {k: len(v["categories"]) if "categories" in v else None for k, v in schema.items()}
        n_in = store.n_genes
    else:
        keys = set.intersection(*(set(st.manifest.obs_schema) for st in mix.stores))
        categories = {k: None if (c := mix.categories(k)) is None else len(c) for k in sorted(keys)}
        n_in = mix.n_genes
    tokeniser, n_bins, offset = None, None, 0
    if pipeline is not None and pipeline.binning is not None:
        tokeniser, n_bins = "binning", int(pipeline.binning.params["n_bins"])
        offset = int(pipeline.binning.params["offset"])
    elif pipeline is not None and pipeline.rank is not None:
        tokeniser, offset = "rank", int(pipeline.rank.params["offset"])
    width = pipeline.n_genes_out if pipeline is not None and pipeline.bound else n_in
    return models.DataSummary(
        n_genes=width, obs_categories=categories, tokeniser=tokeniser, n_bins=n_bins, token_offset=offset
    )


def resolve_model_config(config: PretrainConfig, summary: models.DataSummary) -> dict[str, Any]:
    """The model's config with the sizes that come from the data filled in (each model knows which)."""
    import dataclasses

    try:
        resolved = models.make_config(config.model.name, config.model.config).resolve(summary)
    except (ValueError, models.ModelError) as e:
        raise SpecError(f"{config.where('model.config')}: {e}") from None
    return dataclasses.asdict(resolved)
