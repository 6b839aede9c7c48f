"""The endpoint's one timer: a callback at a loop-time deadline, precise below a millisecond.

asyncio sleeps in its selector, whose timeout has whole-millisecond steps: a deadline
0.2 ms away (a pacing gap) costs a full millisecond. Polling such deadlines instead
(one ``epoll_wait(0)`` per loop iteration) holds a CPU for up to a millisecond after every
packet, since an ACK delay is a deadline of that size; on a small machine the peer process
waiting for that CPU is what the round trip then measures (docs/performance.md). On Linux
a timerfd in the event loop wakes the loop at the deadline to the microsecond, with the
CPU free in between; elsewhere ``loop.call_at`` does, a millisecond late at worst.

Only one deadline is pending at a time: ``arm`` replaces it, ``arm(None)`` clears it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import math
import os
import sys
from collections.abc import Callable
from typing import Protocol

__all__ = ["DeadlineTimer", "open_deadline_timer"]


class DeadlineTimer(Protocol):
    """Calls its callback once the loop time reaches the armed deadline."""

    def arm(self, when: float | None) -> None:
        """Fire at loop time ``when`` (at once if past); None clears the deadline."""

    def close(self) -> None:
        """Clear the deadline and release what the timer holds."""


class LoopTimer:
    """``loop.call_at``: portable, with the selector's millisecond steps."""

    def __init__(self, loop: asyncio.AbstractEventLoop, callback: Callable[[], None]) -> None:
        self._loop = loop
        self._callback = callback
        self._handle: asyncio.TimerHandle | None = None

    def arm(self, when: float | None) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        if when is not None:
            self._handle = self._loop.call_at(when, self._fire)

    def _fire(self) -> None:
        self._handle = None
        self._callback()

    def close(self) -> None:
        self.arm(None)


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


_CLOCK_MONOTONIC = 1
_TFD_NONBLOCK = os.O_NONBLOCK
_TFD_CLOEXEC = os.O_CLOEXEC


def _libc() -> ctypes.CDLL | None:
    if sys.platform != "linux":
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        create, settime = libc.timerfd_create, libc.timerfd_settime
    except (OSError, AttributeError):
        return None
    create.argtypes = [ctypes.c_int, ctypes.c_int]
    create.restype = ctypes.c_int
    settime.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.POINTER(_Itimerspec), ctypes.c_void_p]
    settime.restype = ctypes.c_int
    return libc


_LIBC = _libc()


class TimerFdTimer:
    """A timerfd (CLOCK_MONOTONIC, relative times) read by the event loop (Linux)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, callback: Callable[[], None]) -> None:
        assert _LIBC is not None
        fd = _LIBC.timerfd_create(_CLOCK_MONOTONIC, _TFD_NONBLOCK | _TFD_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        self._fd = fd
        self._loop = loop
        self._callback = callback
        self._settime = _LIBC.timerfd_settime
        self._spec = _Itimerspec()
        self._spec_ref = ctypes.byref(self._spec)
        self._armed = False
        loop.add_reader(fd, self._on_readable)

    def arm(self, when: float | None) -> None:
        if self._fd < 0:
            return  # closed
        value = self._spec.it_value
        if when is None:
            if not self._armed:
                return
            value.tv_sec = value.tv_nsec = 0  # all zero: disarm
            self._armed = False
        else:
            # Relative to now on the loop's clock; at least 1 ns (zero would disarm).
            ns = max(1, math.ceil((when - self._loop.time()) * 1e9))
            value.tv_sec, value.tv_nsec = divmod(ns, 1_000_000_000)
            self._armed = True
        if self._settime(self._fd, 0, self._spec_ref, None) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))

    def _on_readable(self) -> None:
        try:
            os.read(self._fd, 8)  # the expiry count; reading clears readiness
        except BlockingIOError:
            return  # re-armed since it became readable: not due any more
        self._armed = False
        self._callback()

    def close(self) -> None:
        if self._fd < 0:
            return
        self._loop.remove_reader(self._fd)
        os.close(self._fd)
        self._fd = -1
        self._armed = False


def open_deadline_timer(
    loop: asyncio.AbstractEventLoop, callback: Callable[[], None]
) -> DeadlineTimer:
    """A timerfd-backed timer where the platform offers one, else ``loop.call_at``."""
    if _LIBC is not None:
        with contextlib.suppress(OSError):
            return TimerFdTimer(loop, callback)
    return LoopTimer(loop, callback)
