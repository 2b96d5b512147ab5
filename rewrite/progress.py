"""Progress messages on stderr: one printer for the API (``optimize(progress=True)``), the
CLI and the passes, each line stamped with the seconds since it started."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable


class Progress:
    """Prints ``[rewrite   12.3s] message`` to stderr when enabled; silent otherwise."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.start = time.perf_counter()

    def __call__(self, message: str) -> None:
        if self.enabled:
            print(f"[rewrite {time.perf_counter() - self.start:6.1f}s] {message}", file=sys.stderr, flush=True)


def progress_callback(progress: bool | Callable[[str], None]) -> Callable[[str], None] | None:
    """What ``optimize(progress=...)`` reports to: True prints, a callable gets each message."""
    return Progress() if progress is True else (progress or None)


def note(message: str) -> None:
    """A message outside any timed run (e.g. a module planning again at call time)."""
    print(f"[rewrite] {message}", file=sys.stderr, flush=True)
