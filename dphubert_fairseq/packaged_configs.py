"""Where the recipe's configs are: ``fairseq-hydra-train --config-dir $(python -m dphubert_fairseq.packaged_configs)``.

In a source checkout (an editable install included) that is the checkout's ``configs/``, the source of truth;
in an installed wheel, the copy of it that ``setup.py`` put into the package (``dphubert_fairseq/configs``).
``--user-dir`` prints the plugin's folder, for ``common.user_dir=`` where fairseq cannot find the plugin by the
configs' ``common.user_dir: dphubert_fairseq`` (see docs/install.md).
"""

import argparse
import os
import sys
from typing import List, Optional

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


def main(argv: Optional[List[str]] = None) -> int:
    """Print :func:`config_dir` (or, with ``--user-dir``, :func:`user_dir`); ``--help`` says so (exit 0), an
    unknown argument gets the usage line (exit 2)."""
    parser = argparse.ArgumentParser(
        prog="python -m dphubert_fairseq.packaged_configs",
        description="Print the folder of the recipe's configs (for fairseq-hydra-train --config-dir).",
    )
    parser.add_argument(
        "--user-dir", action="store_true", help="print the plugin's folder instead (for common.user_dir=)"
    )
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    print(user_dir() if args.user_dir else config_dir())
    return 0


if __name__ == "__main__":
    sys.exit(main())
