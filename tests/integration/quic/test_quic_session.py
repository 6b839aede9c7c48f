"""SignallingSession over the real endpoint on loopback: requests, typed errors, pushes,
timeouts and connection loss."""

from __future__ import annotations

import asyncio

import pytest
from cyphonic.config import ALPN_SIGNALLING
from cyphonic.errors import (
    CyphonicError,
    InternalError,
    NotFound,
    PermissionDenied,
    Timeout,
    Unavailable,
    UnexpectedMessage,
)
from cyphonic.quic import Acceptor
from cyphonic.session import SignallingSession
from cyphonic.v1 import signalling_pb2 as pb
from cyphonic.wire.messages import wrap
from google.protobuf.message import Message
from quic_harness import DOMAIN, NMS_NAME, EndpointMaker, Pki, port_of

pytestmark = pytest.mark.timeout(60)


class Nms:
    """A small server: answers login and keepalive, records what it saw."""

    def __init__(self) -> None:
        self.sessions: list[SignallingSession] = []
        self.seen: list[tuple[str, str]] = []
        self.release = asyncio.Event()

    async def handle(self, message: pb.Envelope, session: SignallingSession) -> Message | None:
        body = message.WhichOneof("body")
        self.seen.append((session.peer.name, str(body)))
        if body == "login_request":
            if message.login_request.agent_version == "forbidden":
                raise PermissionDenied("this agent version may not log in")
            if message.login_request.agent_version == "crash":
                raise RuntimeError("handler bug")
            return pb.LoginResponse(fqdn=session.peer.name, nms_server_name=NMS_NAME)
        if body == "keepalive":
            if message.keepalive.sequence == 999:
                await self.release.wait()  # an answer that comes too late
            return wrap(pb.KeepaliveAck(sequence=message.keepalive.sequence))
        if body == "route_request":
            raise NotFound("no such node")
        return None


async def _pair(
    endpoints: EndpointMaker, ca: Pki, *, client_handler: object = None
) -> tuple[Nms, SignallingSession, list[SignallingSession]]:
    nms = Nms()
    server = await endpoints(
        identity=ca.service("nms"),
        trust=ca.trust,
        accept={
            ALPN_SIGNALLING: Acceptor(
                SignallingSession.factory(nms.handle, on_open=nms.sessions.append), expect="node"
            )
        },
    )
    client_sessions: list[SignallingSession] = []
    client = await endpoints(identity=ca.node("alice"), trust=ca.trust)
    conn = await client.connect(
        port_of(server),
        alpn=ALPN_SIGNALLING,
        expected_name=NMS_NAME,
        handler_factory=SignallingSession.factory(client_handler, on_open=client_sessions.append),  # type: ignore[arg-type]
    )
    assert isinstance(conn.handler, SignallingSession)
    return nms, conn.handler, client_sessions


async def test_request_and_response(endpoints: EndpointMaker, ca: Pki) -> None:
    nms, session, _ = await _pair(endpoints, ca)
    answer = await session.request(pb.LoginRequest(agent_version="1.0"), timeout=5)
    assert answer.WhichOneof("body") == "login_response"
    assert answer.login_response.fqdn == f"alice.{DOMAIN}"  # the server saw the verified peer
    assert nms.seen == [(f"alice.{DOMAIN}", "login_request")]
    assert session.peer.name == NMS_NAME

    answers = await asyncio.gather(
        *(session.request(wrap(pb.Keepalive(sequence=i)), timeout=5) for i in range(40))
    )
    assert [a.keepalive_ack.sequence for a in answers] == list(range(40))
    assert session.signalling.open_streams == 0


@pytest.mark.parametrize(
    ("request_body", "error", "phrase"),
    [
        (pb.LoginRequest(agent_version="forbidden"), PermissionDenied, "may not log in"),
        (pb.LoginRequest(agent_version="crash"), InternalError, "internal error"),
        (pb.RouteRequest(fqdn=f"bob.{DOMAIN}"), NotFound, "no such node"),
        (pb.RegisterRequest(), InternalError, "no answer"),
    ],
)
async def test_handler_errors_become_typed_answers(
    endpoints: EndpointMaker,
    ca: Pki,
    request_body: Message,
    error: type[CyphonicError],
    phrase: str,
) -> None:
    _, session, _ = await _pair(endpoints, ca)
    with pytest.raises(error, match=phrase):
        await session.request(request_body, timeout=5)
    # The connection is still usable after an error answer.
    ok = await session.request(pb.Keepalive(sequence=7), timeout=5)
    assert ok.keepalive_ack.sequence == 7


