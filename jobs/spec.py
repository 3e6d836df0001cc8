"""Job specs: a YAML file parsed into the engine's typed run configuration, errors naming the file and field path.

`kind: pretrain` specs become `engine.train.config.PretrainConfig` (see its docstring for the fields); the other
kinds (embed, stats, ingest, sleep) are listed in jobs/kinds.py. Relative paths are relative to the directory the
command runs in.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from engine.errors import SpecError
from jobs.kinds import KINDS as _KINDS

if TYPE_CHECKING:
    from jobs.kinds import JobSpec


class _Configs(dict):
    """kind -> its config class, imported on first use (a `kind: sleep` job never imports torch)."""

    def __getitem__(self, kind: str) -> Any:
        value = super().__getitem__(kind)
        return value.config if hasattr(value, "config_path") else value


KINDS = _Configs(_KINDS)


def parse_spec(raw: Any, source: str = "spec") -> JobSpec:
    """Validate a spec dict; every problem is reported as `source: field.path: message`."""
    if not isinstance(raw, dict):
        raise SpecError(f"{source}: expected a mapping with 'kind', 'name', 'data', 'model', got {type(raw).__name__}")
    kind = raw.get("kind")
    if kind not in KINDS:
        raise SpecError(f"{source}: kind: is {kind!r}, expected one of {sorted(KINDS)}")
    return KINDS[kind].parse(raw, source).model_copy(update={"source": source})


def load_spec(path: str | os.PathLike, check_data: bool = True) -> JobSpec:
    """Read and validate a YAML job spec; with `check_data`, also its store, obs keys and transforms."""
    path = Path(path)
    if not path.exists():
        raise SpecError(f"{path}: no such job spec")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise SpecError(f"{path}: not valid YAML ({e})") from None
    spec = parse_spec(raw, source=str(path))
    if check_data and spec.kind == "pretrain":
        from engine.train.data import open_run_data

        open_run_data(spec)
    return spec
