"""Errors that reach users. The CLI prints `str(err)` and exits with `err.exit_code`; never a traceback."""


class V4CError(Exception):
    """A problem with the user's input or files, explained in the message."""

    exit_code = 2


class ArtifactError(V4CError):
    """An artifact is missing, corrupt, or from an incompatible producer."""


class InputError(V4CError):
    """Bad token ids, an empty prompt, or a prompt longer than the planned context."""