async def test_client_cannot_send_a_push_body(endpoints: EndpointMaker, ca: Pki) -> None:
    _, session, _ = await _pair(endpoints, ca)
    with pytest.raises(UnexpectedMessage):
        await session.request(pb.RouteDirection(route_id="r"), timeout=5)


async def test_server_push_reaches_client_handler(endpoints: EndpointMaker, ca: Pki) -> None:
    got: asyncio.Queue[tuple[pb.Envelope, SignallingSession]] = asyncio.Queue()

    async def on_push(message: pb.Envelope, session: SignallingSession) -> None:
        got.put_nowait((message, session))

    nms, session, _ = await _pair(endpoints, ca, client_handler=on_push)
    await session.request(pb.LoginRequest(agent_version="1"), timeout=5)
    (server_session,) = nms.sessions
    assert server_session.peer.name == f"alice.{DOMAIN}"
    await server_session.push(pb.RouteDirection(route_id="r1", peer_fqdn=f"bob.{DOMAIN}"))
    await server_session.push(wrap(pb.PeerOffline(fqdn=f"bob.{DOMAIN}", route_id="r1")))
    first, via = await asyncio.wait_for(got.get(), 5)
    second, _ = await asyncio.wait_for(got.get(), 5)
    assert via is session
    assert first.route_direction.route_id == "r1"
    assert second.peer_offline.fqdn == f"bob.{DOMAIN}"
    # Both halves of each push stream end: no state left on either side.
    async with asyncio.timeout(5):
        while server_session.signalling.open_streams or session.signalling.open_streams:  # noqa: ASYNC110
            await asyncio.sleep(0.01)


async def test_request_timeout_then_late_answer_is_ignored(
    endpoints: EndpointMaker, ca: Pki
) -> None:
    nms, session, _ = await _pair(endpoints, ca)
    with pytest.raises(Timeout, match="no answer"):
        await session.request(pb.Keepalive(sequence=999), timeout=0.3)
    nms.release.set()
    ok = await session.request(pb.Keepalive(sequence=1), timeout=5)
    assert ok.keepalive_ack.sequence == 1


async def test_pending_requests_fail_when_the_connection_ends(
    endpoints: EndpointMaker, ca: Pki
) -> None:
    lost: list[CyphonicError | None] = []
    nms = Nms()
    server = await endpoints(
        identity=ca.service("nms"),
        trust=ca.trust,
        accept={ALPN_SIGNALLING: SignallingSession.factory(nms.handle)},
    )
    client = await endpoints(identity=ca.node("alice"), trust=ca.trust)
    conn = await client.connect(
        port_of(server),
        alpn=ALPN_SIGNALLING,
        expected_name=NMS_NAME,
        handler_factory=SignallingSession.factory(on_lost=lambda s, e: lost.append(e)),
    )
    session = conn.handler
    assert isinstance(session, SignallingSession)
    pending = asyncio.ensure_future(session.request(pb.Keepalive(sequence=999), timeout=30))
    async with asyncio.timeout(5):
        while not nms.seen:  # noqa: ASYNC110 - until the server holds the request
            await asyncio.sleep(0.01)
    await server.close("maintenance")
    with pytest.raises(Unavailable, match="maintenance"):
        await asyncio.wait_for(pending, 5)
    error = await asyncio.wait_for(session.wait_closed(), 5)
    assert isinstance(error, Unavailable)
    assert lost == [error]
    with pytest.raises(Unavailable):
        await session.request(pb.Keepalive(sequence=2))


async def test_close_with_error_tells_the_peer(endpoints: EndpointMaker, ca: Pki) -> None:
    nms, session, _ = await _pair(endpoints, ca)
    await session.request(pb.Keepalive(sequence=1), timeout=5)
    (server_session,) = nms.sessions
    server_session.close(PermissionDenied("certificate revoked by operator"))
    error = await asyncio.wait_for(session.wait_closed(), 5)
    assert isinstance(error, Unavailable)
    assert "permission_denied: certificate revoked by operator" in str(error)
