"""SignallingConnection over two real aioquic connections joined in memory (fake clock).

Legal exchanges on both sides, then every illegal transition played by a raw peer that
writes straight onto its QUIC streams: the signalling side must answer with a typed error
and keep no state for the stream afterwards, neither in itself nor in aioquic.
"""

from __future__ import annotations

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cyphonic.errors import (
    CyphonicError,
    Exhausted,
    MalformedMessage,
    NotFound,
    OversizedMessage,
    RemoteError,
    Timeout,
    UnexpectedMessage,
    UnknownMessage,
    UnsupportedVersion,
)
from cyphonic.signalling import (
    MAX_INCOMING_STREAMS,
    TRANSITIONS,
    ErrorReceived,
    Opener,
    ProtocolErrorDetected,
    RequestReceived,
    ResponseReceived,
)
from cyphonic.v1 import signalling_pb2 as pb
from cyphonic.wire.framing import MAX_MESSAGE_SIZE, encode_frame
from cyphonic.wire.messages import body_name, wrap
from wire_quic_pair import CLIENT_ADDR, Pair, Side, StreamLog, server_certificate

Cert = tuple[x509.Certificate, ec.EllipticCurvePrivateKey]

REQUESTS = sorted(
    name for (opener, name), answers in TRANSITIONS.items() if opener is Opener.CLIENT
)
PUSHES = sorted(name for (opener, name), answers in TRANSITIONS.items() if opener is Opener.SERVER)


def body(name: str) -> pb.Envelope:
    """An envelope with an empty body of the given kind (empty bodies are valid)."""
    envelope = pb.Envelope(version=pb.PROTOCOL_VERSION_1)
    getattr(envelope, name).SetInParent()
    return envelope


def frame(name: str) -> bytes:
    return encode_frame(body(name))


@pytest.fixture(scope="module")
def cert() -> Cert:
    return server_certificate()


@pytest.fixture
def pair(cert: Cert) -> Pair:
    return Pair(cert=cert)


@pytest.fixture
def raw_client(cert: Cert) -> Pair:
    """The client writes raw bytes; the server runs SignallingConnection."""
    return Pair(cert=cert, client_signalling=False)


@pytest.fixture
def raw_server(cert: Cert) -> Pair:
    """The server writes raw bytes; the client runs SignallingConnection."""
    return Pair(cert=cert, server_signalling=False)


def assert_clean(*sides: Side) -> None:
    """No stream state left: not in the signalling layer, not in aioquic."""
    for side in sides:
        if side.signalling is not None:
            assert side.sig.open_streams == 0
            assert side.sig.incoming_streams == 0
            assert side.sig._stopped == set()
        assert side.quic._streams == {}, "aioquic still holds streams"


def refused_with(log: StreamLog, exc_type: type[CyphonicError]) -> None:
    """The raw side got one typed Error frame and the end of the stream."""
    [envelope] = log.envelopes()
    assert body_name(envelope) == "error"
    assert envelope.error.code == exc_type.code
    assert log.fin


def only_protocol_error(side: Side, exc_type: type[CyphonicError]) -> ProtocolErrorDetected:
    [event] = side.take()
    assert isinstance(event, ProtocolErrorDetected)
    assert type(event.error) is exc_type
    return event


# -- legal exchanges ----------------------------------------------------------------------


def test_request_and_response(pair: Pair) -> None:
    stream_id = pair.client.sig.send_request(pb.LoginRequest(agent_version="0.1"))
    assert pair.client.sig.open_streams == 1
    pair.pump()
    [request] = pair.server.take()
    assert request == RequestReceived(
        stream_id, wrap(pb.LoginRequest(agent_version="0.1")), pushed=False
    )
    assert pair.server.sig.incoming_streams == 1
    assert pair.server.sig.send_response(stream_id, pb.LoginResponse(fqdn="a.test.internal"))
    pair.pump()
    [response] = pair.client.take()
    assert isinstance(response, ResponseReceived)
    assert response.stream_id == stream_id
    assert response.message.login_response.fqdn == "a.test.internal"
    assert pair.server.take() == []
    assert_clean(pair.client, pair.server)


