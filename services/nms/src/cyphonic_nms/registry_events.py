"""Wake-ups from the registry: Postgres NOTIFY when the policy or the revocations change.

Migration 0004 adds statement triggers that ``pg_notify('cyphonic_registry', <table>)`` on
writes to ``access_policy`` (a policy document or a node's tags: the revision moves) and
``revocations``: every writer is covered (any NMS replica's admin API, any AS replica, the AS
CLI, SQL by hand), and the notice is sent when the transaction commits, so a replica that
reacts reads what was written. ``RegistryEvents`` holds one asyncpg connection that
LISTENs and calls the handler of the table named; it reconnects after an outage and then
calls every handler once (notices sent meanwhile are lost). It is only a wake-up: what is
applied is still read from the registry, and the replicas keep a slow safety poll.

SQLite (the embedded default, one host) has no NOTIFY: ``for_engine`` returns None there and
the replica relies on changes made through itself and on the safety poll.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Mapping
from typing import Any

from cyphonic.log import get_logger
from sqlalchemy.ext.asyncio import AsyncEngine

log = get_logger("nms.events")

CHANNEL = "cyphonic_registry"
"""The NOTIFY channel of migration 0004; the payload is the table written."""
RETRY_S = 2.0
"""Pause before connecting again after the LISTEN connection failed or was lost."""

Handler = Callable[[], None]


class RegistryEvents:
    """LISTEN on ``CHANNEL`` and call ``handlers[table]`` for each notice (see above)."""

    def __init__(self, dsn: str, handlers: Mapping[str, Handler]) -> None:
        self._dsn = dsn
        self._handlers = dict(handlers)
        self._task: asyncio.Task[None] | None = None
        self.connected = asyncio.Event()
        """Set while LISTENing (tests wait for it)."""

    @classmethod
    def for_engine(
        cls, engine: AsyncEngine | None, handlers: Mapping[str, Handler]
    ) -> RegistryEvents | None:
        """Events for ``engine``'s database, None unless it is Postgres."""
        if engine is None or engine.url.get_backend_name() != "postgresql":
            return None
        dsn = engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
        return cls(dsn, handlers)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="nms-registry-events")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def _notified(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        handler = self._handlers.get(payload)
        if handler is not None:
            handler()

    def _all(self) -> None:
        for handler in self._handlers.values():
            handler()

    async def _run(self) -> None:
        import asyncpg

        failures = 0
        while True:
            conn = None
            lost = asyncio.Event()
            try:
                conn = await asyncpg.connect(self._dsn, timeout=10)
                conn.add_termination_listener(lambda _c, ev=lost: ev.set())
                await conn.add_listener(CHANNEL, self._notified)
                if failures:
                    log.info("registry_events_recovered")
                    self._all()  # what was notified while nobody listened
                failures = 0
                self.connected.set()
                while not lost.is_set():
                    # A dead server without a FIN is noticed by a cheap query now and then.
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(lost.wait(), 60.0)
                    if not lost.is_set():
                        await conn.execute("SELECT 1", timeout=10)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if failures == 0:
                    log.warning("registry_events_lost", error=str(exc) or type(exc).__name__)
            finally:
                self.connected.clear()
                if conn is not None:
                    with contextlib.suppress(Exception):
                        conn.terminate()
            failures += 1
            await asyncio.sleep(RETRY_S)
