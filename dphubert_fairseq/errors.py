"""The plugin's one exception family. Every class is a ``ValueError``: callers that catch ``ValueError`` keep
working, and ``DPHuBERTError`` catches everything the plugin raises for bad input. Messages are one line that
names the file or config key and, where there is one, the fix."""


class DPHuBERTError(ValueError):
    """Bad input to the plugin: a file, a config value or a model it cannot use."""


class CheckpointError(DPHuBERTError):
    """A checkpoint cannot be used. The message names the file and the problem."""


class CheckpointLayoutError(CheckpointError):
    """A torch file that is not (wholly) a fairseq checkpoint. Raised where only the loaded object is known;
    fairseq's checkpoint reader re-raises it as a ``CheckpointError`` that names the file."""


class ManifestError(DPHuBERTError):
    """A manifest or an audio file it lists cannot be used; the message names the file and the line. ``line``:
    the manifest line of the entry at fault (0 for the manifest as a whole)."""

    def __init__(self, message: str, line: int = 0) -> None:
        super().__init__(message)
        self.line = line


class ConfigError(DPHuBERTError):
    """A config value (``task.*``, ``model.*``, ``criterion.*``), a command-line argument or an environment
    variable the plugin reads has a value it cannot use; the message names the key."""


class UnsupportedTeacherError(DPHuBERTError):
    """A fairseq model whose architecture the plugin cannot copy (loading a checkpoint of one raises a
    ``CheckpointError`` naming the file)."""