def test_concurrent_requests_are_matched_by_stream(pair: Pair) -> None:
    ids = [pair.client.sig.send_request(pb.Keepalive(sequence=n)) for n in range(10)]
    assert len(set(ids)) == 10
    pair.pump()
    requests = pair.server.take()
    assert [e.stream_id for e in requests] == ids
    for event in reversed(requests):  # answer in the other order
        assert isinstance(event, RequestReceived)
        seq = event.message.keepalive.sequence
        pair.server.sig.send_response(event.stream_id, pb.KeepaliveAck(sequence=seq))
    pair.pump()
    answers = {e.stream_id: e for e in pair.client.take()}
    for n, stream_id in enumerate(ids):
        answer = answers[stream_id]
        assert isinstance(answer, ResponseReceived)
        assert answer.message.keepalive_ack.sequence == n
    assert_clean(pair.client, pair.server)


@pytest.mark.parametrize(
    ("request_name", "answer_name"),
    [
        (req, ans)
        for (opener, req), answers in TRANSITIONS.items()
        if opener is Opener.CLIENT
        for ans in sorted(answers)
    ],
)
def test_every_request_with_each_answer(pair: Pair, request_name: str, answer_name: str) -> None:
    stream_id = pair.client.sig.send_request(body(request_name))
    pair.pump()
    [request] = pair.server.take()
    assert isinstance(request, RequestReceived) and not request.pushed
    assert body_name(request.message) == request_name
    assert pair.server.sig.send_response(stream_id, body(answer_name))
    pair.pump()
    [answer] = pair.client.take()
    assert isinstance(answer, ResponseReceived)
    assert body_name(answer.message) == answer_name
    assert_clean(pair.client, pair.server)


@pytest.mark.parametrize("request_name", REQUESTS)
def test_every_request_may_be_answered_with_an_error(pair: Pair, request_name: str) -> None:
    stream_id = pair.client.sig.send_request(body(request_name))
    pair.pump()
    pair.server.take()
    assert pair.server.sig.send_error(stream_id, NotFound("no such node"))
    pair.pump()
    [answer] = pair.client.take()
    assert isinstance(answer, ErrorReceived)
    assert type(answer.error) is NotFound
    assert answer.error.message == "no such node"
    assert_clean(pair.client, pair.server)


def test_remote_error_keeps_its_code(pair: Pair) -> None:
    stream_id = pair.client.sig.send_request(pb.RouteRequest(fqdn="b.test.internal"))
    pair.pump()
    pair.server.take()
    pair.server.sig.send_error(stream_id, RemoteError(77, "from a newer peer"))
    pair.pump()
    [answer] = pair.client.take()
    assert isinstance(answer, ErrorReceived) and isinstance(answer.error, RemoteError)
    assert answer.error.remote_code == 77


@pytest.mark.parametrize("push_name", PUSHES)
def test_every_push_is_one_way(pair: Pair, push_name: str) -> None:
    stream_id = pair.server.sig.send_request(body(push_name))
    pair.pump()
    [push] = pair.client.take()
    assert push == RequestReceived(stream_id, body(push_name), pushed=True)
    # nothing may answer a push; the client already ended its half
    assert not pair.client.sig.send_response(stream_id, body(push_name))
    assert not pair.client.sig.send_error(stream_id, NotFound("x"))
    pair.pump()
    assert pair.server.take() == []
    assert_clean(pair.client, pair.server)


def test_answer_in_two_steps(raw_server: Pair) -> None:
    """An answer frame first and the FIN later is fine: one event, nothing left after."""
    client, server = raw_server.client, raw_server.server
    stream_id = client.sig.send_request(pb.Keepalive(sequence=3))
    raw_server.pump()
    server.raw_send(stream_id, encode_frame(wrap(pb.KeepaliveAck(sequence=3))))
    raw_server.pump()
    [answer] = client.take()
    assert isinstance(answer, ResponseReceived)
    assert client.sig.open_streams == 1  # the peer's half is still open
    server.raw_send(stream_id, b"", end=True)
    raw_server.pump()
    assert client.take() == []
    assert_clean(client, server)


def test_streams_arriving_out_of_order(raw_client: Pair) -> None:
    """A later stream's request arriving first does not hide the earlier stream."""
    client, server = raw_client.client, raw_client.server
    first = client.next_stream()
    client.raw_send(first, frame("login_request"), end=True)
    early = client.quic.datagrams_to_send(now=raw_client.now)
    second = client.next_stream()
    client.raw_send(second, frame("keepalive"), end=True)
    late = client.quic.datagrams_to_send(now=raw_client.now)
    for data, _ in late + early:
        server.quic.receive_datagram(data, CLIENT_ADDR, now=raw_client.now)
    raw_client.drain(server)
    events = server.take()
    assert [
        (e.stream_id, body_name(e.message)) for e in events if isinstance(e, RequestReceived)
    ] == [(second, "keepalive"), (first, "login_request")]
    assert len(events) == 2


