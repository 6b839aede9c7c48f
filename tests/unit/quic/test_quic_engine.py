"""cyphonic.quic.engine without sockets: two connections joined in memory, explicit clock."""

from __future__ import annotations

import datetime
from collections.abc import Callable

import pytest
from aioquic.quic.events import (
    ConnectionTerminated,
    HandshakeCompleted,
    QuicEvent,
    StreamDataReceived,
)
from aioquic.quic.packet import QuicErrorCode
from aioquic.tls import AlertDescription
from cryptography import x509
from cyphonic import pki
from cyphonic.errors import Expired, PermissionDenied, Revoked, Timeout, Unauthenticated
from cyphonic.quic import engine
from cyphonic.quic.engine import CyphonicQuicConnection

NOW = datetime.datetime.now(datetime.UTC)
DOMAIN = "cyphonic.internal"
CLIENT_ADDR = ("10.0.0.1", 40000)
SERVER_ADDR = ("10.0.0.2", 443)


@pytest.fixture(scope="module")
def material(tmp_path_factory: pytest.TempPathFactory) -> pki.PkiMaterial:
    return pki.init_pki(tmp_path_factory.mktemp("pki"), domain=DOMAIN, now=NOW)


def _node(material: pki.PkiMaterial, name: str) -> pki.CertifiedKey:
    key = pki.generate_key()
    fqdn = f"{name}.{DOMAIN}"
    cert = pki.sign_node_csr(material.node_ca, pki.make_csr(key, fqdn), fqdn=fqdn, now=NOW)
    return pki.CertifiedKey(key=key, cert=cert, chain=[material.node_ca.cert])


Verifier = Callable[[list[x509.Certificate], str | None], pki.PeerIdentity]


def _verifier(material: pki.PkiMaterial, expect: str, name: str | None) -> Verifier:
    def verify(chain: list[x509.Certificate], alpn: str | None) -> pki.PeerIdentity:
        return pki.verify_peer(
            chain,
            trust=material.trust,
            expect=expect,  # type: ignore[arg-type]
            expected_name=name,
            now=NOW,
        )

    return verify


def _pair(
    material: pki.PkiMaterial,
    client_identity: pki.CertifiedKey,
    *,
    client_verifier: Verifier | None = None,
    server_verifier: Verifier | None = None,
    client_cids: engine.ConnectionIdFactory | None = None,
) -> tuple[CyphonicQuicConnection, CyphonicQuicConnection]:
    client = CyphonicQuicConnection(
        configuration=engine.make_configuration(
            is_client=True,
            identity=client_identity,
            alpn_protocols=["cyphonic-sig/1"],
            idle_timeout=10.0,
            server_name=f"nms.svc.{DOMAIN}",
        ),
        peer_verifier=client_verifier or _verifier(material, "service", f"nms.svc.{DOMAIN}"),
        connection_id_factory=client_cids,
    )
    client.connect(SERVER_ADDR, now=0.0)
    # The server is created the way the endpoint does: from the client's first DCID.
    first = client.datagrams_to_send(now=0.0)
    header = engine.parse_datagram_header(first[0][0])
    assert header is not None and header.is_initial
    server = CyphonicQuicConnection(
        configuration=engine.make_configuration(
            is_client=False,
            identity=material.services["nms"],
            alpn_protocols=["cyphonic-sig/1"],
            idle_timeout=10.0,
        ),
        peer_verifier=server_verifier or _verifier(material, "node", None),
        original_destination_connection_id=header.destination_cid,
    )
    for data, _ in first:
        server.receive_datagram(data, CLIENT_ADDR, now=0.0)
    return client, server


def _exchange(
    client: CyphonicQuicConnection, server: CyphonicQuicConnection, *, now: float, rounds: int = 6
) -> None:
    for _ in range(rounds):
        for data, _ in server.datagrams_to_send(now=now):
            client.receive_datagram(data, SERVER_ADDR, now=now)
        for data, _ in client.datagrams_to_send(now=now):
            server.receive_datagram(data, CLIENT_ADDR, now=now)


def _events(conn: CyphonicQuicConnection) -> list[QuicEvent]:
    out = []
    while (event := conn.next_event()) is not None:
        out.append(event)
    return out


def test_mutual_tls_happy_path(material: pki.PkiMaterial) -> None:
    client, server = _pair(material, _node(material, "alice"))
    _exchange(client, server, now=0.01)
    assert client.peer_identity is not None and client.peer_identity.kind == "service"
    assert server.peer_identity is not None
    assert server.peer_identity.name == f"alice.{DOMAIN}"
    assert client.handshake_confirmed and server.handshake_confirmed
    assert any(isinstance(e, HandshakeCompleted) for e in _events(server))


