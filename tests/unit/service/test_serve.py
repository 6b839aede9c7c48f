"""``cyphonic.service.serve``: start in order, run until a signal, stop in reverse order."""

from __future__ import annotations

import asyncio
import gc
import os
import signal
from collections.abc import Iterator

import pytest
from cyphonic.service import COLLECTOR_THRESHOLDS, serve, stop_on_signals


@pytest.fixture(autouse=True)
def collector() -> Iterator[None]:
    """``serve`` settles the collector of its process: the test session's is put back."""
    thresholds = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*thresholds)


class Part:
    def __init__(self, name: str, log: list[str], *, fail: bool = False) -> None:
        self.name, self.log, self.fail = name, log, fail

    async def start(self) -> None:
        self.log.append(f"start {self.name}")
        if self.fail:
            raise OSError(f"{self.name} cannot bind")

    async def stop(self) -> None:
        self.log.append(f"stop {self.name}")


async def test_runs_until_sigterm_and_stops_in_reverse_order() -> None:
    log: list[str] = []

    def started() -> None:
        log.append("serving")
        asyncio.get_running_loop().call_soon(os.kill, os.getpid(), signal.SIGTERM)

    await asyncio.wait_for(serve(Part("a", log), Part("b", log), on_started=started), 5)
    assert log == ["start a", "start b", "serving", "stop b", "stop a"]
    # The handlers are gone afterwards: the default SIGTERM action is back.
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


async def test_once_started_the_start_up_heap_is_frozen_and_collections_are_rarer() -> None:
    gc.unfreeze()
    seen: dict[str, object] = {}

    def started() -> None:
        seen["thresholds"] = gc.get_threshold()
        seen["frozen"] = gc.get_freeze_count()
        seen["part_frozen"] = not any(o is part for o in gc.get_objects())
        stop.set()

    stop = asyncio.Event()
    part = Part("a", [])
    await asyncio.wait_for(serve(part, on_started=started, stop=stop), 5)
    assert seen["thresholds"] == COLLECTOR_THRESHOLDS
    assert isinstance(seen["frozen"], int) and seen["frozen"] > 1000
    # What the service built before it served is out of every collection.
    assert seen["part_frozen"] is True


async def test_a_failed_start_stops_what_was_attempted() -> None:
    log: list[str] = []
    with pytest.raises(OSError, match="b cannot bind"):
        await serve(Part("a", log), Part("b", log, fail=True), Part("c", log))
    assert log == ["start a", "start b", "stop b", "stop a"]


async def test_an_explicit_stop_event_ends_it_too() -> None:
    log: list[str] = []
    stop = asyncio.Event()
    asyncio.get_running_loop().call_later(0.05, stop.set)
    await asyncio.wait_for(serve(Part("a", log), stop=stop), 5)
    assert log == ["start a", "stop a"]


async def test_stop_on_signals_sets_its_event_on_sigint() -> None:
    async with stop_on_signals() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        await asyncio.wait_for(stop.wait(), 5)
    assert stop.is_set()
