"""Path MTU in the QUIC layer without sockets: ``max_udp_payload_size`` sent and honoured on
every engine pairing (a node behind a 1,280-byte link is never sent more than 1,252 bytes,
its handshake included), and DF set on the endpoint's socket."""

from __future__ import annotations

import socket
from typing import Any

import pytest
from cyphonic import pki
from cyphonic.quic import engine, engine_qh3
from cyphonic.quic.endpoint import bind_udp, set_dont_fragment
from test_quic_engine_qh3 import (
    CLIENT_ADDR,
    DOMAIN,
    ENGINES,
    NOW,
    SERVER_ADDR,
    _exchange,
    _node,
    _verifier,
)


@pytest.fixture(scope="module")
def material(tmp_path_factory: pytest.TempPathFactory) -> pki.PkiMaterial:
    return pki.init_pki(tmp_path_factory.mktemp("pki"), domain=DOMAIN, now=NOW)


SMALL = 1280 - 28
"""What a 1,280-byte IPv4 link carries as UDP payload."""


def _conn(
    material: pki.PkiMaterial, kind: str, *, client: bool, size: int, odcid: bytes = b""
) -> Any:
    options: dict[str, Any] = {
        "is_client": client,
        "identity": _node(material, "alice" if client else "bob"),
        "alpn_protocols": ["cyphonic-tun/1"],
        "idle_timeout": 10.0,
        "max_datagram_size": size,
        "max_udp_payload_size": size if size == SMALL else 1472,  # the link's room
    }
    if client:
        options["server_name"] = f"bob.{DOMAIN}"
    verifier = _verifier(material, "node", f"bob.{DOMAIN}" if client else None)
    extra: dict[str, Any] = {} if client else {"original_destination_connection_id": odcid}
    if kind == "qh3":
        return engine_qh3.Qh3QuicConnection(
            configuration=engine_qh3.make_configuration(**options), peer_verifier=verifier, **extra
        )
    return engine.CyphonicQuicConnection(
        configuration=engine.make_configuration(**options), peer_verifier=verifier, **extra
    )


def _handshake(client: Any, server_of: Any, *, carries: int) -> tuple[Any, list[int], float]:
    """Pump with timers until both sides are done; datagrams above ``carries`` are lost
    (a small link on one side, DF set). The server, sizes seen, and when it was done."""
    server = None
    sizes: list[int] = []
    now = 0.0
    for _ in range(400):
        for data, _ in client.datagrams_to_send(now=now):
            sizes.append(len(data))
            if len(data) > carries:
                continue
            if server is None:
                header = engine.parse_datagram_header(data)
                assert header is not None
                server = server_of(header.destination_cid)
            server.receive_datagram(data, CLIENT_ADDR, now=now)
        if server is not None:
            for data, _ in server.datagrams_to_send(now=now):
                sizes.append(len(data))
                if len(data) <= carries:
                    client.receive_datagram(data, SERVER_ADDR, now=now)
        if server is not None and client.handshake_complete and server.handshake_complete:
            return server, sizes, now
        now += 0.05
        for conn in (client, server):
            timer = conn.get_timer() if conn is not None else None
            if timer is not None and timer <= now:
                conn.handle_timer(now=now)
    raise AssertionError(f"no handshake over a {carries}-byte path: {sizes[:10]}")


@pytest.mark.parametrize("client_kind", ENGINES)
@pytest.mark.parametrize("server_kind", ENGINES)
@pytest.mark.parametrize("small", ["client", "server"])
def test_the_small_side_is_never_sent_more_than_its_link_carries(
    material: pki.PkiMaterial,
    client_kind: str,
    server_kind: str,
    small: str,
) -> None:
    client = _conn(material, client_kind, client=True, size=SMALL if small == "client" else 1452)
    client.connect(SERVER_ADDR, now=0.0)
    server, sizes, done = _handshake(
        client,
        lambda odcid: _conn(
            material,
            server_kind,
            client=False,
            size=SMALL if small == "server" else 1452,
            odcid=odcid,
        ),
        carries=SMALL,
    )
    # A small client is never sent more than its link carries; towards a small server only
    # the client's very first Initials may be larger (qh3: 1,280 bytes, then 1,200 after
    # one PTO; our aioquic client starts at 1,200).
    late = sizes[2:] if small == "server" and client_kind == "qh3" else sizes
    assert max(late) <= SMALL
    assert done < (2.0 if client_kind == "qh3" and small == "server" else 0.5)
    # DATAGRAM room: both sides fit the smaller datagram (1,252 - 30 = 1,222 inner; a qh3
    # server on the small link keeps to QUIC's 1,200 that its client's Initials proved).
    room = (client.max_datagram_payload(), server.max_datagram_payload())
    assert all(1170 <= r <= SMALL - 30 for r in room), room
    client.send_datagram_frame(b"x" * room[0])
    server.send_datagram_frame(b"x" * room[1])
    wire = _exchange(client, server, now=done + 0.01)
    assert wire and max(len(d) for _, d in wire) <= SMALL


def test_dont_fragment_on_the_socket() -> None:
    sock = bind_udp("::", 0)
    try:
        set_dont_fragment(sock)
        probe = 3  # IP_PMTUDISC_PROBE
        assert sock.getsockopt(socket.IPPROTO_IPV6, 23) == probe  # IPV6_MTU_DISCOVER
        assert sock.getsockopt(socket.IPPROTO_IP, 10) == probe  # IP_MTU_DISCOVER
    finally:
        sock.close()


@pytest.mark.parametrize("client_kind", ENGINES)
def test_a_normal_link_keeps_migration_working(material: pki.PkiMaterial, client_kind: str) -> None:
    """An agent on a 1,500-byte link sends 1,472 (its link's room), never less than a
    service's 1,452: qh3 cannot make a new path for a peer that asked for less than its own
    max_datagram_size (docs/pki-and-quic.md), and NAT rebinding needs new paths."""
    client = _conn(material, client_kind, client=True, size=1450)
    client.connect(SERVER_ADDR, now=0.0)
    server, _, done = _handshake(
        client,
        lambda odcid: _conn(material, "qh3", client=False, size=1452, odcid=odcid),
        carries=1500,
    )
    client.send_ping(5)
    for data, _ in client.datagrams_to_send(now=done + 0.1):
        server.receive_datagram(data, ("10.0.0.99", 5555), now=done + 0.1)  # a new NAT port
    assert server.max_datagram_payload() == 1450 - 30 + 2  # the service's own 1,452
