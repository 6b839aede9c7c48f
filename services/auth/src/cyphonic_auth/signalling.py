"""QUIC signalling of the AS: Login and Renew on mutual-TLS connections from nodes.

``handle_request`` answers one request envelope for a TLS-verified peer; it knows nothing
of streams or sockets. ``start_signalling`` puts it behind the QUIC endpoint.
"""

from __future__ import annotations

from typing import Protocol

from cyphonic.errors import CyphonicError, InternalError, UnexpectedMessage
from cyphonic.log import get_logger
from cyphonic.pki import PeerIdentity
from cyphonic.v1 import signalling_pb2 as pb

from cyphonic_auth.config import AuthSettings
from cyphonic_auth.service import AuthService


async def handle_request(
    service: AuthService, peer: PeerIdentity, request: pb.Envelope
) -> pb.Envelope:
    """The answer to one request from ``peer``: a response or a typed ``Error``."""
    body = request.WhichOneof("body")
    try:
        if body == "login_request":
            return pb.Envelope(version=pb.PROTOCOL_VERSION_1,
                               login_response=await service.login(peer))
        if body == "renew_request":
            return pb.Envelope(version=pb.PROTOCOL_VERSION_1,
                               renew_response=await service.renew(peer,
                                                                  request.renew_request.csr_der))
        raise UnexpectedMessage(f"the AS does not answer {body or 'an empty envelope'}")
    except CyphonicError as exc:
        return pb.Envelope(version=pb.PROTOCOL_VERSION_1, error=exc.to_wire())
    except Exception:
        get_logger("as.signalling").exception("request_failed", fqdn=peer.name, body=body)
        return pb.Envelope(version=pb.PROTOCOL_VERSION_1,
                           error=InternalError("internal error").to_wire())


class SignallingServer(Protocol):
    """A running QUIC signalling endpoint."""

    @property
    def address(self) -> str:
        """Where it listens, host:port."""

    async def close(self) -> None:
        """Stop accepting and close every connection."""


async def start_signalling(service: AuthService, settings: AuthSettings) -> SignallingServer | None:
    """Start the AS QUIC endpoint (None until the QUIC endpoint is part of this build)."""
    get_logger("as.signalling").warning("quic_unavailable", reason="QUIC endpoint not wired yet")
    return None
