"""Helpers of the QUIC endpoint tests: PKI wrapper, recording handlers, requests."""

from __future__ import annotations

import asyncio
import datetime
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aioquic.quic.events import DatagramFrameReceived, QuicEvent, StreamDataReceived
from cyphonic import pki
from cyphonic.config import ALPN_SIGNALLING, ALPN_TUNNEL
from cyphonic.errors import CyphonicError
from cyphonic.quic import Acceptor, Connection, QuicEndpoint

DOMAIN = "cyphonic.internal"
NMS_NAME = f"nms.svc.{DOMAIN}"


def utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


@dataclass
class Pki:
    material: pki.PkiMaterial

    @property
    def trust(self) -> pki.TrustStore:
        return self.material.trust

    def service(self, name: str) -> pki.CertifiedKey:
        return self.material.services[name]

    def node(
        self,
        name: str,
        *,
        now: datetime.datetime | None = None,
        valid_for: datetime.timedelta = pki.NODE_CERT_VALIDITY,
    ) -> pki.CertifiedKey:
        key = pki.generate_key()
        fqdn = f"{name}.{DOMAIN}"
        cert = pki.sign_node_csr(
            self.material.node_ca,
            pki.make_csr(key, fqdn),
            fqdn=fqdn,
            now=now or utcnow(),
            valid_for=valid_for,
        )
        return pki.CertifiedKey(key=key, cert=cert, chain=[self.material.node_ca.cert])


@dataclass
class Recorder:
    """A connection handler that records everything and echoes stream data."""

    conn: Connection
    log: list[Any] = field(default_factory=list)
    echo: bool = True
    lost: asyncio.Future[CyphonicError | None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
    streams: dict[int, bytes] = field(default_factory=dict)
    finished: asyncio.Queue[tuple[int, bytes]] = field(default_factory=asyncio.Queue)
    datagrams: asyncio.Queue[bytes] = field(default_factory=asyncio.Queue)

    def quic_event_received(self, event: QuicEvent) -> None:
        self.log.append(event)
        if isinstance(event, StreamDataReceived):
            data = self.streams.get(event.stream_id, b"") + event.data
            self.streams[event.stream_id] = data
            if event.end_stream:
                self.finished.put_nowait((event.stream_id, data))
                if self.echo and _is_peer_initiated(self.conn, event.stream_id):
                    self.conn.quic.send_stream_data(
                        event.stream_id, b"echo:" + data, end_stream=True
                    )
                    self.conn.transmit()
        elif isinstance(event, DatagramFrameReceived):
            self.datagrams.put_nowait(event.data)

    def connection_lost(self, error: CyphonicError | None) -> None:
        if not self.lost.done():
            self.lost.set_result(error)


def _is_peer_initiated(conn: Connection, stream_id: int) -> bool:
    client_initiated = stream_id % 2 == 0
    return client_initiated != conn.is_client


@dataclass
class Handlers:
    """Every handler a factory made, in order."""

    made: list[Recorder] = field(default_factory=list)

    def factory(self, conn: Connection) -> Recorder:
        handler = Recorder(conn)
        self.made.append(handler)
        return handler


EndpointMaker = Callable[..., Awaitable[QuicEndpoint]]


def port_of(endpoint: QuicEndpoint) -> tuple[str, int]:
    return ("127.0.0.1", endpoint.local_address[1])


async def dial_node(
    client: QuicEndpoint, where: tuple[str, int], name: str = "bob", **kwargs: Any
) -> Connection:
    """A tunnel connection to node ``name`` at ``where``, answered by a ``Recorder``."""
    return await client.connect(
        where,
        alpn=ALPN_TUNNEL,
        expect="node",
        expected_name=f"{name}.{DOMAIN}",
        handler_factory=Handlers().factory,
        **kwargs,
    )


async def dial_nms(client: QuicEndpoint, where: tuple[str, int], **kwargs: Any) -> Connection:
    """A signalling connection to the NMS at ``where``, answered by a ``Recorder``."""
    return await client.connect(
        where,
        alpn=ALPN_SIGNALLING,
        expected_name=NMS_NAME,
        handler_factory=Handlers().factory,
        **kwargs,
    )


async def tunnel_pair(
    endpoints: EndpointMaker,
    ca: Pki,
    *,
    client_engine: str | None = None,
    server_engine: str | None = None,
) -> tuple[QuicEndpoint, QuicEndpoint, Connection, Recorder]:
    """Two node endpoints (engines as given, else the test's) and one tunnel between them:
    (alice's endpoint, bob's endpoint, alice's connection, bob's side of it)."""
    handlers = Handlers()
    server_options = {"engine": server_engine} if server_engine else {}
    client_options = {"engine": client_engine} if client_engine else {}
    bob = await endpoints(
        identity=ca.node("bob"),
        trust=ca.trust,
        accept={ALPN_TUNNEL: Acceptor(handlers.factory, expect="node")},
        **server_options,
    )
    alice = await endpoints(identity=ca.node("alice"), trust=ca.trust, **client_options)
    conn = await dial_node(alice, port_of(bob))
    (bob_side,) = handlers.made
    return alice, bob, conn, bob_side


async def request(conn: Connection, data: bytes, *, within: float = 5.0) -> bytes:
    """Send ``data`` on a new bidi stream and wait for the whole answer."""
    handler = conn.handler
    assert isinstance(handler, Recorder)
    stream_id = conn.quic.get_next_available_stream_id()
    conn.quic.send_stream_data(stream_id, data, end_stream=True)
    conn.transmit()
    async with asyncio.timeout(within):
        while True:
            sid, answer = await handler.finished.get()
            if sid == stream_id:
                return answer
