"""cyphonic.quic.engine_qh3 without sockets: mixed-engine pairs joined in memory.

What only the qh3 engine has: relay-chosen CIDs set before the native core exists, an
aioquic client's padded first Initial counted whole (the server flight leaves at once), the
fast receive/send paths that bypass the wrapper's logging, and the batch entry points.
"""

from __future__ import annotations

import datetime
from typing import Any

import pytest
from aioquic.quic.events import DatagramFrameReceived, HandshakeCompleted, PingAcknowledged
from cryptography import x509
from cyphonic import pki
from cyphonic.quic import engine, engine_qh3

NOW = datetime.datetime.now(datetime.UTC)
DOMAIN = "cyphonic.internal"
CLIENT_ADDR = ("10.0.0.1", 40000)
SERVER_ADDR = ("10.0.0.2", 443)
ENGINES = ("aioquic", "qh3")


@pytest.fixture(scope="module")
def material(tmp_path_factory: pytest.TempPathFactory) -> pki.PkiMaterial:
    return pki.init_pki(tmp_path_factory.mktemp("pki"), domain=DOMAIN, now=NOW)


def _node(material: pki.PkiMaterial, name: str) -> pki.CertifiedKey:
    key = pki.generate_key()
    fqdn = f"{name}.{DOMAIN}"
    cert = pki.sign_node_csr(material.node_ca, pki.make_csr(key, fqdn), fqdn=fqdn, now=NOW)
    return pki.CertifiedKey(key=key, cert=cert, chain=[material.node_ca.cert])


def _verifier(material: pki.PkiMaterial, expect: str, name: str | None) -> Any:
    def verify(chain: list[x509.Certificate], alpn: str | None) -> pki.PeerIdentity:
        return pki.verify_peer(
            chain,
            trust=material.trust,
            expect=expect,  # type: ignore[arg-type]
            expected_name=name,
            now=NOW,
        )

    return verify


def _client(
    material: pki.PkiMaterial, kind: str, **relay: Any
) -> engine.CyphonicQuicConnection | engine_qh3.Qh3QuicConnection:
    identity = _node(material, "alice")
    verifier = _verifier(material, "node", f"bob.{DOMAIN}")
    options: dict[str, Any] = {
        "is_client": True,
        "identity": identity,
        "alpn_protocols": ["cyphonic-tun/1"],
        "idle_timeout": 10.0,
        "server_name": f"bob.{DOMAIN}",
    }
    if kind == "qh3":
        return engine_qh3.Qh3QuicConnection(
            configuration=engine_qh3.make_configuration(**options),
            peer_verifier=verifier,
            **relay,
        )
    return engine.CyphonicQuicConnection(
        configuration=engine.make_configuration(**options), peer_verifier=verifier, **relay
    )


def _server(
    material: pki.PkiMaterial, kind: str, odcid: bytes, **relay: Any
) -> engine.CyphonicQuicConnection | engine_qh3.Qh3QuicConnection:
    options: dict[str, Any] = {
        "is_client": False,
        "identity": _node(material, "bob"),
        "alpn_protocols": ["cyphonic-tun/1"],
        "idle_timeout": 10.0,
    }
    verifier = _verifier(material, "node", None)
    if kind == "qh3":
        return engine_qh3.Qh3QuicConnection(
            configuration=engine_qh3.make_configuration(**options),
            peer_verifier=verifier,
            original_destination_connection_id=odcid,
            **relay,
        )
    return engine.CyphonicQuicConnection(
        configuration=engine.make_configuration(**options),
        peer_verifier=verifier,
        original_destination_connection_id=odcid,
        **relay,
    )


Wire = list[tuple[str, bytes]]


def _exchange(client: Any, server: Any, *, now: float, rounds: int = 8) -> Wire:
    """Pump both ways; every datagram on the wire, with its direction."""
    wire: Wire = []
    for _ in range(rounds):
        for data, _ in server.datagrams_to_send(now=now):
            wire.append(("s>c", data))
            client.receive_datagram(data, SERVER_ADDR, now=now)
        for data, _ in client.datagrams_to_send(now=now):
            wire.append(("c>s", data))
            server.receive_datagram(data, CLIENT_ADDR, now=now)
    return wire


