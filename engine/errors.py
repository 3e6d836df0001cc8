"""Every error cellray raises on purpose. Each message names the file, the field and what was expected.

The CLI prints a CellrayError as one line (`error: ...`) and exits with status 2; anything else is a bug.
`cellray_cause` finds the CellrayError behind Ray's wrappers: every caller of Ray unwraps through it.
"""

from __future__ import annotations

from collections.abc import Iterator


class CellrayError(Exception):
    """Base of every error cellray raises on purpose."""


class ConfigError(CellrayError, ValueError):
    """A configuration value that cannot work."""


class InputError(CellrayError):
    """An input file cannot be ingested as it is."""


class StoreError(CellrayError):
    """A store is missing, malformed, or of another format version."""


class MissingObjectError(StoreError, FileNotFoundError):
    """An object in a bucket (or the bucket) that is not there."""


class StatsError(CellrayError):
    """Statistics are missing, stale, or cannot be computed with these settings."""


class TransformError(CellrayError):
    """A transform spec that cannot run on this store."""


class SamplerError(CellrayError):
    """Sampler settings that cannot produce a valid plan."""


class LoaderError(CellrayError):
    """A loader that cannot be built or resumed as asked."""


class TrainError(CellrayError):
    """A training run that cannot start or cannot resume."""


class InferError(CellrayError):
    """An inference run (embeddings, predictions) that cannot run as asked."""


class SpecError(ConfigError):
    """A job spec that cannot run as written (jobs/ parses specs into engine configs)."""


class ClusterError(CellrayError):
    """A local cluster that cannot start or stop as asked, or a cluster.yaml that cannot work."""


class SchedulerError(CellrayError):
    """A job the scheduler refuses (it can never fit, unknown id, ...) or a scheduler that cannot be reached."""


def causes(error: BaseException) -> Iterator[BaseException]:
    """`error` and every exception behind it, nearest first: Ray's wrappers (a task's or actor's RayTaskError
    `.cause`; Ray Train's WorkerGroupError `.worker_failures` and ControllerError `.controller_failure`) and the
    chain Python itself would print (`__cause__`, else `__context__` unless suppressed). Duck-typed: no Ray import."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [error]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        cause = getattr(e, "cause", None)
        if not isinstance(cause, BaseException):  # a RayTaskError is also an instance of its cause's class: skip it
            yield e
        wrapped = [cause, getattr(e, "controller_failure", None)]
        todo += [w for w in wrapped if isinstance(w, BaseException)]
        todo.append(e.__cause__ or (None if e.__suppress_context__ else e.__context__))
        failures = getattr(e, "worker_failures", None)
        if isinstance(failures, dict):
            todo += [f for f in failures.values() if isinstance(f, BaseException)]


def cellray_cause(error: BaseException) -> CellrayError | None:
    """The CellrayError behind a Ray task, actor or training error (or `error` itself), without its traceback;
    None when no CellrayError is behind it (a lost process, a bug)."""
    found = next((e for e in causes(error) if isinstance(e, CellrayError)), None)
    return None if found is None else found.with_traceback(None)