# -- misuse on the local side: refused before anything is sent ----------------------------


def test_client_cannot_push(pair: Pair) -> None:
    before = pair.client.next_stream()
    with pytest.raises(UnexpectedMessage, match="client cannot open"):
        pair.client.sig.send_request(pb.RouteDirection(route_id="r"))
    assert pair.client.next_stream() == before
    assert pair.client.sig.open_streams == 0


def test_server_cannot_send_requests(pair: Pair) -> None:
    with pytest.raises(UnexpectedMessage, match="server cannot open"):
        pair.server.sig.send_request(pb.LoginRequest())


@pytest.mark.parametrize("name", ["error", "login_response", "keepalive_ack", "relay_allocation"])
def test_answers_and_errors_cannot_open_a_stream(pair: Pair, name: str) -> None:
    with pytest.raises(UnexpectedMessage):
        pair.client.sig.send_request(body(name))
    with pytest.raises(UnexpectedMessage):
        pair.server.sig.send_request(body(name))


def test_envelope_checks_apply_on_send(pair: Pair) -> None:
    with pytest.raises(UnknownMessage):
        pair.client.sig.send_request(pb.Envelope(version=pb.PROTOCOL_VERSION_1))
    with pytest.raises(UnsupportedVersion):
        pair.client.sig.send_request(pb.Envelope(login_request=pb.LoginRequest()))
    with pytest.raises(OversizedMessage):
        pair.client.sig.send_request(pb.LoginRequest(agent_version="x" * MAX_MESSAGE_SIZE))
    assert pair.client.sig.open_streams == 0


def test_wrong_answer_type_is_refused_locally(pair: Pair) -> None:
    stream_id = pair.client.sig.send_request(pb.LoginRequest())
    pair.pump()
    pair.server.take()
    with pytest.raises(UnexpectedMessage, match="register_response does not answer"):
        pair.server.sig.send_response(stream_id, pb.RegisterResponse())
    # nothing was sent and the stream still waits for a proper answer
    assert pair.server.sig.send_response(stream_id, pb.LoginResponse())
    assert not pair.server.sig.send_response(stream_id, pb.LoginResponse())  # answered
    pair.pump()
    [answer] = pair.client.take()
    assert isinstance(answer, ResponseReceived)
    assert_clean(pair.client, pair.server)


def test_answer_to_an_unknown_stream_sends_nothing(pair: Pair) -> None:
    assert not pair.server.sig.send_response(0, pb.LoginResponse())
    assert not pair.server.sig.send_error(4, NotFound())
    pair.pump()
    assert pair.client.take() == []


def test_cancel_request(pair: Pair) -> None:
    stream_id = pair.client.sig.send_request(pb.RouteRequest(fqdn="b.test.internal"))
    pair.pump()
    [request] = pair.server.take()
    assert pair.client.sig.cancel_request(stream_id, Timeout("no answer"))
    assert not pair.client.sig.cancel_request(stream_id, Timeout("no answer"))
    pair.pump()
    # the server learnt (STOP_SENDING) that nobody reads the answer
    assert not pair.server.sig.send_response(request.stream_id, pb.RouteResponse())
    assert pair.client.take() == [] and pair.server.take() == []
    assert_clean(pair.client, pair.server)


def test_connection_end_drops_every_stream(pair: Pair) -> None:
    pair.client.sig.send_request(pb.LoginRequest())
    pair.client.sig.send_request(pb.Keepalive())
    pair.pump()
    assert pair.client.sig.open_streams == pair.server.sig.incoming_streams == 2
    pair.client.quic.close(error_code=0, reason_phrase="bye")
    pair.pump()
    assert pair.client.terminated is not None and pair.server.terminated is not None
    assert pair.client.sig.open_streams == pair.server.sig.open_streams == 0
    assert pair.server.sig.incoming_streams == 0


# -- illegal transitions from a client ----------------------------------------------------


