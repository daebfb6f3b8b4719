"""What distill prints by default, and what only with ``--verbose``.

A sweep's console says what matters: its plan, one line per prepared search, one progress line per finished trial,
failures in full, the final table and where things are. Cache reuse, per-step and per-trial detail go through
``say``, printed only when verbose (``set_verbose(True)``; the flag travels to Ray's worker processes as
``DISTILL_VERBOSE``, and the trial functions and workers set it again from their own config)."""
from __future__ import annotations

import os

ENV = "DISTILL_VERBOSE"


def set_verbose(on: bool) -> None:
    os.environ[ENV] = "1" if on else "0"


def verbose() -> bool:
    return os.environ.get(ENV) == "1"


def say(message: str) -> None:
    """Print `message` only when verbose."""
    if verbose():
        print(message, flush=True)
