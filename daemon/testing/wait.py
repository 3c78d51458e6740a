"""``wait_for``: poll a condition with a deadline; never a fixed sleep."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class WaitTimeout(AssertionError, TimeoutError):
    """``wait_for`` ran out of time: a failed assertion in a test, a TimeoutError in a script."""


def wait_for(condition: Callable[[], T], timeout: float = 10.0, interval: float = 0.01, what: str = "condition") -> T:
    """Poll ``condition`` until it returns something truthy (returned); WaitTimeout after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise WaitTimeout(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)
