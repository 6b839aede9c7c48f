"""The TCP 443 transport on loopback: a client whose UDP gets no answer reaches the service
over a TLS stream into the service's one QUIC endpoint, then moves back to UDP on the same
QUIC connection when UDP returns; bad streams are refused with no state left behind."""

from __future__ import annotations

import asyncio
import ipaddress
import ssl
from typing import Any

import pytest
from cyphonic.config import ALPN_SIGNALLING
from cyphonic.errors import InvalidArgument, Overloaded, Timeout, Unavailable
from cyphonic.quic import Acceptor, QuicEndpoint
from cyphonic.quic.path_choice import Carrier, PathChoice
from cyphonic.quic.stream_framing import encode_frame, encode_preface
from cyphonic.quic.tcp_transport import (
    STREAM_ALPN,
    HttpsProxy,
    StreamPaths,
    TcpListener,
    open_stream,
)
from cyphonic.stream_address import is_stream_host
from quic_harness import NMS_NAME, EndpointMaker, Handlers, Pki, dial_nms, request

pytestmark = pytest.mark.timeout(60)


class UdpFirewall:
    """A datagram filter on the service: drops what came over UDP while ``blocked``."""

    def __init__(self) -> None:
        self.blocked = True
        self.dropped = 0

    def __call__(self, data: bytes, addr: Any) -> bool:
        if self.blocked and not is_stream_host(ipaddress.ip_address(addr[0])):
            self.dropped += 1
            return True
        return False


async def _service(
    endpoints: EndpointMaker, ca: Pki, **kwargs: Any
) -> tuple[QuicEndpoint, TcpListener, Handlers]:
    handlers = Handlers()
    server = await endpoints(
        host="::",
        identity=ca.service("nms"),
        trust=ca.trust,
        accept={ALPN_SIGNALLING: Acceptor(handlers.factory, expect="node")},
        **kwargs,
    )
    listener = TcpListener(server, ca.service("nms"))
    await listener.start("::", server.local_address[1])
    return server, listener, handlers


async def test_udp_blocked_then_back(endpoints: EndpointMaker, ca: Pki) -> None:
    server, listener, handlers = await _service(endpoints, ca)
    firewall = UdpFirewall()
    server.datagram_filter = firewall
    client = await endpoints(host="::", identity=ca.node("alice"), trust=ca.trust)
    choice = PathChoice(race_delay_s=0.2, probe_interval_s=0.5)
    paths = StreamPaths(client, trust=ca.trust, choice=choice)
    try:
        port = server.local_address[1]
        conn = await dial_nms(client, ("127.0.0.1", port), timeout=10)
        assert await request(conn, b"over tcp") == b"echo:over tcp"
        assert choice.carrier is Carrier.TCP
        assert paths.snapshot()["carrier"] == "tcp"
        assert firewall.dropped >= 1  # the first flight did go out over UDP
        (server_side,) = handlers.made
        assert is_stream_host(ipaddress.ip_address(server_side.conn.peer_address[0]))
        assert listener.stats.streams_accepted == 1

        # A second service connection goes straight over the stream: nothing over UDP.
        dropped = firewall.dropped
        conn2 = await dial_nms(client, ("127.0.0.1", port), timeout=10)
        assert await request(conn2, b"again") == b"echo:again"
        assert firewall.dropped == dropped
        conn2.close()

        # UDP comes back: the probe sees it, the same connection moves to UDP.
        firewall.blocked = False
        async with asyncio.timeout(20):
            while not (  # noqa: ASYNC110 - endpoint state, no event to wait on
                choice.carrier is Carrier.UDP
                and not is_stream_host(ipaddress.ip_address(server_side.conn.peer_address[0]))
            ):
                await asyncio.sleep(0.1)
        assert await request(conn, b"over udp") == b"echo:over udp"
        assert conn.is_ready and choice.switches_to_udp == 1
        assert paths.snapshot()["moves_to_udp"] == 1
    finally:
        await paths.close()
        await listener.close()


async def test_stateless_answers_go_onto_the_stream(endpoints: EndpointMaker, ca: Pki) -> None:
    # A Retry (every Initial asked for one) and a refusal (no handshake room) answer a
    # client that reached the service over TCP 443: they go back onto its stream.
    server, listener, _ = await _service(endpoints, ca, retry_threshold=0)
    firewall = UdpFirewall()
    server.datagram_filter = firewall
    client = await endpoints(host="::", identity=ca.node("alice"), trust=ca.trust)
    paths = StreamPaths(client, trust=ca.trust, choice=PathChoice(race_delay_s=0.2))
    try:
        port = server.local_address[1]
        conn = await dial_nms(client, ("127.0.0.1", port), timeout=10)
        assert await request(conn, b"after a retry") == b"echo:after a retry"
        assert server.stats.retries_sent >= 1
        assert paths.snapshot()["carrier"] == "tcp"
        server.max_handshakes = 0
        with pytest.raises(Overloaded):
            await dial_nms(client, ("127.0.0.1", port), timeout=5)
        assert server.stats.refusals_sent >= 1
    finally:
        await paths.close()
        await listener.close()


