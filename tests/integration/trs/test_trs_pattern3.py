"""Pattern 3 end to end on loopback with the project's QUIC endpoint and PKI.

Two node endpoints (node certificates, one UDP socket each) open mutual-TLS control
connections to a TRS replica (service certificate, real Redis), allocate their sides, and
then run their own node-to-node connection (ALPN cyphonic-tun/1, node-to-node mutual TLS)
through the TRS, which forwards every packet by CID inside its endpoint's drain loop.

The request framing here is a stand-in (one Envelope per stream, no length prefix); the
production framing is the shared signalling session's.
"""

from __future__ import annotations

import asyncio
import datetime
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aioquic.quic.events import DatagramFrameReceived, QuicEvent, StreamDataReceived
from cyphonic import pki
from cyphonic.config import ALPN_SIGNALLING, ALPN_TUNNEL
from cyphonic.errors import CyphonicError
from cyphonic.quic import Acceptor, Connection, QuicEndpoint
from cyphonic.v1 import signalling_pb2 as pb
from cyphonic_testing.trs import TEST_SECRET, mint_token
from cyphonic_trs.config import TrsSettings
from cyphonic_trs.control import TrsControlPlane, answer_request
from cyphonic_trs.relay import Forward
from cyphonic_trs.service import TrsService
from cyphonic_trs.storage import RedisCidTable

pytestmark = [pytest.mark.redis, pytest.mark.timeout(60)]

DOMAIN = "cyphonic.internal"
A, B, C = (f"{n}.{DOMAIN}" for n in ("alice", "bob", "carol"))
TRS_NAME = f"trs.svc.{DOMAIN}"
MARKER = b"CYPHONIC-PATTERN3-MARKER"


def utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


@dataclass
class Peer:
    """A node's handler: collects stream answers; echoes streams and datagrams (tunnel)."""

    conn: Connection
    echo: bool = False
    buffers: dict[int, bytes] = field(default_factory=dict)
    done: asyncio.Queue[tuple[int, bytes]] = field(default_factory=asyncio.Queue)
    datagrams: asyncio.Queue[bytes] = field(default_factory=asyncio.Queue)

    def quic_event_received(self, event: QuicEvent) -> None:
        if isinstance(event, StreamDataReceived):
            data = self.buffers.pop(event.stream_id, b"") + event.data
            if not event.end_stream:
                self.buffers[event.stream_id] = data
                return
            if self.echo:
                self.conn.quic.send_stream_data(event.stream_id, data, end_stream=True)
                self.conn.transmit()
            else:
                self.done.put_nowait((event.stream_id, data))
        elif isinstance(event, DatagramFrameReceived):
            if self.echo:
                self.conn.send_datagram(event.data)
                self.conn.transmit()
            else:
                self.datagrams.put_nowait(event.data)

    def connection_lost(self, error: CyphonicError | None) -> None:
        return None


async def exchange(conn: Connection, data: bytes, *, within: float = 10.0) -> bytes:
    handler = conn.handler
    assert isinstance(handler, Peer)
    stream_id = conn.quic.get_next_available_stream_id()
    conn.quic.send_stream_data(stream_id, data, end_stream=True)
    conn.transmit()
    async with asyncio.timeout(within):
        while True:
            sid, answer = await handler.done.get()
            if sid == stream_id:
                return answer


async def allocate(ctl: Connection, token: bytes, route_id: str = "r1") -> pb.Envelope:
    request = pb.Envelope(
        version=pb.PROTOCOL_VERSION_1,
        relay_allocation_request=pb.RelayAllocationRequest(
            allocation_token=token, route_id=route_id
        ),
    )
    answer = pb.Envelope()
    answer.ParseFromString(await exchange(ctl, request.SerializeToString()))
    return answer


class ControlHandler:
    """TRS side of a control connection with the stand-in framing."""

    def __init__(self, conn: Connection, service: TrsService) -> None:
        self.conn, self.service = conn, service
        self.buffers: dict[int, bytes] = {}
        self.tasks: set[asyncio.Task[None]] = set()

    def quic_event_received(self, event: QuicEvent) -> None:
        if isinstance(event, StreamDataReceived):
            data = self.buffers.pop(event.stream_id, b"") + event.data
            if not event.end_stream:
                self.buffers[event.stream_id] = data
                return
            task = asyncio.ensure_future(self._answer(event.stream_id, data))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _answer(self, stream_id: int, data: bytes) -> None:
        message = pb.Envelope()
        message.ParseFromString(data)
        answer = await answer_request(self.service, message, connection=self.conn)
        self.conn.quic.send_stream_data(stream_id, answer.SerializeToString(), end_stream=True)
        self.conn.transmit()

    def connection_lost(self, error: CyphonicError | None) -> None:
        return None


