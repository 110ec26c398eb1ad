"""Errors raised by tiergate's workers.

The hierarchy::

    TiergateError
    ├── InputError             bad input from a user; the CLI exits with code 2
    │   ├── RecordError        one record of a file is bad (carries its line number)
    │   └── DataFileError      a whole input file is unusable (missing column, unreadable)
    └── ModelError             the model directory cannot be used
        ├── ModelNotFoundError     no model directory, or a file missing from it
        └── ModelIntegrityError    a corrupt manifest or a file whose hash does not match

Every error keeps its constructor arguments in ``args`` so it survives pickling (Celery carries
errors between processes).
"""

from __future__ import annotations

from pathlib import Path


class TiergateError(Exception):
    """Base class of every error tiergate raises on purpose."""


class InputError(TiergateError):
    """Input that tiergate cannot accept; the message names the problem."""


class RecordError(InputError):
    """One record of an input file is invalid.

    Attributes:
        line: the 1-based line number where the record starts.
        reason: what is wrong with it.
    """

    def __init__(self, line: int, reason: str) -> None:
        super().__init__(line, reason)
        self.line = line
        self.reason = reason

    def __str__(self) -> str:
        return f"line {self.line}: {self.reason}"


class DataFileError(InputError):
    """An input file as a whole cannot be read (missing, unreadable, lacking a column)."""


class ModelError(TiergateError):
    """The model directory cannot be used."""

    def __init__(self, path: Path | str, reason: str) -> None:
        super().__init__(str(path), reason)
        self.path = str(path)
        self.reason = reason

    def __str__(self) -> str:
        return f"model at {self.path}: {self.reason}"


class ModelNotFoundError(ModelError):
    """The model directory or one of its files does not exist."""


class ModelIntegrityError(ModelError):
    """The manifest is corrupt or a file does not match the hash the manifest records."""
