"""One style of configuration for every engine stage: frozen pydantic models that refuse unknown fields.

Construction validates; a bad value raises the stage's own error class (a CellrayError) with one line per
problem, `where: field.path: what was expected`. Integer fields refuse booleans (YAML's `true` is not 1); no number
may be inf or NaN (YAML's `.inf`, `.nan`), in a typed field or in a free-form mapping (a model's config).
"""

from __future__ import annotations

import contextvars
import math
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from engine.errors import ConfigError

_WHERE: contextvars.ContextVar[str | None] = contextvars.ContextVar("cellray_config_where", default=None)


def field_path(loc: tuple) -> str:
    """pydantic's error location as `a.b[2].c`."""
    parts: list[str] = []
    for p in loc:
        parts.append(f"[{p}]" if isinstance(p, int) else ("." if parts else "") + str(p))
    return "".join(parts)


def describe(error: ValidationError, where: str) -> str:
    """One line per problem: `where: field.path: message`."""
    lines = []
    for err in error.errors():
        msg = err["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
        path = field_path(err["loc"])
        lines.append(f"{where}: {path}: {msg}" if path else f"{where}: {msg}")
    return "\n".join(lines)


def non_finite(raw: Any, loc: tuple = ()) -> tuple[tuple, float] | None:
    """(where, value) of the first inf or NaN in nested mappings and lists, or None."""
    if isinstance(raw, float) and not math.isfinite(raw):
        return loc, raw
    items = raw.items() if isinstance(raw, dict) else enumerate(raw) if isinstance(raw, (list, tuple)) else ()
    for key, value in items:
        if (found := non_finite(value, (*loc, key))) is not None:
            return found
    return None


def _is_int_field(annotation: Any) -> bool:
    text = str(annotation)
    return annotation is int or text in ("int", "int | None", "typing.Optional[int]", "Optional[int]")


class Section(BaseModel):
    """A config or a section nested in one: frozen, unknown fields refused, integers never booleans."""

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True, allow_inf_nan=False)
    error: ClassVar[type[Exception]] = ConfigError

    @model_validator(mode="before")
    @classmethod
    def _no_bool_for_int(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for name, info in cls.model_fields.items():
                if isinstance(data.get(name), bool) and _is_int_field(info.annotation):
                    raise ValueError(f"{name}: expected an integer, got {data[name]!r}")
        return data


class Config(Section):
    """A top-level config: constructing one with bad values raises the stage's `error` (a CellrayError)."""

    def __init__(self, **data: Any):
        try:
            super().__init__(**data)
        except ValidationError as e:
            raise self.error(describe(e, _WHERE.get() or type(self).__name__)) from None

    @classmethod
    def parse(cls, raw: Any, where: str):
        """Validate a mapping (e.g. from YAML); errors name `where` (a file) and the field path."""
        if not isinstance(raw, dict) or not all(isinstance(k, str) for k in raw):
            raise cls.error(f"{where}: expected a mapping of field names, got {type(raw).__name__}")
        if (bad := non_finite(raw)) is not None:
            raise cls.error(f"{where}: {field_path(bad[0])}: {bad[1]!r} is not a finite number")
        token = _WHERE.set(where)
        try:
            return cls(**raw)
        finally:
            _WHERE.reset(token)
