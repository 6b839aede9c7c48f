"""The skeleton every long-running component shares: run until SIGTERM/SIGINT, and report
bad settings without ever printing what was given.

A service's CLI builds its settings (``describe_settings_error`` if that fails), builds its
parts in its composition root, then ``await serve(part, ...)``: the parts start in order,
run until a signal, and stop in reverse order, also when starting one of them fails. Once
they have started, ``settle_collector`` sets the cyclic garbage collector for a server's
heap.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import re
import signal
import sys
from collections.abc import AsyncIterator, Callable
from typing import Protocol

from pydantic import ValidationError

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)

COLLECTOR_THRESHOLDS = (10_000, 10, 10)
"""``gc.set_threshold`` for a server: a young collection every 10,000 net allocations of
container objects (CPython's default is 700), so a full collection is considered every
1,000,000 instead of every 70,000."""

# ``scheme://user:secret@host`` and ``scheme://:secret@host``: what survives of a URL
# that a validator message might quote.
_URL_CREDENTIALS = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*://)[^/\s@'\"]*@")


class Component(Protocol):
    """Anything ``serve`` can run: an admin server, a QUIC service, a whole replica."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


@contextlib.asynccontextmanager
async def stop_on_signals() -> AsyncIterator[asyncio.Event]:
    """An event that SIGTERM or SIGINT sets while the block runs (handlers removed after)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, stop.set)
    try:
        yield stop
    finally:
        for sig in STOP_SIGNALS:
            loop.remove_signal_handler(sig)


async def serve(
    *components: Component,
    on_started: Callable[[], None] | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Start ``components`` in order, wait for SIGTERM/SIGINT (or ``stop``), then stop every
    component whose start was attempted, in reverse order."""
    async with stop_on_signals() as signalled:
        attempted: list[Component] = []
        try:
            for component in components:
                attempted.append(component)
                await component.start()
            settle_collector()
            if on_started is not None:
                on_started()
            waits = [asyncio.ensure_future(signalled.wait())]
            if stop is not None:
                waits.append(asyncio.ensure_future(stop.wait()))
            try:
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for wait in waits:
                    wait.cancel()
        finally:
            for component in reversed(attempted):
                await component.stop()


def settle_collector() -> None:
    """Set the cyclic garbage collector for a server whose heap is mostly long-lived
    connections. What exists after start-up (modules, settings, pools) lives as long as the
    process: frozen out of every collection (``gc.freeze``). A full collection scans every
    connection the process holds: 0.6-1.0 s each in an NMS replica of 5,000-10,000 nodes,
    its event loop stopped meanwhile; with CPython's thresholds it ran 15 times in a
    replica that registered 5,000 nodes and took 5,000 more in a reconnect storm (7.3 s
    of collection in all) and came at the rate of registrations, since every connection
    is new long-lived objects. ``COLLECTOR_THRESHOLDS`` make collections of every
    generation about 14 times rarer; garbage in reference cycles (a closed connection's)
    is still collected, later."""
    gc.freeze()
    gc.set_threshold(*COLLECTOR_THRESHOLDS)


def describe_settings_error(exc: Exception) -> str:
    """What is wrong with the settings, naming fields but never the values given (they may
    be database or Redis URLs with passwords, or tokens)."""
    if isinstance(exc, ValidationError):
        text = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'settings'}: {e['msg']}"
            for e in exc.errors(include_url=False, include_input=False, include_context=False)
        )
    else:
        text = str(exc)
    return _URL_CREDENTIALS.sub(r"\1***@", text)


def print_settings_error(prog: str, exc: Exception) -> int:
    """Print ``prog: bad settings: ...`` to stderr; returns the exit status (2)."""
    print(f"{prog}: bad settings: {describe_settings_error(exc)}", file=sys.stderr)
    return 2