def test_refused_client_data_is_never_decrypted(material: pki.PkiMaterial) -> None:
    # The client's own handshake completes before the server has judged its certificate,
    # and it sends a request at once; the server must produce no stream event.
    client, server = _pair(material, material.services["as"])  # a service where a node goes
    for data, _ in server.datagrams_to_send(now=0.01):
        client.receive_datagram(data, SERVER_ADDR, now=0.01)
    assert any(isinstance(e, HandshakeCompleted) for e in _events(client))
    client.send_stream_data(client.get_next_available_stream_id(), b"register", end_stream=True)
    _exchange(client, server, now=0.02)
    server_events = _events(server)
    assert not any(isinstance(e, StreamDataReceived | HandshakeCompleted) for e in server_events)
    assert server.peer_identity is None
    assert isinstance(server.verification_error, Unauthenticated)
    close = client.close_event
    assert close is not None
    assert close.error_code == QuicErrorCode.CRYPTO_ERROR + AlertDescription.bad_certificate
    assert "where a node is expected" in close.reason_phrase
    assert not client.handshake_confirmed


@pytest.mark.parametrize(
    ("error", "alert", "expected"),
    [
        (Expired("x"), AlertDescription.certificate_expired, Expired),
        (Revoked("x"), AlertDescription.certificate_revoked, Revoked),
        (PermissionDenied("x"), AlertDescription.access_denied, PermissionDenied),
        (Unauthenticated("x"), AlertDescription.bad_certificate, Unauthenticated),
    ],
)
def test_each_refusal_has_its_alert_and_maps_back(
    material: pki.PkiMaterial, error: Exception, alert: int, expected: type[Exception]
) -> None:
    def refuse(chain: list[x509.Certificate], alpn: str | None) -> pki.PeerIdentity:
        raise error

    client, server = _pair(material, _node(material, "alice"), server_verifier=refuse)
    _exchange(client, server, now=0.01)
    close = client.close_event
    assert close is not None and close.error_code == QuicErrorCode.CRYPTO_ERROR + alert
    mapped = engine.error_from_close(close, local_error=None, peer_label="nms")
    assert type(mapped) is expected
    assert "TLS handshake refused" in str(mapped)


def test_verifier_crash_still_refuses(material: pki.PkiMaterial) -> None:
    def broken(chain: list[x509.Certificate], alpn: str | None) -> pki.PeerIdentity:
        raise RuntimeError("bug")

    client, server = _pair(material, _node(material, "alice"), server_verifier=broken)
    _exchange(client, server, now=0.01)
    assert server.peer_identity is None
    assert isinstance(server.verification_error, Unauthenticated)
    assert client.close_event is not None


def test_connection_id_factory_supplies_every_host_cid(material: pki.PkiMaterial) -> None:
    asked: list[int] = []

    def cids(seq: int) -> bytes:
        asked.append(seq)
        return bytes([0xA0, seq]) + bytes(6)

    client, server = _pair(material, _node(material, "alice"), client_cids=cids)
    _exchange(client, server, now=0.01)
    assert asked[0] == 0 and len(asked) > 1
    assert client.host_cid == bytes([0xA0, 0]) + bytes(6)
    assert all(c[0] == 0xA0 for c in client.host_cids)


def test_max_datagram_payload_accounts_for_overhead(material: pki.PkiMaterial) -> None:
    client, server = _pair(material, _node(material, "alice"))
    _exchange(client, server, now=0.01)
    assert client.max_datagram_payload() == engine.DEFAULT_MAX_DATAGRAM_SIZE - 30
    limit = client.max_datagram_payload()
    client.send_datagram_frame(b"z" * limit)
    sent = client.datagrams_to_send(now=0.02)
    assert any(len(d) == engine.DEFAULT_MAX_DATAGRAM_SIZE for d, _ in sent)


def test_parse_datagram_header() -> None:
    assert engine.parse_datagram_header(b"") is None
    assert engine.parse_datagram_header(b"\x40abc") is None  # short header, too short
    short = engine.parse_datagram_header(b"\x40" + b"C" * 8 + b"payload")
    assert short is not None and short.destination_cid == b"C" * 8 and not short.is_initial
    assert engine.parse_datagram_header(b"\xc0\x00\x00\x00\x01\xff") is None  # bad CID len


def test_error_from_close_non_tls() -> None:
    idle = ConnectionTerminated(
        error_code=QuicErrorCode.INTERNAL_ERROR, frame_type=0, reason_phrase="Idle timeout"
    )
    assert isinstance(engine.error_from_close(idle, local_error=None, peer_label="p"), Timeout)
    local = PermissionDenied("mine")
    assert engine.error_from_close(idle, local_error=local, peer_label="p") is local
