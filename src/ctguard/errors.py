"""Errors that the CLI, the web app and the DICOM node turn into one clear line."""

from __future__ import annotations

from pathlib import Path


class InputError(ValueError):
    """Bad input from the user: the CLI prints it on one line and exits with code 2.

    Args:
        problem: what is wrong, in words a user understands.
        path: the file or folder at fault, when there is one.
    """

    def __init__(self, problem: str, path: str | Path | None = None):
        self.problem = problem
        self.path = None if path is None else str(path)
        super().__init__(f"{self.path}: {problem}" if self.path else problem)

    def __reduce__(self):  # from a worker process (the node's screeners, the audit's pool) intact
        return (type(self), (self.problem, self.path))


class ConflictingImages(InputError):
    """Two different images at one place of one series: two versions of the series (an edited copy
    beside its original, under the same UIDs), never screened as one. The DICOM node holds such a
    series whatever ``--on-error`` says: forwarding it would pass the version not screened."""
