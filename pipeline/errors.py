"""Errors the user can act on. The CLI prints their message (no traceback) and exits with status 2.

``DataError`` and ``UsageError`` also derive from ``ValueError``, so code that catches ``ValueError``
(as it would for any bad value) catches them too.
"""


class PipelineError(Exception):
    """Base class: a problem with the user's input, files or machine, stated so the user can fix it."""


class DataError(PipelineError, ValueError):
    """Raw or processed data is missing, malformed or inconsistent; the message names file, line or field."""


class UsageError(PipelineError, ValueError):
    """A command-line option (or argument) is invalid or would destroy data; the message names the flag."""


class DeviceError(PipelineError):
    """The requested device (e.g. ``--device gpu``) is not available on this machine."""


class ArtifactError(PipelineError):
    """A saved artifact (workflow, model, schema) is missing, corrupt, or does not belong with another."""


class TrainingDiverged(PipelineError):
    """Training produced a non-finite loss or metric; nothing was published."""
