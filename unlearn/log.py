"""The one logger: progress and messages go to stderr, results to stdout (never mixed).

Functions that report progress take a `log` callable defaulting to `log` here, so that a
caller can silence them (`quiet`) without global state.
"""

from __future__ import annotations

import sys


def log(message: str) -> None:
    if sys.stderr is None:  # closed (2>&-): print would write to stdout, where only the result goes
        return
    print(message, file=sys.stderr, flush=True)


def quiet(message: str) -> None:
    """A `log` that drops everything (background measurements, rank > 0)."""