def _drain(conn: Any) -> list[Any]:
    out = []
    while (event := conn.next_event()) is not None:
        out.append(event)
    return out


def _short_dcids(wire: Wire, direction: str) -> set[bytes]:
    return {d[1 : 1 + engine.CID_LENGTH] for way, d in wire if way == direction and not d[0] & 0x80}


def test_packet_ends_stretches_trailing_padding_only(material: pki.PkiMaterial) -> None:
    # aioquic's first Initial: one long-header packet, then zero padding to the datagram end.
    client = _client(material, "aioquic")
    client.connect(SERVER_ADDR, now=0.0)
    (initial, _), *_ = client.datagrams_to_send(now=0.0)
    ends = engine_qh3._packet_ends(initial, engine.CID_LENGTH)
    assert ends == [len(initial)]
    assert engine_qh3._packet_ends(b"\x00" * 1200, engine.CID_LENGTH) is None  # no packet
    assert engine_qh3._packet_ends(b"", engine.CID_LENGTH) is None


def test_aioquic_client_first_flight_is_answered_at_once(material: pki.PkiMaterial) -> None:
    """aioquic pads its Initial after the packet; the qh3 server must count those bytes."""
    client = _client(material, "aioquic")
    client.connect(SERVER_ADDR, now=0.0)
    first = client.datagrams_to_send(now=0.0)
    initial = first[0][0]
    header = engine.parse_datagram_header(initial)
    assert header is not None and header.is_initial
    ends = engine_qh3._packet_ends(initial, engine.CID_LENGTH)
    assert ends is not None  # trailing padding outside the packet: the case fixed here
    server = _server(material, "qh3", header.destination_cid)
    for data, _ in first:
        server.receive_datagram(data, CLIENT_ADDR, now=0.0)
    # The whole server flight (Initial + Handshake with the certificate chain) in one pass,
    # within 3x the 1,452 bytes received, without "packet builder capacity exhausted".
    flight = server.datagrams_to_send(now=0.0)
    assert 1452 < sum(len(d) for d, _ in flight) <= 3 * 1452
    for data, _ in flight:
        client.receive_datagram(data, SERVER_ADDR, now=0.0)
    for data, _ in client.datagrams_to_send(now=0.0):
        server.receive_datagram(data, CLIENT_ADDR, now=0.0)
    assert server.handshake_complete and server.peer_identity is not None
    assert any(isinstance(e, HandshakeCompleted) for e in _drain(server))


@pytest.mark.parametrize("client_kind", ENGINES)
@pytest.mark.parametrize("server_kind", ENGINES)
def test_relay_chosen_cids_on_every_pairing(
    material: pki.PkiMaterial, client_kind: str, server_kind: str
) -> None:
    """The TRS's CIDs carry a relayed connection on either engine, both roles."""
    first_dcid = b"\x5e" + bytes(7)  # the server's first TRS CID (the client's Initial DCID)
    client = _client(
        material,
        client_kind,
        connection_id_factory=lambda seq: b"\xc1" + seq.to_bytes(7, "big"),
        initial_destination_cid=first_dcid,
    )
    client.connect(SERVER_ADDR, now=0.0)
    first = client.datagrams_to_send(now=0.0)
    header = engine.parse_datagram_header(first[0][0])
    assert header is not None and header.destination_cid == first_dcid
    server = _server(
        material,
        server_kind,
        header.destination_cid,
        connection_id_factory=lambda seq: b"\x5e" + (seq + 1).to_bytes(7, "big"),
    )
    assert client.relayed and server.relayed
    assert client.host_cid == b"\xc1" + bytes(7)
    assert server.host_cid == b"\x5e" + (1).to_bytes(7, "big")
    for data, _ in first:
        server.receive_datagram(data, CLIENT_ADDR, now=0.0)
    _exchange(client, server, now=0.01)
    assert client.handshake_complete and server.handshake_complete
    _drain(client)
    _drain(server)
    client.send_datagram_frame(b"over relay cids")
    server.send_datagram_frame(b"and back")
    # A relayed connection keeps its CID (the peer's spares may be unknown to the relay).
    client.change_connection_id()
    wire = _exchange(client, server, now=0.02)
    assert [e.data for e in _drain(server) if isinstance(e, DatagramFrameReceived)] == [
        b"over relay cids"
    ]
    assert [e.data for e in _drain(client) if isinstance(e, DatagramFrameReceived)] == [b"and back"]
    assert _short_dcids(wire, "c>s") == {server.host_cid}
    assert _short_dcids(wire, "s>c") == {client.host_cid}
    # aioquic draws every host CID from the factory; qh3's core draws the spares itself.
    for conn, tag in ((client, 0xC1), (server, 0x5E)):
        cids = conn.host_cids
        assert cids[0][0] == tag
        if isinstance(conn, engine.CyphonicQuicConnection):
            assert all(c[0] == tag for c in cids)


