"""Job specs: a YAML file parsed into its kind's typed configuration, errors naming the file and field path.

`kind:` picks the config class (jobs/kinds/: pretrain, embed, stats, ingest, sleep). Relative paths are relative to
the directory the command runs in.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import yaml

from engine.atomic import read_text
from engine.errors import SpecError
from engine.objects import store_path
from jobs.kinds import KINDS

if TYPE_CHECKING:
    from jobs.kinds import JobSpec


def parse_spec(raw: Any, source: str = "spec") -> JobSpec:
    """Validate a spec dict; every problem is reported as `source: field.path: message`."""
    if not isinstance(raw, dict):
        raise SpecError(f"{source}: expected a mapping with 'kind', 'name', 'data', 'model', got {type(raw).__name__}")
    kind = raw.get("kind")
    if kind not in KINDS:
        raise SpecError(f"{source}: kind: is {kind!r}, expected one of {sorted(KINDS)}")
    return KINDS[kind].config.parse(raw, source).model_copy(update={"source": source})


def load_spec(path: str | os.PathLike) -> JobSpec:
    """Read and validate a YAML job spec (its fields; `check_spec` checks its data too)."""
    path = store_path(path)  # a file, or an object in a bucket (a scheduler's state dir there)
    try:
        text = read_text(path)
    except FileNotFoundError:
        raise SpecError(f"{path}: no such job spec") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise SpecError(f"{path}: not valid YAML ({e})") from None
    return parse_spec(raw, source=str(path))


def check_spec(spec: JobSpec) -> str:
    """Check a spec against its data (a pretrain spec's store, obs keys, transforms, model sizes) without running
    it; returns a one-line description."""
    return KINDS[spec.kind].check(spec)
