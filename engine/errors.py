"""Errors users see. Each message names the file, the field and what was expected."""


class CellrayError(Exception):
    """Base of every error cellray raises on purpose; the CLI prints it and exits with status 2."""


class StoreError(CellrayError):
    """A store is missing, malformed, or of another format version."""


class InputError(CellrayError):
    """An input file cannot be ingested as it is."""