def test_unrelayed_qh3_connection_still_changes_cid(material: pki.PkiMaterial) -> None:
    client = _client(material, "qh3")
    client.connect(SERVER_ADDR, now=0.0)
    first = client.datagrams_to_send(now=0.0)
    header = engine.parse_datagram_header(first[0][0])
    assert header is not None
    server = _server(material, "qh3", header.destination_cid)
    for data, _ in first:
        server.receive_datagram(data, CLIENT_ADDR, now=0.0)
    _exchange(client, server, now=0.01)
    _drain(server)  # host_cids follows the core's ConnectionIdIssued events
    assert not client.relayed and len(server.host_cids) > 1
    before = _short_dcids(_exchange(client, server, now=0.015), "c>s")
    client.change_connection_id()
    client.send_ping(1)
    after = _short_dcids(_exchange(client, server, now=0.02), "c>s")
    assert after and not after & before


@pytest.mark.parametrize("entry", ["many", "gro"])
def test_batch_entry_points_deliver_every_datagram(material: pki.PkiMaterial, entry: str) -> None:
    client = _client(material, "qh3")
    client.connect(SERVER_ADDR, now=0.0)
    first = client.datagrams_to_send(now=0.0)
    header = engine.parse_datagram_header(first[0][0])
    assert header is not None
    server = _server(material, "qh3", header.destination_cid)
    assert isinstance(server, engine_qh3.Qh3QuicConnection)
    for data, _ in first:
        server.receive_datagram(data, CLIENT_ADDR, now=0.0)
    _exchange(client, server, now=0.01)
    _drain(server)
    size = client.max_datagram_payload()
    payloads = [bytes([i]) * size for i in range(12)]
    for p in payloads:
        client.send_datagram_frame(p)
    sent = [d for d, _ in client.datagrams_to_send(now=0.02)]
    assert len(sent) == 12 and len({len(d) for d in sent}) == 1
    if entry == "many":
        server.receive_many(sent, CLIENT_ADDR, now=0.02)
    else:
        server.receive_gro(b"".join(sent), len(sent[0]), CLIENT_ADDR, now=0.02)
    got = [e.data for e in _drain(server) if isinstance(e, DatagramFrameReceived)]
    assert got == payloads