@pytest.mark.parametrize(
    ("name", "match"),
    [
        ("login_response", "login_response cannot open a stream"),  # answer without request
        ("keepalive_ack", "keepalive_ack cannot open a stream"),
        ("route_direction", "client cannot open a stream with route_direction"),  # push
        ("revocation_notice", "client cannot open"),
        ("error", "an Error cannot open a stream"),
    ],
)
def test_stream_opened_with_a_non_request(raw_client: Pair, name: str, match: str) -> None:
    client, server = raw_client.client, raw_client.server
    stream_id = client.next_stream()
    client.raw_send(stream_id, frame(name), end=True)
    raw_client.pump()
    event = only_protocol_error(server, UnexpectedMessage)
    assert event.stream_id == stream_id
    assert match in event.error.message
    refused_with(client.streams[stream_id], UnexpectedMessage)
    assert match in client.streams[stream_id].envelopes()[0].error.message
    assert_clean(client, server)


def test_second_request_on_a_stream(raw_client: Pair) -> None:
    client, server = raw_client.client, raw_client.server
    stream_id = client.next_stream()
    client.raw_send(stream_id, frame("login_request") + frame("login_request"), end=True)
    raw_client.pump()
    request, refusal = server.take()
    assert isinstance(request, RequestReceived)
    assert isinstance(refusal, ProtocolErrorDetected)
    assert isinstance(refusal.error, UnexpectedMessage)
    assert "after the request" in refusal.error.message
    refused_with(client.streams[stream_id], UnexpectedMessage)
    # the request already handed out gets no answer any more
    assert not server.sig.send_response(stream_id, pb.LoginResponse())
    assert_clean(client, server)


def test_second_request_later_without_fin(raw_client: Pair) -> None:
    """The stream is still open on the peer's side: it is also told to stop sending."""
    client, server = raw_client.client, raw_client.server
    stream_id = client.next_stream()
    client.raw_send(stream_id, frame("keepalive"))
    raw_client.pump()
    [request] = server.take()
    assert isinstance(request, RequestReceived)
    client.raw_send(stream_id, frame("keepalive"))
    raw_client.pump()
    only_protocol_error(server, UnexpectedMessage)
    log = client.streams[stream_id]
    refused_with(log, UnexpectedMessage)
    assert log.stop == pb.ERROR_CODE_UNEXPECTED_MESSAGE
    assert_clean(client, server)


def test_stream_ended_without_a_request(raw_client: Pair) -> None:
    client, server = raw_client.client, raw_client.server
    stream_id = client.next_stream()
    client.raw_send(stream_id, b"", end=True)
    raw_client.pump()
    event = only_protocol_error(server, UnexpectedMessage)
    assert "ended before its request" in event.error.message
    refused_with(client.streams[stream_id], UnexpectedMessage)
    assert_clean(client, server)


def _bad_version() -> bytes:
    payload = b"\x08\x07" + b"\x52\x00"  # version 7, empty login_request
    return len(payload).to_bytes(4, "big") + payload


@pytest.mark.parametrize(
    ("data", "fin", "error"),
    [
        (frame("login_request")[:-1], True, MalformedMessage),  # truncated by the FIN
        (b"\0\0\0\3\xff\xff\xff", True, MalformedMessage),  # not protobuf
        ((MAX_MESSAGE_SIZE + 1).to_bytes(4, "big"), False, OversizedMessage),  # prefix only
        (b"\0\0\0\5\x08\x01\x9a\x06\x00", True, UnknownMessage),  # field 99: unknown body
        (b"\0\0\0\2\x08\x01", True, UnknownMessage),  # no body
        (_bad_version(), True, UnsupportedVersion),
    ],
    ids=["truncated", "garbage", "oversized", "unknown-body", "no-body", "version"],
)
def test_undecodable_request_gets_a_typed_error(
    raw_client: Pair,
    data: bytes,
    fin: bool,
    error: type[CyphonicError],
) -> None:
    client, server = raw_client.client, raw_client.server
    stream_id = client.next_stream()
    client.raw_send(stream_id, data, end=fin)
    raw_client.pump()
    only_protocol_error(server, error)
    log = client.streams[stream_id]
    refused_with(log, error)
    assert log.stop == (None if fin else error.code)
    assert_clean(client, server)


