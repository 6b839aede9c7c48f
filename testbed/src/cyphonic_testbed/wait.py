"""Bounded waiting."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

from cyphonic_testbed.errors import TestbedTimeout

T = TypeVar("T")


def wait_for(
    predicate: Callable[[], T],
    timeout: float,
    *,
    interval: float = 0.05,
    message: str | None = None,
) -> T:
    """Call ``predicate`` until it returns something truthy and return that value.

    Raises ``TestbedTimeout`` (a ``TimeoutError``) after ``timeout`` seconds; the predicate is
    always called at least once, and once more at the deadline.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            what = message or getattr(predicate, "__name__", "condition")
            raise TestbedTimeout(f"timed out after {timeout:.1f}s waiting for {what}")
        time.sleep(min(interval, remaining))
