"""Patch: fairseq's checkpoint reader fails with a one-line ``CheckpointError`` that names the file.

Target: ``checkpoint_utils.load_checkpoint_to_cpu`` (every checkpoint the plugin, the trainer and stock
fine-tuning read). Before reading: a local path's file exists, is a file and starts like a torch checkpoint
(``safe_loading.check_checkpoint_file``; remote paths, ``s3://`` and the like, are left to fairseq's
``PathManager``), and ``DPHUBERT_SAFE_GLOBALS`` is well formed. While reading: a
refused class, a truncated zip and a layout problem become one line (``safe_loading.describe_load_error``).
Guard: the reader does not already fail with a ``ValueError`` naming the file for a missing file.
"""

import os
import tempfile

from fairseq import checkpoint_utils

from ..safe_loading import check_checkpoint_file, check_trusted_globals, read_with_readable_errors
from .patch import function_patch


def needed() -> bool:
    missing = os.path.join(tempfile.gettempdir(), f"dphubert-no-such-checkpoint-{os.getpid()}.pt")
    try:
        checkpoint_utils.load_checkpoint_to_cpu(missing)
    except ValueError as err:
        return missing not in str(err)
    except Exception:  # fairseq main: FileNotFoundError from deep inside
        return True
    return True


def _reader_with_readable_errors(original):
    def load_checkpoint_to_cpu(path, *args, **kwargs):
        check_trusted_globals()
        if "://" not in str(path):  # a remote path (s3://, https://) is fairseq's PathManager's to fetch
            check_checkpoint_file(path)
        return read_with_readable_errors(path, lambda: original(path, *args, **kwargs))

    return load_checkpoint_to_cpu


PATCH = function_patch(
    "checkpoint_read_errors", checkpoint_utils, "load_checkpoint_to_cpu", needed, _reader_with_readable_errors
)
