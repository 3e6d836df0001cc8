"""cellray models: pure torch modules behind one registry.

Every model is an ``nn.Module`` built from a frozen config dataclass (``Model.Config``) with

- ``loss(batch, step=None) -> Loss``: the training objective and its named terms, from a loader batch dict;
- ``embed(batch) -> Tensor``: one row per cell;
- optionally ``init_cells`` (an int) and ``init_from_data(batch)``: a start from the data, which the training loop
  gives one batch of ``init_cells`` training cells before the first step (the transformer's gene embeddings).

- ``Config.resolve(DataSummary) -> Config``: the sizes that come from the data filled in;
- ``Config.obs_keys()``: the obs columns the model reads from a batch.

No Ray, DDP or device code lives here: engine/train/ and engine/infer/ wrap these.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from models.base import DataSummary, Loss
from models.probe import Probe
from models.transformer import Transformer
from models.vae import VAE

REGISTRY: dict[str, type[nn.Module]] = {"vae": VAE, "transformer": Transformer, "probe": Probe}


class ModelError(ValueError):
    """An unknown model name or a bad model config (jobs.spec turns it into a field-path error)."""


def names() -> list[str]:
    return sorted(REGISTRY)


def get(name: str) -> type[nn.Module]:
    """The model class registered as `name`; its config dataclass is ``get(name).Config``."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise ModelError(f"unknown model {name!r}: expected one of {names()}") from None


def make_config(name: str, config: dict[str, Any] | None = None, saved: bool = False) -> Any:
    """``get(name).Config(**config)`` with a clear error for unknown keys or wrong values. `saved`: a config a
    checkpoint wrote, whose missing fields take ``Config.FORMER_DEFAULTS`` (the values of fields whose default changed
    after that checkpoint was written) before the current defaults."""
    cls = get(name).Config
    config = {**getattr(cls, "FORMER_DEFAULTS", {}), **(config or {})} if saved else dict(config or {})
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(config) - known)
    if unknown:
        raise ModelError(f"model {name!r} has no config field(s) {unknown}; it has {sorted(known)}")
    try:
        return cls(**config)
    except (TypeError, ValueError) as e:
        raise ModelError(f"model {name!r}: {e}") from e


def build(name: str, config: dict[str, Any] | Any | None = None, saved: bool = False) -> nn.Module:
    """A fresh model from a registry name and a config (dict or the model's Config; `saved`: see make_config)."""
    cls = get(name)
    if not isinstance(config, cls.Config):
        config = make_config(name, config, saved)
    return cls(config)


__all__ = [
    "DataSummary",
    "Loss",
    "ModelError",
    "REGISTRY",
    "build",
    "get",
    "make_config",
    "names",
    "VAE",
    "Transformer",
    "Probe",
]