def test_unidirectional_stream_is_refused(raw_client: Pair) -> None:
    client, server = raw_client.client, raw_client.server
    stream_id = client.quic.get_next_available_stream_id(is_unidirectional=True)
    client.raw_send(stream_id, frame("login_request"))
    raw_client.pump()
    event = only_protocol_error(server, UnexpectedMessage)
    assert event.stream_id == stream_id
    assert client.streams[stream_id].stop == pb.ERROR_CODE_UNEXPECTED_MESSAGE
    assert_clean(client, server)


def test_incoming_stream_limit(raw_client: Pair) -> None:
    client, server = raw_client.client, raw_client.server
    whole = frame("keepalive")
    ids = []
    for _ in range(MAX_INCOMING_STREAMS + 1):
        stream_id = client.next_stream()
        client.raw_send(stream_id, whole[:2])  # half a length prefix: the stream stays open
        ids.append(stream_id)
    raw_client.pump()
    event = only_protocol_error(server, Exhausted)
    assert event.stream_id == ids[-1]
    log = client.streams[ids[-1]]
    refused_with(log, Exhausted)
    assert log.stop == pb.ERROR_CODE_EXHAUSTED
    assert server.sig.incoming_streams == MAX_INCOMING_STREAMS
    # finishing one request and answering it makes room for a new stream
    client.raw_send(ids[0], whole[2:], end=True)
    raw_client.pump()
    [request] = server.take()
    assert server.sig.send_response(request.stream_id, pb.KeepaliveAck())
    raw_client.pump()
    assert server.sig.incoming_streams == MAX_INCOMING_STREAMS - 1
    extra = client.next_stream()
    client.raw_send(extra, whole, end=True)
    raw_client.pump()
    [accepted] = server.take()
    assert isinstance(accepted, RequestReceived) and accepted.stream_id == extra
    assert server.sig.send_response(extra, pb.KeepaliveAck())
    # the client gives up on the rest: the server forgets them all
    for stream_id in ids[1:-1]:
        client.quic.reset_stream(stream_id, 0)
    raw_client.pump()
    assert server.take() == []
    assert_clean(server)


def test_limit_is_configurable(cert: Cert) -> None:
    raw_client = Pair(cert=cert, client_signalling=False)
    raw_client.server.sig.max_incoming_streams = 1
    client = raw_client.client
    first, second = client.next_stream(), None
    client.raw_send(first, frame("keepalive"))
    second = client.next_stream()
    client.raw_send(second, frame("keepalive"))
    raw_client.pump()
    request, refusal = raw_client.server.take()
    assert isinstance(request, RequestReceived) and request.stream_id == first
    assert isinstance(refusal, ProtocolErrorDetected) and refusal.stream_id == second
    assert isinstance(refusal.error, Exhausted)


def test_peer_withdraws_its_request_by_reset(raw_client: Pair) -> None:
    client, server = raw_client.client, raw_client.server
    stream_id = client.next_stream()
    client.raw_send(stream_id, frame("route_request"))  # no FIN yet
    raw_client.pump()
    [request] = server.take()
    client.quic.reset_stream(stream_id, pb.ERROR_CODE_TIMEOUT)
    raw_client.pump()
    assert server.take() == []
    assert not server.sig.send_response(request.stream_id, pb.RouteResponse())
    assert client.streams[stream_id].reset == 0  # the server ended its half too
    assert_clean(client, server)


def test_peer_withdraws_its_request_by_stop_sending(raw_client: Pair) -> None:
    client, server = raw_client.client, raw_client.server
    stream_id = client.next_stream()
    client.raw_send(stream_id, frame("route_request"), end=True)
    raw_client.pump()
    [request] = server.take()
    client.quic.stop_stream(stream_id, pb.ERROR_CODE_TIMEOUT)
    raw_client.pump()
    assert not server.sig.send_response(request.stream_id, pb.RouteResponse())
    assert server.take() == []
    assert_clean(client, server)


def test_bytes_sent_back_on_a_push(raw_client: Pair) -> None:
    client, server = raw_client.client, raw_client.server
    stream_id = server.sig.send_request(pb.RouteDirection(route_id="r1"))
    raw_client.pump()
    assert [body_name(e) for e in client.streams[stream_id].envelopes()] == ["route_direction"]
    client.raw_send(stream_id, encode_frame(wrap(pb.Error(code=pb.ERROR_CODE_INTERNAL))))
    raw_client.pump()
    event = only_protocol_error(server, UnexpectedMessage)
    assert "sent back on the push route_direction" in event.error.message
    # the server's half is over, so the reason travels as the STOP_SENDING code
    assert client.streams[stream_id].stop == pb.ERROR_CODE_UNEXPECTED_MESSAGE
    assert_clean(client, server)


