"""Every error cellray raises on purpose. Each message names the file, the field and what was expected.

The CLI prints a CellrayError as one line (`error: ...`) and exits with status 2; anything else is a bug.
"""


class CellrayError(Exception):
    """Base of every error cellray raises on purpose."""


class ConfigError(CellrayError, ValueError):
    """A configuration value that cannot work."""


class InputError(CellrayError):
    """An input file cannot be ingested as it is."""


class StoreError(CellrayError):
    """A store is missing, malformed, or of another format version."""


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