def test_fast_drain_keeps_every_event_in_order(material: pki.PkiMaterial) -> None:
    """DATAGRAM frames skip the wrapper's event handling; stream data, CID events and the
    peer's close still go through it, and the native core is back in place afterwards."""
    client = _client(material, "qh3")
    client.connect(SERVER_ADDR, now=0.0)
    first = client.datagrams_to_send(now=0.0)
    header = engine.parse_datagram_header(first[0][0])
    assert header is not None
    server = _server(material, "qh3", header.destination_cid)
    assert isinstance(server, engine_qh3.Qh3QuicConnection)
    core = None
    for data, _ in first:
        server.receive_datagram(data, CLIENT_ADDR, now=0.0)
        core = server._core
    _exchange(client, server, now=0.01)
    kinds = [type(e).__name__ for e in _drain(server)]
    assert "HandshakeCompleted" in kinds and "ConnectionIdIssued" in kinds
    stream_id = client.get_next_available_stream_id()
    client.send_datagram_frame(b"d1")
    client.send_stream_data(stream_id, b"request", end_stream=True)
    client.send_datagram_frame(b"d2")
    _exchange(client, server, now=0.02)
    events = _drain(server)
    assert [e.data for e in events if isinstance(e, DatagramFrameReceived)] == [b"d1", b"d2"]
    assert b"".join(e.data for e in events if type(e).__name__ == "StreamDataReceived") == (
        b"request"
    )
    assert server._core is core and type(core).__name__ == "QuicConnectionCore"
    client.close(error_code=0, reason_phrase="bye")
    _exchange(client, server, now=0.03)
    closes = [e for e in _drain(server) if type(e).__name__ == "ConnectionTerminated"]
    assert server.close_event is not None and server.close_event.reason_phrase == "bye"
    assert closes or server.close_event is not None


@pytest.mark.parametrize("kind", ENGINES)
def test_validated_address_follows_a_rebinding_only_once_probed(
    material: pki.PkiMaterial, kind: str
) -> None:
    """A server (the TRS's control connections) reports a client's new address as validated
    only after the path challenge was answered, on both engines."""
    client = _client(material, kind)
    client.connect(SERVER_ADDR, now=0.0)
    first = client.datagrams_to_send(now=0.0)
    header = engine.parse_datagram_header(first[0][0])
    assert header is not None
    server = _server(material, kind, header.destination_cid)
    for data, _ in first:
        server.receive_datagram(data, CLIENT_ADDR, now=0.0)
    _exchange(client, server, now=0.01)
    assert server.peer_address_validated and server.get_peer_address()[:2] == CLIENT_ADDR
    moved = ("10.0.0.99", 41000)  # the client's NAT gave it a new outside port
    client.send_ping(7)
    for data, _ in client.datagrams_to_send(now=0.02):
        server.receive_datagram(data, moved, now=0.02)
    path = server.get_peer_address()[:2]
    assert path == CLIENT_ADDR or not server.peer_address_validated  # not trusted yet
    for _ in range(4):  # the challenge goes out, the client answers from its new address
        for data, _ in server.datagrams_to_send(now=0.03):
            client.receive_datagram(data, SERVER_ADDR, now=0.03)
        for data, _ in client.datagrams_to_send(now=0.03):
            server.receive_datagram(data, moved, now=0.03)
    assert server.peer_address_validated and server.get_peer_address()[:2] == moved


def _move(client: Any, server: Any, to: tuple[str, int], *, now: float) -> list[Any]:
    """The client's traffic now reaches the server from ``to``; returns the addresses the
    server sent to, in order, while the path settles."""
    sent_to: list[Any] = []
    client.send_ping(int(now * 1000))
    for data, _ in client.datagrams_to_send(now=now):
        server.receive_datagram(data, to, now=now)
    for _ in range(4):  # the challenge, the client's answer from ``to``
        for data, addr in server.datagrams_to_send(now=now):
            sent_to.append(addr[:2])
            if addr[:2] == to:  # what goes to an address the client left is lost
                client.receive_datagram(data, SERVER_ADDR, now=now)
        for data, _ in client.datagrams_to_send(now=now):
            server.receive_datagram(data, to, now=now)
    return sent_to


def _connected_pair(material: pki.PkiMaterial, kind: str) -> tuple[Any, Any]:
    client = _client(material, kind)
    client.connect(SERVER_ADDR, now=0.0)
    first = client.datagrams_to_send(now=0.0)
    header = engine.parse_datagram_header(first[0][0])
    assert header is not None
    server = _server(material, kind, header.destination_cid)
    for data, _ in first:
        server.receive_datagram(data, CLIENT_ADDR, now=0.0)
    _exchange(client, server, now=0.01)
    assert server.handshake_complete and server.get_peer_address()[:2] == CLIENT_ADDR
    return client, server