# -- illegal transitions from a server ----------------------------------------------------


def test_answer_of_the_wrong_type(raw_server: Pair) -> None:
    client, server = raw_server.client, raw_server.server
    stream_id = client.sig.send_request(pb.LoginRequest())
    raw_server.pump()
    server.raw_send(stream_id, frame("register_response"), end=True)
    raw_server.pump()
    event = only_protocol_error(client, UnexpectedMessage)
    assert event.stream_id == stream_id
    assert "register_response does not answer login_request" in event.error.message
    assert_clean(client, server)


@pytest.mark.parametrize("fin", [True, False])
def test_data_after_the_answer(raw_server: Pair, fin: bool) -> None:
    client, server = raw_server.client, raw_server.server
    stream_id = client.sig.send_request(pb.Keepalive())
    raw_server.pump()
    server.raw_send(stream_id, frame("keepalive_ack") + frame("keepalive_ack"), end=fin)
    raw_server.pump()
    answer, refusal = client.take()
    assert isinstance(answer, ResponseReceived)
    assert isinstance(refusal, ProtocolErrorDetected)
    assert isinstance(refusal.error, UnexpectedMessage)
    assert "after the answer" in refusal.error.message
    assert server.streams[stream_id].stop == (None if fin else pb.ERROR_CODE_UNEXPECTED_MESSAGE)
    assert_clean(client, server)


def test_stream_ended_without_an_answer(raw_server: Pair) -> None:
    client, server = raw_server.client, raw_server.server
    stream_id = client.sig.send_request(pb.RegisterRequest())
    raw_server.pump()
    server.raw_send(stream_id, b"", end=True)
    raw_server.pump()
    event = only_protocol_error(client, UnexpectedMessage)
    assert "without an answer to register_request" in event.error.message
    assert_clean(client, server)


@pytest.mark.parametrize(
    ("code", "expected"),
    [(pb.ERROR_CODE_NOT_FOUND, NotFound), (0, RemoteError), (2**40, RemoteError)],
)
def test_request_reset_by_the_server(
    raw_server: Pair,
    code: int,
    expected: type[CyphonicError],
) -> None:
    client, server = raw_server.client, raw_server.server
    stream_id = client.sig.send_request(pb.RouteRequest())
    raw_server.pump()
    server.quic.reset_stream(stream_id, code)
    raw_server.pump()
    [event] = client.take()
    assert isinstance(event, ErrorReceived)
    assert type(event.error) is expected
    assert "reset by the peer" in event.error.message
    assert_clean(client, server)


@pytest.mark.parametrize("name", ["login_request", "keepalive", "route_response", "error"])
def test_server_stream_with_a_non_push(raw_server: Pair, name: str) -> None:
    client, server = raw_server.client, raw_server.server
    stream_id = server.next_stream()
    server.raw_send(stream_id, frame(name), end=True)
    raw_server.pump()
    only_protocol_error(client, UnexpectedMessage)
    refused_with(server.streams[stream_id], UnexpectedMessage)
    assert_clean(client, server)


def test_push_then_more_on_the_same_stream(raw_server: Pair) -> None:
    client, server = raw_server.client, raw_server.server
    stream_id = server.next_stream()
    server.raw_send(stream_id, frame("peer_offline") + frame("peer_offline"), end=True)
    raw_server.pump()
    push, refusal = client.take()
    assert isinstance(push, RequestReceived) and push.pushed
    assert isinstance(refusal, ProtocolErrorDetected)
    # the client had already ended its half for the push: only the FIN came back
    assert server.streams[stream_id].data == b"" and server.streams[stream_id].fin
    assert_clean(client, server)


def test_stream_reset_before_any_byte(raw_server: Pair) -> None:
    """A peer stream reset before its first byte still ends this side's half."""
    client, server = raw_server.client, raw_server.server
    stream_id = server.next_stream()
    server.raw_send(stream_id, b"")
    server.quic.reset_stream(stream_id, 0)
    raw_server.pump()
    assert client.take() == []
    assert server.streams[stream_id].reset == 0
    assert_clean(client)
