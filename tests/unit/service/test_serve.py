"""``cyphonic.service.serve``: start in order, run until a signal, stop in reverse order."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest
from cyphonic.service import serve, stop_on_signals


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