@pytest.mark.parametrize("kind", ENGINES)
def test_the_server_follows_a_client_that_moves_away_and_back(
    material: pki.PkiMaterial, kind: str
) -> None:
    """A node that moves to another network and back (docs/pki-and-quic.md, "Returning
    addresses"): after each move the server validates the path and sends there, also to an
    address the connection used before; the addresses the server hands the socket are
    always the real ones."""
    client, server = _connected_pair(material, kind)
    away = ("10.0.1.7", 40000)
    steps = [(away, 1.0), (CLIENT_ADDR, 2.0), (away, 3.0)]
    for to, now in steps:
        sent_to = _move(client, server, to, now=now)
        if kind == "qh3":
            assert to in sent_to, (to, sent_to)  # the challenge went to the new address
        assert server.peer_address_validated
        assert server.get_peer_address()[:2] == to
        server.send_datagram_frame(b"after the move")
        out = server.datagrams_to_send(now=now + 0.01)
        assert out and all(addr[:2] == to for _, addr in out), out
        for data, addr in out:
            assert len(addr) == 2  # the socket's own form (an AF_INET socket here)
            client.receive_datagram(data, SERVER_ADDR, now=now + 0.01)
        assert any(
            isinstance(e, DatagramFrameReceived) and e.data == b"after the move"
            for e in _drain(client)
        )


def test_a_return_is_not_taken_on_an_unanswered_packet(material: pki.PkiMaterial) -> None:
    """qh3: a packet of the connection copied and sent from the address the node left (an
    on-path attacker) makes the server probe that address, never switch to it: the node,
    not there any more, does not answer and the server keeps the current path. (aioquic
    switches back at once to an address it validated before, as RFC 9000 section 9.3
    allows: docs/pki-and-quic.md.)"""
    kind = "qh3"
    client, server = _connected_pair(material, kind)
    away = ("10.0.1.7", 40000)
    _move(client, server, away, now=1.0)
    assert server.get_peer_address()[:2] == away
    client.send_ping(99)
    (data, _), *_ = client.datagrams_to_send(now=2.0)
    server.receive_datagram(data, CLIENT_ADDR, now=2.0)  # copied, sent from the old address
    for _ in range(3):
        for _data, addr in server.datagrams_to_send(now=2.0):
            assert len(addr) == 2
    assert server.get_peer_address()[:2] == away
    server.send_datagram_frame(b"still here")
    out = server.datagrams_to_send(now=2.1)
    assert out and all(addr[:2] == away for _, addr in out)


def test_returning_address_forms_change_once_per_stale_path() -> None:
    """The map behind the returning-address fix: an address gets a new core form only when
    its form went stale (or its probe went unanswered), once however many datagrams come
    from it, at most ``_MAX_EPOCHS`` times in all; the real address comes back on the way
    out, and a form never equals a real (received) address."""
    first, away = ("10.0.0.1", 40000), ("10.0.1.7", 40000)
    paths = engine_qh3._ReturningAddresses(first)
    assert paths.core_address(first, 0.0) == first
    assert paths.core_address(away, 1.0) == away  # new to the core: as it is
    paths.probing_started()
    assert paths.active_changed(away)
    assert not paths.active_changed(away)
    forms = {paths.core_address(first, 2.0 + i) for i in range(50)}  # replays, junk
    assert len(forms) == 1
    (form,) = forms
    assert form != first and form[:2] == ("::ffff:10.0.0.1", 40000)
    assert form[2] & 0xF000_0000  # no received flowinfo (28 bits) has these bits
    assert paths.real_address(form) == first and paths.to_real == {form: first}
    # a probe never answered: the address is offered again after _REPROBE_AFTER only
    paths.probing_started()  # the core probed ``form`` at 51.0
    assert paths.core_address(first, 51.0 + engine_qh3._REPROBE_AFTER / 2) == form
    again = paths.core_address(first, 51.0 + engine_qh3._REPROBE_AFTER + 1)
    assert again not in (form, first) and paths.real_address(again) == first
    # on a slow path the wait is a few RTTs: an answer still on its way is not given up
    paths.probing_started()  # the core probed ``again`` at 52.3
    slow = engine_qh3._REPROBE_RTTS * 0.5
    assert paths.core_address(first, 52.4 + slow / 2, rtt=0.5) == again
    assert paths.core_address(first, 52.4 + slow, rtt=0.5) not in (again, first)
    # bounded whatever happens
    for i in range(2 * engine_qh3._MAX_EPOCHS):
        paths.probing_started()
        paths.core_address(first, 100.0 + 10 * i)
    assert len(paths.to_real) == engine_qh3._MAX_EPOCHS
    v6 = ("2001:db8::1", 443, 0, 3)
    six = engine_qh3._ReturningAddresses(v6)
    six.active_changed(("2001:db8::2", 443, 0, 3))
    assert six.core_address(v6, 0.0)[::3] == ("2001:db8::1", 3)


