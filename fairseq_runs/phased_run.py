"""A run made of numbered phases, every output in one folder: what the quickstart and the comparison share."""

import os
import sys
import threading
import time
from typing import Callable, Dict, Optional, Sequence

from . import REPO, run_logged


class PhasedRun:
    """Prints ``[phase/phases elapsed] what`` as each phase begins; runs fairseq commands with their output in
    ``OUT/logs``. ``say`` may be called from several threads."""

    def __init__(self, out: str, phases: int) -> None:
        self.out = os.path.abspath(out)
        self.phases = phases
        self.phase = 0
        self.started = time.time()
        self._lock = threading.Lock()
        os.makedirs(self.out, exist_ok=True)

    def say(self, line: str) -> None:
        with self._lock:
            print(line, flush=True)

    def begin(self, what: str) -> None:
        self.phase += 1
        self.say(f"[{self.phase}/{self.phases} {time.time() - self.started:5.0f}s] {what}")

    def path(self, *parts: str) -> str:
        """A path inside OUT."""
        return os.path.join(self.out, *parts)

    def logged(
        self,
        cmd: Sequence[str],
        log: str,
        show: Optional[Callable[[str], None]] = None,
        env: Optional[Dict[str, str]] = None,
    ) -> str:
        """Run ``cmd`` from the repository root, its output in ``OUT/logs/<log>``, fairseq's progress records
        passed to ``show`` (default: printed); its output."""
        return run_logged(cmd, self.path("logs", log), cwd=REPO, show=show or self.say, env=env)


def exit_code(run: Callable[[], object], what: str) -> int:
    """Call ``run``; 0, or 1 after printing ``<what> failed: <why>`` to stderr when a phase raised
    RuntimeError (a failed fairseq run: its log's tail is in the message)."""
    try:
        run()
    except RuntimeError as err:
        print(f"{what} failed: {err}", file=sys.stderr)
        return 1
    return 0
