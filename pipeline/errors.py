"""Errors the user can act on. The CLI prints their message (no traceback) and exits with status 2."""


class PipelineError(Exception):
    """Base class: a problem with the user's input, files or machine, stated so the user can fix it."""


class DataError(PipelineError):
    """Raw or processed data is missing, malformed or inconsistent; the message names file, line or field."""


class DeviceError(PipelineError):
    """The requested device (e.g. ``--device gpu``) is not available on this machine."""


class ArtifactError(PipelineError):
    """A saved artifact (workflow, model, schema) is missing, corrupt, or does not belong with another."""
