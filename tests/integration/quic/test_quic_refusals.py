"""The refusal matrix over real UDP sockets on 127.0.0.1.

Each bad peer is refused inside the TLS handshake: the server's handler factory never
runs (a recorder stays empty), the refused side sees a clear, typed error, and a raw
aioquic client that sends a request the moment its own handshake completes gets no
stream data processed either.
"""

from __future__ import annotations

import asyncio
import datetime
import ssl
from collections.abc import Callable

import pytest
from aioquic.asyncio.client import connect as aioquic_connect
from aioquic.quic.configuration import QuicConfiguration
from aioquic.tls import AlertDescription
from cyphonic import pki
from cyphonic.config import ALPN_SIGNALLING, ALPN_TUNNEL
from cyphonic.errors import (
    CyphonicError,
    Expired,
    PermissionDenied,
    Revoked,
    Unauthenticated,
)
from cyphonic.quic import Acceptor, QuicEndpoint
from quic_harness import (
    DOMAIN,
    NMS_NAME,
    EndpointMaker,
    Handlers,
    Pki,
    dial_nms,
    port_of,
    request,
    utcnow,
)

pytestmark = pytest.mark.timeout(60)

CRYPTO_ERROR = 0x100


def _self_signed(name: str) -> pki.CertifiedKey:
    # A "node" that made its own CA and signed itself a proper-looking certificate.
    own = pki.create_root_ca(name, now=utcnow())
    return own


def _expired(ca: Pki) -> pki.CertifiedKey:
    past = utcnow() - datetime.timedelta(days=2)
    return ca.node("old", now=past, valid_for=datetime.timedelta(days=1))


def _foreign(foreign_ca: Pki) -> pki.CertifiedKey:
    return foreign_ca.node("mallory")


async def _server(
    endpoints: EndpointMaker,
    ca: Pki,
    handlers: Handlers,
    *,
    is_revoked: Callable[[object], bool] | None = None,
    authorize: Callable[[pki.PeerIdentity], None] | None = None,
) -> QuicEndpoint:
    trust = pki.TrustStore(
        root=ca.material.root_cert,
        node_ca=ca.material.node_ca.cert,
        service_ca=ca.material.service_ca.cert,
        is_revoked=is_revoked,
    )  # type: ignore[arg-type]
    return await endpoints(
        identity=ca.service("nms"),
        trust=trust,
        accept={ALPN_SIGNALLING: Acceptor(handlers.factory, expect="node", authorize=authorize)},
    )


async def _raw_attempt(server: QuicEndpoint, identity: pki.CertifiedKey | None) -> int:
    """A plain aioquic client that sends a request as soon as ITS handshake completes.

    Returns the error code of the close it ends with.
    """
    config = QuicConfiguration(
        is_client=True,
        alpn_protocols=[ALPN_SIGNALLING],
        verify_mode=ssl.CERT_NONE,
        server_name=NMS_NAME,
    )
    if identity is not None:
        config.certificate = identity.cert
        config.certificate_chain = identity.chain
        config.private_key = identity.key
    host, port = port_of(server)
    async with aioquic_connect(host, port, configuration=config) as client:
        quic = client._quic
        stream_id = quic.get_next_available_stream_id()
        quic.send_stream_data(stream_id, b"register me", end_stream=True)
        client.transmit()
        async with asyncio.timeout(10):
            await client.wait_closed()
        close = quic._close_event
        assert close is not None
        return int(close.error_code)


CASES: list[tuple[str, type[CyphonicError], int, str]] = [
    ("self_signed", Unauthenticated, AlertDescription.bad_certificate, "self-signed"),
    ("foreign_ca", Unauthenticated, AlertDescription.bad_certificate, "chain"),
    (
        "wrong_role",
        Unauthenticated,
        AlertDescription.bad_certificate,
        "service certificate where a node is expected",
    ),
    ("expired", Expired, AlertDescription.certificate_expired, "expired"),
    ("revoked", Revoked, AlertDescription.certificate_revoked, "revoked"),
    ("wrong_name", PermissionDenied, AlertDescription.access_denied, "not allowed"),
]


@pytest.mark.parametrize(("case", "error", "alert", "phrase"), CASES, ids=[c[0] for c in CASES])
async def test_server_refuses_bad_client(
    endpoints: EndpointMaker,
    ca: Pki,
    foreign_ca: Pki,
    case: str,
    error: type[CyphonicError],
    alert: int,
    phrase: str,
) -> None:
    handlers = Handlers()
    revoked = ca.node("revoked")
    identities = {
        "self_signed": _self_signed(f"eve.{DOMAIN}"),
        "foreign_ca": _foreign(foreign_ca),
        "wrong_role": ca.service("as"),
        "expired": _expired(ca),
        "revoked": revoked,
        "wrong_name": ca.node("stranger"),
    }

    def authorize(peer: pki.PeerIdentity) -> None:
        if peer.name == f"stranger.{DOMAIN}":
            raise PermissionDenied(f"{peer.name} is not allowed here")

    server = await _server(
        endpoints,
        ca,
        handlers,
        is_revoked=lambda c: c.serial_number == revoked.cert.serial_number,  # type: ignore[attr-defined]
        authorize=authorize,
    )
    identity = identities[case]
    client = await endpoints(identity=identity, trust=ca.trust)

    with pytest.raises(error, match=phrase) as info:
        await client.connect(
            port_of(server), alpn=ALPN_SIGNALLING, expected_name=NMS_NAME, timeout=10
        )
    assert "TLS handshake refused" in str(info.value)

    code = await _raw_attempt(server, identity)
    assert code == CRYPTO_ERROR + alert

    assert handlers.made == []  # no handler ever existed, so nothing was processed
    assert server.stats.connections_refused == 2
    assert server.stats.connections_accepted == 0