def _fire_due(conn: Any, now: float) -> None:
    when = conn.get_timer()
    if when is not None and when <= now:
        conn.handle_timer(now=now)


def _settled_pair(material: pki.PkiMaterial) -> tuple[Any, Any, float]:
    """A connected qh3 pair with the handshake's own acknowledgements exchanged; the time."""
    client, server = _connected_pair(material, "qh3")
    now = 0.02
    for _ in range(5):  # settle the handshake's own acknowledgements
        now += 0.01
        _fire_due(client, now)
        _fire_due(server, now)
        _exchange(client, server, now=now, rounds=2)
    _drain(client)
    _drain(server)
    return client, server, now


def test_an_echo_reply_carries_the_acknowledgement(material: pki.PkiMaterial) -> None:
    """Request in, reply out 0.15 ms later: the reply acknowledges the request, so no
    ACK-only datagram (and no timer wake-up for it) follows from the replying side."""
    client, server, now = _settled_pair(material)
    for i in range(5):
        now += 0.005
        _fire_due(client, now)
        _fire_due(server, now)
        client.send_datagram_frame(b"request %d" % i)
        request = client.datagrams_to_send(now=now)
        assert len(request) == 1
        server.receive_datagram(request[0][0], CLIENT_ADDR, now=now)
        assert [e.data for e in _drain(server)] == [b"request %d" % i]
        now += 0.00015
        server.send_datagram_frame(b"reply %d" % i)
        reply = server.datagrams_to_send(now=now)
        assert len(reply) == 1
        client.receive_datagram(reply[0][0], SERVER_ADDR, now=now)
        assert [e.data for e in _drain(client)] == [b"reply %d" % i]
        # The request was acknowledged by the reply: the client has nothing in flight
        # (loss detection disarmed), and the server has no acknowledgement left to send.
        assert client._core.bytes_in_flight == 0
        deadline = server._core.get_timer()
        assert deadline is None or deadline[0] != "ack_application"
        now += 0.002  # past any ACK delay: the server still sends nothing
        _fire_due(server, now)
        assert server.datagrams_to_send(now=now) == []


@pytest.mark.parametrize("at_once", [False, True])
def test_a_signalling_server_acknowledges_a_ping_in_the_pass_that_received(
    material: pki.PkiMaterial, at_once: bool
) -> None:
    """``ack_at_once`` (the NMS's endpoint): an idle node's PING is acknowledged in the pass
    that received it, so it costs the server one wake-up; without it, the ACK waits for the
    core's ACK delay (a timer wake-up 1 ms later)."""
    client, server, now = _settled_pair(material)
    server._ack_at_once = at_once
    now += 0.5
    client.send_ping(7)
    ping = client.datagrams_to_send(now=now)
    assert len(ping) == 1
    server.receive_datagram(ping[0][0], CLIENT_ADDR, now=now)
    _drain(server)
    answer = server.datagrams_to_send(now=now)
    timer = server._core.get_timer()
    if not at_once:
        assert answer == [] and timer is not None and timer[0] == "ack_application"
        return
    assert len(answer) == 1
    assert timer is None or timer[0] != "ack_application"
    client.receive_datagram(answer[0][0], SERVER_ADDR, now=now)
    assert [e.uid for e in _drain(client) if isinstance(e, PingAcknowledged)] == [7]
