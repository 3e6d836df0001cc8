"""Job kinds, one module each; `KINDS[name]` is that module's `Kind` (imported on first use, so a `kind: sleep` job
never imports torch):

    pretrain  engine.train.config.PretrainConfig   Ray Train DDP workers + their reader actors
    embed     engine.infer.config.EmbedConfig      inference actors over the store's shards
    stats     jobs.kinds.stats.StatsJob            gene statistics of a store, in a placement group
    ingest    jobs.kinds.ingest.IngestJob          h5ad / AnnData zarr files -> a store, in a placement group
    sleep     jobs.kinds.sleep.SleepJob            holds its resources for a while (cluster and queue checks)

`cellray run SPEC` and a job the scheduler admits both call `KINDS[spec.kind].run(spec, address, progress)`: one path,
so what a kind reports to the dashboard is the same however it was started. The scheduler admits a job only when
its whole demand (`demand`: every bundle, readers included) is free at once. Relative paths in a spec are made
absolute at submit (`resolve_paths`), since a job runs elsewhere.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Annotated, Any, Union

from pydantic import Field

from engine.objects import is_uri
from jobs.kinds.base import NONE, Bundle, Kind

NAMES = ("pretrain", "embed", "stats", "ingest", "sleep")


class _Registry(Mapping[str, Kind]):
    """name -> Kind, each kind's module imported when it is first asked for."""

    def __getitem__(self, name: str) -> Kind:
        if name not in NAMES:
            raise KeyError(name)
        return importlib.import_module(f"jobs.kinds.{name}").KIND

    def __iter__(self) -> Iterator[str]:
        return iter(NAMES)

    def __len__(self) -> int:
        return len(NAMES)


KINDS: Mapping[str, Kind] = _Registry()


def __getattr__(name: str) -> Any:
    """`JobSpec`: the pydantic union of every kind's config, keyed on `kind` (built on first use: it imports all)."""
    if name == "JobSpec":
        configs = tuple(k.config for k in KINDS.values())
        return Annotated[Union[configs], Field(discriminator="kind")]  # noqa: UP007
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def bundles(spec: Any) -> list[Bundle]:
    return [{k: float(v) for k, v in b.items()} for b in KINDS[spec.kind].bundles(spec)]


def demand(spec: Any) -> Bundle:
    """The whole job's resources: the sum of its bundles (the driver's share is one of them or nothing)."""
    out = dict(NONE)
    for b in bundles(spec):
        out = {r: out[r] + b.get(r, 0.0) for r in out}
    return out


def resolve_paths(spec: Any, base: str | Path) -> Any:
    """A copy of `spec` whose local relative paths are absolute (relative to `base`); URIs are kept."""
    base = Path(base)

    def fix(value: Any) -> Any:
        if value is None:
            return None
        if isinstance(value, list):
            return [fix(v) for v in value]
        text = str(value)
        return text if is_uri(text) or Path(text).is_absolute() else str((base / text).resolve())

    def visit(node: Any, parts: list[str]) -> None:  # a list on the way (data.sources): each of its items
        if isinstance(node, list):
            for item in node:
                visit(item, parts)
        elif isinstance(node, dict) and len(parts) == 1:
            node[parts[0]] = fix(node.get(parts[0]))
        elif isinstance(node, dict):
            visit(node.get(parts[0]), parts[1:])

    data = spec.model_dump(mode="json")
    for dotted in KINDS[spec.kind].paths:
        visit(data, dotted.split("."))
    return type(spec).parse(data, spec.source or "spec").model_copy(update={"source": spec.source})
