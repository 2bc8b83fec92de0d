"""Patch: fairseq's checkpoint upgrade checks the layout first (``safe_loading.check_layout``).

Target: ``checkpoint_utils._upgrade_state_dict``, which upgrades whatever ``torch.load`` returned and fails
with a bare KeyError / IndexError on a torch file that is not (or not wholly) a fairseq checkpoint; the
wrapper raises ``CheckpointLayoutError`` instead (``checkpoint_read_errors`` adds the file name).
Guard: the upgrade of an empty dict fails with such a bare error.
"""

from fairseq import checkpoint_utils

from ..errors import CheckpointLayoutError
from ..safe_loading import check_layout
from .patch import function_patch


def needed() -> bool:
    try:
        checkpoint_utils._upgrade_state_dict({})
    except (KeyError, IndexError, TypeError, AttributeError):
        return True
    except ValueError:
        return False
    return False


def _checked_upgrade(original):
    def _upgrade_state_dict(state):
        check_layout(state)
        try:
            return original(state)
        except (KeyError, IndexError, TypeError, AttributeError) as err:
            raise CheckpointLayoutError(
                f"an incomplete fairseq checkpoint (upgrading it failed: {type(err).__name__}: {err})"
            ) from None

    return _upgrade_state_dict


PATCH = function_patch(
    "checkpoint_layout_check", checkpoint_utils, "_upgrade_state_dict", needed, _checked_upgrade
)
