"""Errors the plugin raises for bad input."""


class CheckpointError(ValueError):
    """A checkpoint cannot be used. The message is one line that names the file and the problem."""
