"""wait_for: returns the first truthy value, bounded by its timeout."""

from __future__ import annotations

import time

import pytest
from cyphonic_testbed import TestbedTimeout, wait_for


def test_returns_first_truthy_value() -> None:
    calls = iter([0, None, [], "ok", "later"])
    assert wait_for(lambda: next(calls), 2.0, interval=0.001) == "ok"


def test_times_out_with_the_message_and_is_a_timeout_error() -> None:
    start = time.monotonic()
    with pytest.raises(TimeoutError, match="the moon") as info:
        wait_for(lambda: False, 0.2, interval=0.02, message="the moon")
    assert isinstance(info.value, TestbedTimeout)
    assert 0.2 <= time.monotonic() - start < 1.0
