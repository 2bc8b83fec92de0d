"""Where the recipe's configs and the plugin are on disk (``dphubert_fairseq.config_dir``; printed by
``python -m dphubert_fairseq.packaged_configs``).

In a source checkout (an editable install included) the configs are the checkout's ``configs/``, the source of
truth; in an installed wheel, the copy of it that ``setup.py`` put into the package (``dphubert_fairseq/configs``).
"""

import os

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def config_dir() -> str:
    """The folder holding ``dphubert.yaml`` and ``dphubert_final.yaml``: the checkout's ``configs/`` when the
    package is imported from a source tree, else the copy shipped in the package."""
    checkout = os.path.join(os.path.dirname(PACKAGE_DIR), "configs")
    if os.path.isfile(os.path.join(checkout, "dphubert.yaml")):
        return checkout
    return os.path.join(PACKAGE_DIR, "configs")


def user_dir() -> str:
    """The plugin's own folder, a value for fairseq's ``common.user_dir`` that works from any directory."""
    return PACKAGE_DIR
