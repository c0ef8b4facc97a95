"""Waiting for a state, not for a time: poll until a condition holds, failing loudly past a generous deadline."""

from __future__ import annotations

import time
from collections.abc import Callable

DEADLINE_S = 60.0  # only a broken condition waits this long; a busy machine is slow, never this slow


def wait_for(condition: Callable[[], object], what: str, timeout: float = DEADLINE_S, poll: float = 0.01) -> None:
    """Return once condition() is true; AssertionError naming `what` if it is still false after `timeout` s."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"still waiting after {timeout:.0f} s for {what}")
        time.sleep(poll)
