"""The endpoint's deadline timer (timerfd on Linux, ``loop.call_at`` elsewhere) on a real loop."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Callable

import pytest
from cyphonic.quic.deadline import DeadlineTimer, LoopTimer, TimerFdTimer, open_deadline_timer

pytestmark = pytest.mark.timeout(10)

KINDS: list[Callable[[asyncio.AbstractEventLoop, Callable[[], None]], DeadlineTimer]] = [
    LoopTimer,
    open_deadline_timer,
]


def test_linux_gets_the_timerfd() -> None:
    if sys.platform != "linux":
        pytest.skip("timerfd is Linux only")

    async def main() -> None:
        timer = open_deadline_timer(asyncio.get_running_loop(), lambda: None)
        try:
            assert isinstance(timer, TimerFdTimer)
        finally:
            timer.close()

    asyncio.run(main())


@pytest.mark.parametrize("kind", KINDS)
async def test_fires_once_not_before_the_deadline(kind: Callable[..., DeadlineTimer]) -> None:
    loop = asyncio.get_running_loop()
    fired: list[float] = []
    done = asyncio.Event()

    def callback() -> None:
        fired.append(loop.time())
        done.set()

    timer = kind(loop, callback)
    try:
        when = loop.time() + 0.0003  # under the selector's millisecond step
        timer.arm(when)
        await asyncio.wait_for(done.wait(), 2)
        await asyncio.sleep(0.01)  # a second firing would show up here
        assert len(fired) == 1
        assert fired[0] >= when
    finally:
        timer.close()


@pytest.mark.parametrize("kind", KINDS)
async def test_rearm_replaces_and_none_clears(kind: Callable[..., DeadlineTimer]) -> None:
    loop = asyncio.get_running_loop()
    fired: list[float] = []
    timer = kind(loop, lambda: fired.append(loop.time()))
    try:
        timer.arm(loop.time() + 0.001)
        later = loop.time() + 0.02
        timer.arm(later)  # replaces the first deadline
        await asyncio.sleep(0.01)
        assert fired == []
        await asyncio.sleep(0.03)
        assert len(fired) == 1 and fired[0] >= later
        timer.arm(loop.time() + 0.001)
        timer.arm(None)
        await asyncio.sleep(0.02)
        assert len(fired) == 1
    finally:
        timer.close()


@pytest.mark.parametrize("kind", KINDS)
async def test_past_deadline_fires_at_once(kind: Callable[..., DeadlineTimer]) -> None:
    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    timer = kind(loop, done.set)
    try:
        timer.arm(loop.time() - 5)
        await asyncio.wait_for(done.wait(), 2)
    finally:
        timer.close()


async def test_timerfd_closed_releases_the_descriptor_and_ignores_arming() -> None:
    if sys.platform != "linux":
        pytest.skip("timerfd is Linux only")
    loop = asyncio.get_running_loop()
    fired: list[int] = []
    timer = TimerFdTimer(loop, lambda: fired.append(1))
    fd = timer._fd
    timer.arm(loop.time() + 0.001)
    timer.close()
    timer.close()  # twice is fine
    with pytest.raises(OSError):
        os.fstat(fd)  # closed (nothing else reuses it in this single-threaded test)
    timer.arm(loop.time())  # no-op after close, no EBADF
    await asyncio.sleep(0.01)
    assert fired == []
