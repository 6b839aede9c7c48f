"""Two real aioquic endpoints talk through the forwarding core (no sockets, fake clock).

This is pattern 3 in miniature: each side uses only the CIDs the TRS issued it, the client
opens with one of the peer's CIDs, and every datagram passes ``RelayCore`` unchanged.
"""

from __future__ import annotations

import os

from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from cyphonic_testing.trs import self_signed, use_relay_cids
from cyphonic_trs.cid import issue_cid
from cyphonic_trs.relay import Forward, RelayCore
from cyphonic_trs.session import RelaySession, RelaySide

A, B = "a.cyphonic.internal", "b.cyphonic.internal"
ADDR_A, ADDR_B, TRS = ("198.51.100.7", 40001), ("203.0.113.9", 50002), ("192.0.2.1", 443)
MARKER = b"CYPHONIC-MARKER-7f3a"


def test_handshake_stream_and_datagrams_through_the_relay() -> None:
    cids_a = [issue_cid(1, os.urandom) for _ in range(16)]
    cids_b = [issue_cid(1, os.urandom) for _ in range(16)]
    core = RelayCore(replica_id=1)
    core.install(
        RelaySession(
            route_id="r",
            replica_id=1,
            pair=(A, B),
            created_ms=0,
            version=2,
            sides=(
                RelaySide(fqdn=A, addr=ADDR_A, cids=tuple(cids_a), allocated_ms=0),
                RelaySide(fqdn=B, addr=ADDR_B, cids=tuple(cids_b), allocated_ms=0),
            ),
        ),
        now=0.0,
    )

    cert, key = self_signed(B)
    client = QuicConnection(
        configuration=QuicConfiguration(
            is_client=True,
            alpn_protocols=["cyphonic-tun/1"],
            verify_mode=0,
            max_datagram_frame_size=65536,
        )
    )
    use_relay_cids(client, cids_a, peer_initial=cids_b[0])
    server_cfg = QuicConfiguration(
        is_client=False, alpn_protocols=["cyphonic-tun/1"], max_datagram_frame_size=65536
    )
    server_cfg.certificate, server_cfg.private_key = cert, key
    server: QuicConnection | None = None

    forwarded: list[bytes] = []
    got: dict[str, list[bytes]] = {"stream": [], "datagram": []}
    now = 1.0
    client.connect(TRS, now=now)

    def pump() -> None:
        nonlocal server, now
        for _ in range(200):
            moved = False
            for data, _ in client.datagrams_to_send(now=now):
                moved = True
                action = core.datagram_received(data, ADDR_A, now)
                assert action == Forward(ADDR_B)
                forwarded.append(data)
                if server is None:
                    server = QuicConnection(
                        configuration=server_cfg, original_destination_connection_id=data[6:14]
                    )
                    use_relay_cids(server, cids_b[1:])
                server.receive_datagram(data, TRS, now=now)
            if server is not None:
                for data, _ in server.datagrams_to_send(now=now):
                    moved = True
                    action = core.datagram_received(data, ADDR_B, now)
                    assert action == Forward(ADDR_A)
                    forwarded.append(data)
                    client.receive_datagram(data, TRS, now=now)
                while (event := server.next_event()) is not None:
                    if isinstance(event, events.StreamDataReceived):
                        got["stream"].append(event.data)
                        server.send_stream_data(
                            event.stream_id, event.data, end_stream=event.end_stream
                        )
                    elif isinstance(event, events.DatagramFrameReceived):
                        got["datagram"].append(event.data)
            if not moved:
                return
            now += 0.005

    pump()
    assert server is not None
    hs = [e for e in iter(client.next_event, None) if isinstance(e, events.HandshakeCompleted)]
    assert hs, "handshake did not complete through the relay"
    stream_id = client.get_next_available_stream_id()
    client.send_stream_data(stream_id, MARKER * 100, end_stream=True)
    client.send_datagram_frame(MARKER + b"-datagram")
    pump()
    assert b"".join(got["stream"]) == MARKER * 100
    assert got["datagram"] == [MARKER + b"-datagram"]
    echoed = b"".join(
        e.data for e in iter(client.next_event, None) if isinstance(e, events.StreamDataReceived)
    )
    assert echoed == MARKER * 100

    # Later CIDs come from the TRS pool too: switch the client to another CID of B's.
    client.change_connection_id()
    client.send_datagram_frame(MARKER + b"-after-cid-change")
    pump()
    assert got["datagram"][-1] == MARKER + b"-after-cid-change"
    assert {d[1:9] for d in forwarded if not d[0] & 0x80} & set(cids_b[2:])

    assert all(MARKER not in d for d in forwarded)
    stats = core.session("r", now)
    assert stats.packets == len(forwarded) and stats.bytes == sum(map(len, forwarded))