async def test_server_refuses_client_without_certificate(endpoints: EndpointMaker, ca: Pki) -> None:
    handlers = Handlers()
    server = await _server(endpoints, ca, handlers)
    code = await _raw_attempt(server, None)
    assert code == CRYPTO_ERROR + AlertDescription.certificate_required
    assert handlers.made == []
    assert server.stats.connections_refused == 1


async def test_service_only_server_refuses_node(endpoints: EndpointMaker, ca: Pki) -> None:
    """A node certificate where a service is expected (e.g. NMS-to-AS service calls)."""
    handlers = Handlers()
    server = await endpoints(
        identity=ca.service("as"),
        trust=ca.trust,
        accept={ALPN_SIGNALLING: Acceptor(handlers.factory, expect="service")},
    )
    node = await endpoints(identity=ca.node("alice"), trust=ca.trust)
    with pytest.raises(Unauthenticated, match="node certificate where a service is expected"):
        await node.connect(
            port_of(server), alpn=ALPN_SIGNALLING, expected_name=f"as.svc.{DOMAIN}", timeout=10
        )
    assert handlers.made == []
    service = await endpoints(identity=ca.service("nms"), trust=ca.trust)
    conn = await service.connect(
        port_of(server), alpn=ALPN_SIGNALLING, expected_name=f"as.svc.{DOMAIN}", timeout=10
    )
    assert conn.peer is not None and conn.peer.kind == "service"
    assert [h.conn.peer.kind for h in handlers.made if h.conn.peer] == ["service"]


async def test_unknown_alpn_gets_no_connection(endpoints: EndpointMaker, ca: Pki) -> None:
    handlers = Handlers()
    server = await _server(endpoints, ca, handlers)
    client = await endpoints(identity=ca.node("alice"), trust=ca.trust)
    with pytest.raises(Unauthenticated):
        await client.connect(port_of(server), alpn="h3", expected_name=NMS_NAME, timeout=10)
    assert handlers.made == []


@pytest.mark.parametrize("case", ["node_as_service", "wrong_name", "expired", "foreign_ca"])
async def test_client_refuses_bad_server(
    endpoints: EndpointMaker, ca: Pki, foreign_ca: Pki, case: str
) -> None:
    """The client checks the server with the same function: node-to-node tunnels too."""
    identities = {
        "node_as_service": ca.node("imposter"),
        "wrong_name": ca.service("as"),
        "expired": _expired(ca),
        "foreign_ca": foreign_ca.service("nms"),
    }
    expected = {
        "node_as_service": (Unauthenticated, "node certificate where a service"),
        "wrong_name": (PermissionDenied, f"expected {NMS_NAME}"),
        "expired": (Expired, "expired"),
        "foreign_ca": (Unauthenticated, "chain"),
    }
    handlers = Handlers()
    server = await endpoints(
        identity=identities[case], trust=ca.trust, accept={ALPN_SIGNALLING: handlers.factory}
    )
    client_handlers = Handlers()
    client = await endpoints(identity=ca.node("alice"), trust=ca.trust)
    error, phrase = expected[case]
    with pytest.raises(error, match=phrase):
        await client.connect(
            port_of(server),
            alpn=ALPN_SIGNALLING,
            expected_name=NMS_NAME,
            handler_factory=client_handlers.factory,
            timeout=10,
        )
    assert client_handlers.made == []
    assert handlers.made == []  # the server never completed its handshake either
    assert client.stats.connections_refused == 1


async def test_tunnel_peer_must_be_the_expected_node(endpoints: EndpointMaker, ca: Pki) -> None:
    handlers = Handlers()
    bob = await endpoints(
        identity=ca.node("bob"),
        trust=ca.trust,
        accept={ALPN_TUNNEL: Acceptor(handlers.factory, expect="node")},
    )
    alice = await endpoints(identity=ca.node("alice"), trust=ca.trust)
    with pytest.raises(PermissionDenied, match=f"expected carol.{DOMAIN}"):
        await alice.connect(
            port_of(bob),
            alpn=ALPN_TUNNEL,
            expect="node",
            expected_name=f"carol.{DOMAIN}",
            timeout=10,
        )
    conn = await alice.connect(
        port_of(bob), alpn=ALPN_TUNNEL, expect="node", expected_name=f"bob.{DOMAIN}", timeout=10
    )
    assert conn.peer is not None and conn.peer.kind == "node"
    assert len(handlers.made) == 1
    assert handlers.made[0].conn.peer is not None
    assert handlers.made[0].conn.peer.name == f"alice.{DOMAIN}"


async def test_accepted_after_refusals_still_works(endpoints: EndpointMaker, ca: Pki) -> None:
    # Refusals leave no state behind that breaks the next, good client.
    handlers = Handlers()
    server = await _server(endpoints, ca, handlers)
    bad = await endpoints(identity=ca.service("trs"), trust=ca.trust)
    with pytest.raises(Unauthenticated):
        await bad.connect(port_of(server), alpn=ALPN_SIGNALLING, expected_name=NMS_NAME)
    good = await endpoints(identity=ca.node("alice"), trust=ca.trust)
    conn = await dial_nms(good, port_of(server))
    assert await request(conn, b"ping") == b"echo:ping"
    assert [h.conn.peer.name for h in handlers.made if h.conn.peer] == [f"alice.{DOMAIN}"]
