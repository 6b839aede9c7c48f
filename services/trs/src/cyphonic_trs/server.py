"""The TRS's composition root: one running replica (``start``/``stop``), the same shape as
``cyphonic_auth.server.AsServer`` and ``cyphonic_nms.server.NmsServer``; the CLI runs it
with ``cyphonic.service.serve``.

    TrsService (CID table, relay core, control plane on the relaying UDP socket)
      -> admin REST (sessions, replicas, metrics) unless ``http`` is off
"""

from __future__ import annotations

from cyphonic.admin import AdminServer
from cyphonic.log import get_logger

from cyphonic_trs.config import TrsSettings
from cyphonic_trs.service import TrsService


class TrsServer:
    """A running TRS replica."""

    def __init__(self, settings: TrsSettings, *, http: bool = True) -> None:
        self.settings = settings
        self.http = http
        self.relay = TrsService(settings)
        self.admin: AdminServer | None = None
        self.log = get_logger("trs")

    async def start(self) -> None:
        s = self.settings
        try:
            await self.relay.start()
            if self.http:
                from cyphonic_trs.api import create_app

                self.admin = AdminServer(
                    create_app(self.relay),
                    host=s.http_host,
                    port=s.http_port,
                    log_level=s.log_level,
                )
                await self.admin.start()
        except BaseException:
            await self.stop()
            raise
        self.log.info(
            "trs_serving",
            replica=s.replica_id,
            http=f"{s.http_host}:{self.admin.port}" if self.admin else None,
        )

    async def stop(self) -> None:
        self.log.info("trs_stopping")
        if self.admin is not None:
            await self.admin.stop()
            self.admin = None
        await self.relay.stop()
