"""Where the recipe's configs are: ``fairseq-hydra-train --config-dir $(python -m dphubert_fairseq.packaged_configs)``.

``--user-dir`` prints the plugin's folder, for ``common.user_dir=`` where fairseq cannot find the plugin by the
configs' ``common.user_dir: dphubert_fairseq`` (see docs/install.md). The folders come from ``config_paths``, a
module of its own so that the package, which imports that one, has not imported this one when ``python -m``
runs it.
"""

import argparse
import sys
from typing import List, Optional

from .config_paths import config_dir, user_dir


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
