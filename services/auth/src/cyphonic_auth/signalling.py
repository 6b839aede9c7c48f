"""QUIC signalling of the AS: Login and Renew on mutual-TLS connections from nodes.

    node                                   AS (ALPN cyphonic-sig/1, UDP 443)
      | QUIC handshake, client cert = node cert; the endpoint verifies it (node CA, expiry)
      | LoginRequest        ------------->  registry: known serial, same bytes, not revoked,
      |                     <-------------  LoginResponse {fqdn, NMS endpoints, not_after}
      |                                     or Error {UNAUTHENTICATED|REVOKED|EXPIRED|...}
      | RenewRequest {CSR}  ------------->  same checks, CSR names the same FQDN
      |                     <-------------  RenewResponse {new chain}
      | CrlRequest {have}   ------------->  the node CA's CRL (its number only if unchanged)
      |                     <-------------  CrlResponse {number, crl_der}

``answer`` decides one request for a TLS-verified peer; it knows nothing of streams or
sockets. ``start_signalling`` puts it behind the QUIC endpoint, in a ``SignallingSession``
per connection (which maps refusals to typed ``Error`` answers).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cyphonic.errors import UnexpectedMessage
from cyphonic.log import get_logger
from cyphonic.pki import PeerIdentity
from cyphonic.revocation import RegistryRevocations
from cyphonic.signalling_server import SignallingServer
from cyphonic.v1 import signalling_pb2 as pb
from cyphonic.wire.messages import wrap

from cyphonic_auth.config import AuthSettings
from cyphonic_auth.service import AuthService
from cyphonic_auth.storage import SqlNodeRegistry

if TYPE_CHECKING:
    from cyphonic.session import SignallingSession

# Nodes log in, maybe renew, then leave; an idle connection is not kept long.
IDLE_TIMEOUT_S = 60.0


async def answer(service: AuthService, peer: PeerIdentity, request: pb.Envelope) -> pb.Envelope:
    """The answer to one request from ``peer``; raises a ``CyphonicError`` to refuse.

    The signalling session turns a raised error into the typed ``Error`` answer (and any
    other exception into INTERNAL), as for every service.
    """
    body = request.WhichOneof("body")
    if body == "login_request":
        return wrap(await service.login(peer))
    if body == "renew_request":
        return wrap(await service.renew(peer, request.renew_request.csr_der))
    if body == "crl_request":
        return wrap(await service.crl_response(request.crl_request.have_number))
    raise UnexpectedMessage(f"the AS does not answer {body or 'an empty envelope'}")


class AsSignallingServer(SignallingServer):
    """The AS QUIC endpoint: only nodes (node CA chains) are accepted."""

    service_name = "as"

    def __init__(self, service: AuthService) -> None:
        super().__init__()
        self.service = service

    async def start(self, settings: AuthSettings) -> None:
        """Open the endpoint; the service learns the revocation cache (Renew checks it)."""
        registry = self.service.registry
        source = (
            RegistryRevocations(registry.engine)
            if isinstance(registry, SqlNodeRegistry)
            else RegistryRevocations.from_url(settings.database_url)
        )
        await self.open(
            pki_dir=settings.pki_dir,
            host=settings.quic_host,
            port=settings.quic_port,
            revocation_source=source,
            revocation_interval=settings.revocation_refresh_s,
            idle_timeout=IDLE_TIMEOUT_S,
            retry_threshold=settings.quic_retry_threshold,
            max_handshakes=settings.quic_max_handshakes,
        )
        self.service.revocations = self.revocations
        if self.revocations is not None:
            # Revocations by another replica or the CLI, seen in the registry: tell watchers.
            self.revocations.subscribe(self.service.revocations_changed)

    async def handle(self, message: pb.Envelope, session: SignallingSession) -> pb.Envelope | None:
        # Errors raised here become typed Error answers in the session.
        return await answer(self.service, session.peer, message)

    async def close(self) -> None:
        """Close every connection and the socket."""
        if self.revocations is not None and self.service.revocations is self.revocations:
            self.service.revocations = None
        await super().close()


async def start_signalling(service: AuthService, settings: AuthSettings) -> AsSignallingServer:
    """Start the AS QUIC endpoint on ``settings.quic_host``:``quic_port``."""
    server = AsSignallingServer(service)
    await server.start(settings)
    get_logger("as.signalling").info("quic_listening", address=server.address)
    return server
