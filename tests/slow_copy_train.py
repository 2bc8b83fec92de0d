"""``fairseq-hydra-train`` with slow checkpoint copies, for the kill tests: the copy to checkpoint_last.pt
takes about a second and announces itself, so that a test can kill the run in the middle of it.

    python tests/slow_copy_train.py MARKER_FILE {plugin|stock} FAIRSEQ_HYDRA_TRAIN_ARGS...

``plugin``: the plugin's copy, forced onto its full-copy path (as on a file system without hard links);
``stock``: fairseq's own plain copy over the old file, as without the plugin's fix. Each copy appends
``copying DST`` to MARKER_FILE when it starts and ``copied DST`` when it ends.
"""

import os
import shutil
import sys
import time

CHUNK = 32 * 1024


def _slow_copyfileobj(marker: str, dst: str):
    def copyfileobj(fsrc, fdst, length: int = 0) -> None:
        with open(marker, "a") as m:
            m.write(f"copying {dst}\n")
        while True:
            block = fsrc.read(CHUNK)
            if not block:
                break
            fdst.write(block)
            fdst.flush()
            time.sleep(0.01)
        with open(marker, "a") as m:
            m.write(f"copied {dst}\n")

    return copyfileobj


def main() -> None:
    marker, mode, args = sys.argv[1], sys.argv[2], sys.argv[3:]
    from fairseq import checkpoint_utils
    from fairseq.file_io import PathManager

    import dphubert_fairseq  # noqa: F401  (the plugin's fixes, as common.user_dir would install them)

    if mode == "plugin":

        def no_link(src, dst):
            raise OSError("no hard links here")

        def copyfileobj(fsrc, fdst, length: int = 0) -> None:
            _slow_copyfileobj(marker, fdst.name)(fsrc, fdst, length)

        os.link = no_link
        shutil.copyfileobj = copyfileobj
    elif mode == "stock":

        class StockCopy:
            def __getattr__(self, name):
                return getattr(PathManager, name)

            @staticmethod
            def copy(src: str, dst: str, overwrite: bool = False) -> bool:
                with open(src, "rb") as fsrc, open(dst, "wb") as fdst:  # a plain copy over the old file
                    _slow_copyfileobj(marker, dst)(fsrc, fdst)
                return True

        checkpoint_utils.PathManager = StockCopy()
    else:
        raise SystemExit(f"mode must be plugin or stock, not {mode!r}")

    from fairseq_cli.hydra_train import cli_main

    sys.argv = ["fairseq-hydra-train", *args]
    cli_main()


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main()