async def test_udp_answers_first_stays_udp(endpoints: EndpointMaker, ca: Pki) -> None:
    server, listener, _ = await _service(endpoints, ca)
    client = await endpoints(host="::", identity=ca.node("alice"), trust=ca.trust)
    choice = PathChoice(race_delay_s=0.5, probe_interval_s=30)
    paths = StreamPaths(client, trust=ca.trust, choice=choice)
    try:
        conn = await dial_nms(client, ("127.0.0.1", server.local_address[1]))
        assert await request(conn, b"x") == b"echo:x"
        assert choice.carrier is Carrier.UDP
        await asyncio.sleep(0.7)  # past the race delay: still no stream
        assert listener.stats.streams_accepted == 0
        # Races one after another leave no watcher behind (nor one watching itself).
        for _ in range(3):
            again = await dial_nms(client, ("127.0.0.1", server.local_address[1]))
            assert await request(again, b"y") == b"echo:y"
            await asyncio.sleep(0.6)
            assert client.datagram_filter is None
        assert listener.stats.streams_accepted == 0
    finally:
        await paths.close()
        await listener.close()


async def test_no_tcp_listener_gives_up_with_the_reason(endpoints: EndpointMaker, ca: Pki) -> None:
    server = await endpoints(
        host="::",
        identity=ca.service("nms"),
        trust=ca.trust,
        accept={ALPN_SIGNALLING: Handlers().factory},
    )
    server.datagram_filter = UdpFirewall()
    client = await endpoints(host="::", identity=ca.node("alice"), trust=ca.trust)
    paths = StreamPaths(client, trust=ca.trust, choice=PathChoice(race_delay_s=0.1))
    try:
        with pytest.raises(Timeout):
            await client.connect(
                ("127.0.0.1", server.local_address[1]),
                alpn=ALPN_SIGNALLING,
                expected_name=NMS_NAME,
                timeout=2,
            )
        assert "cannot open TCP" in paths.last_error
    finally:
        await paths.close()


async def test_listener_refuses_bad_streams(endpoints: EndpointMaker, ca: Pki) -> None:
    server, listener, _ = await _service(endpoints, ca)
    port = server.local_address[1]
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols([STREAM_ALPN])
    try:
        for garbage in (
            b"GET / HTTP/1.1\r\n\r\n",  # not this protocol
            encode_preface(2),  # another version: answered with ours, then closed
            encode_preface() + b"\xff\xff" + b"x" * 10,  # a frame over the limit
            encode_preface() + b"\x00\x00",  # an empty frame
        ):
            reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx)
            writer.write(garbage)
            async with asyncio.timeout(5):
                rest = await reader.read()
                while chunk := await reader.read():
                    rest += chunk
            assert rest in (b"", encode_preface())
            writer.close()
        async with asyncio.timeout(5):
            while listener.stats.streams_refused < 4 or listener.streams:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        # A valid stream carrying a frame that is no QUIC packet: dropped, stream kept.
        reader, writer = await open_stream("127.0.0.1", port, trust=ca.trust, server_name=NMS_NAME)
        writer.write(encode_frame(b"\x40" + b"\x00" * 30))
        await asyncio.sleep(0.2)
        assert len(listener.streams) == 1
        assert not server.connections
        writer.close()
        # The wrong name for the outer TLS: refused by the client.
        with pytest.raises(Unavailable):
            await open_stream("127.0.0.1", port, trust=ca.trust, server_name="as.svc.example")
    finally:
        await listener.close()


def test_proxy_urls() -> None:
    assert HttpsProxy.parse("http://10.0.0.1:3128") == HttpsProxy("10.0.0.1", 3128)
    assert str(HttpsProxy.parse("proxy.example:8080")) == "proxy.example:8080"
    with_auth = HttpsProxy.parse("http://u%40x:p@proxy:3128")
    assert with_auth.authorization == "Basic dUB4OnA="
    assert "p@" not in str(with_auth) and "dUB4" not in repr(with_auth)
    with pytest.raises(InvalidArgument):
        HttpsProxy.parse("socks5://proxy:1080")
