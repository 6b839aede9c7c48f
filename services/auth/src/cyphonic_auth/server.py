"""The AS's composition root: one running AS (``start``/``stop``), the same shape as
``cyphonic_nms.server.NmsServer`` and ``cyphonic_trs.service.TrsService``; the CLI runs it
with ``cyphonic.service.serve``.

    registry engine (migrated if asked) -> AuthService (node CA, registry, metrics)
      -> admin REST (enrolment, revocation)  -> QUIC signalling (Login, Renew)
"""

from __future__ import annotations

from typing import Any

from cyphonic.admin import AdminServer
from cyphonic.log import get_logger
from cyphonic.registry import db
from prometheus_client import CollectorRegistry

from cyphonic_auth.api import create_app
from cyphonic_auth.config import AuthSettings
from cyphonic_auth.service import AuthMetrics, AuthService, NodeCa
from cyphonic_auth.signalling import AsSignallingServer, start_signalling
from cyphonic_auth.storage import SqlNodeRegistry


def build_service(settings: AuthSettings, engine: Any) -> AuthService:
    """The AS's domain service on a registry engine (also used by the one-shot commands)."""
    return AuthService(
        registry=SqlNodeRegistry(engine),
        node_ca=NodeCa.load(settings),
        settings=settings,
        metrics=AuthMetrics(CollectorRegistry()),
    )


class AsServer:
    """A running AS: admin REST and (``quic``) the QUIC signalling endpoint."""

    def __init__(self, settings: AuthSettings, *, migrate: bool, quic: bool = True) -> None:
        self.settings = settings
        self.migrate = migrate
        self.quic = quic
        self.log = get_logger("as")
        self.service: AuthService | None = None
        self.admin: AdminServer | None = None
        self.signalling: AsSignallingServer | None = None
        self._engine: Any = None

    async def start(self) -> None:
        s = self.settings
        self._engine = db.create_engine(s.database_url)
        if self.migrate:
            await db.upgrade(self._engine)
            self.log.info("database_migrated")
        self.service = build_service(s, self._engine)
        self.admin = AdminServer(
            create_app(self.service), host=s.http_host, port=s.http_port, log_level=s.log_level
        )
        await self.admin.start()
        if not s.nms_endpoints:
            self.log.warning(
                "no_nms_endpoints", hint="logins will answer no NMS; set CYPHONIC_NMS_ENDPOINTS"
            )
        if self.quic:
            self.signalling = await start_signalling(self.service, s)
        token_file = s.admin_token_file
        self.log.info(
            "as_serving",
            http=f"{s.http_host}:{self.admin.port}",
            quic=self.signalling.address if self.signalling else None,
            domain=s.domain,
            admin_token_file=str(token_file) if token_file else None,
        )

    async def stop(self) -> None:
        self.log.info("as_stopping")
        try:
            if self.service is not None:
                self.service.close_watches()  # long-polls end before the REST server stops
            if self.signalling is not None:
                await self.signalling.close()
            if self.admin is not None:
                await self.admin.stop()
        finally:
            if self._engine is not None:
                await self._engine.dispose()
        self.log.info("as_stopped")