@pytest.fixture(scope="module")
def pki_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A PKI directory as ``cyphonic-as init-pki`` leaves it (trs.crt and trs.key included)."""
    directory = tmp_path_factory.mktemp("pki")
    pki.init_pki(directory, domain=DOMAIN, now=utcnow())
    return directory


@pytest.fixture(scope="module")
def material(pki_dir: Path) -> pki.PkiMaterial:
    return pki.init_pki(pki_dir, domain=DOMAIN, now=utcnow())  # loads what is there


def node_identity(material: pki.PkiMaterial, fqdn: str) -> pki.CertifiedKey:
    key = pki.generate_key()
    cert = pki.sign_node_csr(material.node_ca, pki.make_csr(key, fqdn), fqdn=fqdn, now=utcnow())
    return pki.CertifiedKey(key=key, cert=cert, chain=[material.node_ca.cert])


@pytest.fixture
async def trs(
    redis_table: RedisCidTable, key_prefix: str, material: pki.PkiMaterial
) -> AsyncIterator[TrsService]:
    settings = TrsSettings(
        environment="test",
        quic_host="127.0.0.1",
        quic_port=0,
        replica_id=5,
        redis_url=os.environ.get("CYPHONIC_TEST_REDIS", "redis://127.0.0.1:6379/0"),
        redis_prefix=key_prefix,
        relay_token_secret=TEST_SECRET.decode(),
        pki_dir=Path("."),
    )

    def control(sock: Any, service: TrsService) -> TrsControlPlane:
        return TrsControlPlane.open(
            sock=sock,
            service=service,
            identity=material.services["trs"],
            trust=material.trust,
            handler_factory=lambda conn: ControlHandler(conn, service),
        )

    service = TrsService(settings, control=control)
    await service.start()
    try:
        yield service
    finally:
        await service.stop()


@pytest.fixture
async def nodes(material: pki.PkiMaterial) -> AsyncIterator[dict[str, QuicEndpoint]]:
    opened: dict[str, QuicEndpoint] = {}
    for fqdn in (A, B, C):
        opened[fqdn] = await QuicEndpoint.open(
            host="127.0.0.1",
            port=0,
            identity=node_identity(material, fqdn),
            trust=material.trust,
            accept={
                ALPN_TUNNEL: Acceptor(handler_factory=lambda c: Peer(c, echo=True), expect="node")
            },
        )
    try:
        yield opened
    finally:
        for endpoint in opened.values():
            await endpoint.close()


async def test_relayed_node_to_node_connection(
    trs: TrsService, nodes: dict[str, QuicEndpoint]
) -> None:
    assert trs.core is not None
    core = trs.core
    original = core.datagram_received
    forwarded: list[bytes] = []

    def spy(data: bytes, addr: Any, now: float) -> Any:
        action = original(data, addr, now)
        if isinstance(action, Forward):
            forwarded.append(data)
        return action

    core.datagram_received = spy  # type: ignore[method-assign]
    trs_addr = ("127.0.0.1", int(trs.address[1]))
    token = mint_token(route_id="r1", a=A, b=B, now_ms=int(time.time() * 1000))

    async def control(fqdn: str) -> Connection:
        return await nodes[fqdn].connect(
            trs_addr,
            alpn=ALPN_SIGNALLING,
            expect="service",
            expected_name=TRS_NAME,
            handler_factory=Peer,
        )

    ctl_b, ctl_a, ctl_c = await control(B), await control(A), await control(C)

    # B (the accepting side) allocates first, then A; C holds a stolen token.
    got_b = await allocate(ctl_b, token)
    assert got_b.WhichOneof("body") == "relay_allocation", got_b
    cids_b = list(got_b.relay_allocation.connection_ids)
    stolen = await allocate(ctl_c, token)
    assert stolen.error.code == pb.ERROR_CODE_TOKEN_INVALID
    got_a = await allocate(ctl_a, token)
    cids_a = list(got_a.relay_allocation.connection_ids)
    replay = await allocate(ctl_a, token)
    assert replay.error.code == pb.ERROR_CODE_TOKEN_INVALID
    session = core.session("r1", time.monotonic())
    assert session.complete
    assert session.sides[0].addr == nodes[A].local_address  # from the control connection
    assert session.sides[1].addr == nodes[B].local_address

    def b_cids(addr: Any, dcid: bytes) -> Any:
        return (lambda seq: cids_b[1 + seq]) if dcid in cids_b else None

    nodes[B].server_connection_id_factory = b_cids  # type: ignore[assignment]
    tunnel = await nodes[A].connect(
        trs_addr,
        alpn=ALPN_TUNNEL,
        expect="node",
        expected_name=B,
        handler_factory=Peer,
        connection_id_factory=lambda seq: cids_a[seq],
        initial_destination_cid=cids_b[0],
    )
    assert tunnel.peer is not None and tunnel.peer.name == B  # node-to-node mutual TLS
    payload = MARKER * 4000
    assert await exchange(tunnel, payload) == payload
    assert tunnel.send_datagram(MARKER + b"-datagram")
    tunnel.transmit()
    handler = tunnel.handler
    assert isinstance(handler, Peer)
    assert await asyncio.wait_for(handler.datagrams.get(), 5) == MARKER + b"-datagram"

    # The TRS relayed the tunnel blind: no tunnel connection of its own, no marker in clear.
    assert {c.alpn for c in trs.control.endpoint.connections} == {ALPN_SIGNALLING}  # type: ignore[union-attr]
    # (An entry is one datagram or a whole GRO train forwarded with one decision.)
    assert len(forwarded) > 20 and not any(MARKER in d for d in forwarded)
    stats = core.session("r1", time.monotonic())
    assert stats.packets >= len(forwarded)
    assert sum(s.bytes for s in stats.sides) == sum(len(d) for d in forwarded)
    assert stats.sides[0].bytes > len(payload) and stats.sides[1].bytes > len(payload)

    # The sync loop reads the validated control addresses; nothing moved, nothing changes.
    assert trs.control is not None
    observed = dict(trs.control.observe_addresses())
    assert observed == {
        A: nodes[A].local_address,
        B: nodes[B].local_address,
        C: nodes[C].local_address,
    }
    await trs.sync_once()
    assert core.session("r1", time.monotonic()).sides[0].addr == nodes[A].local_address


async def test_production_control_plane_over_signalling_sessions(
    redis_table: RedisCidTable,
    key_prefix: str,
    pki_dir: Path,
    nodes: dict[str, QuicEndpoint],
) -> None:
    """``cyphonic-trs serve``'s control plane: trs.crt from the PKI directory and the shared
    signalling session (framing, typed errors) on both ends."""
    from cyphonic.errors import TokenInvalid
    from cyphonic.session import SignallingSession

    settings = TrsSettings(
        environment="test",
        quic_host="127.0.0.1",
        quic_port=0,
        replica_id=6,
        redis_url=os.environ.get("CYPHONIC_TEST_REDIS", "redis://127.0.0.1:6379/0"),
        redis_prefix=key_prefix,
        relay_token_secret=TEST_SECRET.decode(),
        pki_dir=pki_dir,
    )
    service = TrsService(settings)  # the default control plane is the production one
    await service.start()
    try:
        trs_addr = ("127.0.0.1", int(service.address[1]))
        sessions = {}
        for fqdn in (A, B, C):
            conn = await nodes[fqdn].connect(
                trs_addr,
                alpn=ALPN_SIGNALLING,
                expect="service",
                expected_name=TRS_NAME,
                handler_factory=SignallingSession.factory(),
            )
            assert isinstance(conn.handler, SignallingSession)
            sessions[fqdn] = conn.handler
        token = mint_token(route_id="r7", a=A, b=B, now_ms=int(time.time() * 1000))
        request = pb.RelayAllocationRequest(allocation_token=token, route_id="r7")
        got_b = await sessions[B].request(request)
        assert len(got_b.relay_allocation.connection_ids) == 16
        with pytest.raises(TokenInvalid, match="another pair"):
            await sessions[C].request(request)
        got_a = await sessions[A].request(request)
        with pytest.raises(TokenInvalid, match="already used"):
            await sessions[A].request(request)
        assert service.core is not None
        stats = service.core.session("r7", time.monotonic())
        assert stats.complete and stats.sides[0].addr == nodes[A].local_address

        cids_a = list(got_a.relay_allocation.connection_ids)
        cids_b = list(got_b.relay_allocation.connection_ids)
        nodes[B].server_connection_id_factory = (  # type: ignore[assignment]
            lambda addr, dcid: (lambda seq: cids_b[1 + seq]) if dcid in cids_b else None
        )
        tunnel = await nodes[A].connect(
            trs_addr,
            alpn=ALPN_TUNNEL,
            expect="node",
            expected_name=B,
            handler_factory=Peer,
            connection_id_factory=lambda seq: cids_a[seq],
            initial_destination_cid=cids_b[0],
        )
        assert await exchange(tunnel, MARKER * 100) == MARKER * 100
        assert service.core.session("r7", time.monotonic()).packets > 0
    finally:
        await service.stop()
